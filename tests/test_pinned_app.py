"""A fedtrain client executes only fedtrain's installed ClientApp, whatever run the SuperLink hands it.

The end-to-end test plays a compromised server: a SuperLink that ships a run with its own ClientApp
code. A plain Flower SuperNode runs that code (so the test can tell), a `fedtrain client` refuses it
before importing anything of it and answers with an error.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedtrain.clients.pinned_app import UntrustedRunError, check_fab
from fedtrain.processes import ManagedProcess, flower_env, free_port, run_tool, tool, wait_for_port
from fedtrain.security.kits import provision

FEDTRAIN_COMPONENTS = (
    '[tool.flwr.app.components]\nserverapp = "fedtrain.server.app:app"\nclientapp = "fedtrain.clients.app:app"\n'
)


def _fab(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def test_a_code_free_fab_naming_fedtrain_apps_is_accepted() -> None:
    check_fab(_fab({"pyproject.toml": FEDTRAIN_COMPONENTS, ".info/CONTENT": "pyproject.toml,abc,10\n"}))


@pytest.mark.parametrize(
    "files, reason",
    [
        ({"pyproject.toml": FEDTRAIN_COMPONENTS, "fedtrain/clients/app.py": "print('shadow')"}, "ships files"),
        ({"pyproject.toml": FEDTRAIN_COMPONENTS, "sitecustomize.py": ""}, "ships files"),
        ({"pyproject.toml": FEDTRAIN_COMPONENTS.replace("fedtrain.clients.app:app", "os:system")}, "components"),
        ({"pyproject.toml": FEDTRAIN_COMPONENTS + 'agent = "x:y"\n'}, "components"),
        ({"pyproject.toml": "[project]\nname = 'x'\n"}, "components"),
        ({"pyproject.toml": "not = [toml"}, "not a fedtrain run"),
        ({".info/CONTENT": ""}, "not a fedtrain run"),
    ],
)
def test_anything_else_is_refused(files: dict[str, str], reason: str) -> None:
    with pytest.raises(UntrustedRunError, match=reason):
        check_fab(_fab(files))


def test_bytes_that_are_not_an_archive_are_refused() -> None:
    with pytest.raises(UntrustedRunError, match="not a fedtrain run"):
        check_fab(b"PK\x03\x04 broken")


EVIL_SERVER = """
import json, os
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()

@app.main()
def main(grid, context):
    nodes = []
    for _ in range(120):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        import time; time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=300))
    report = [{"error": r.error.reason if r.has_error() else None} for r in replies]
    with open(os.environ["EVIL_REPORT"], "w") as f:
        json.dump(report, f)
"""

EVIL_CLIENT = """
import pathlib
pathlib.Path({marker!r}).write_text("the shipped code ran")
from flwr.clientapp import ClientApp
app = ClientApp()
"""


def _evil_app(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "innocent"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "mallory"\n\n'
        '[tool.flwr.app.components]\nserverapp = "evil_server:app"\nclientapp = "evil_client:app"\n'
    )
    (folder / "evil_server.py").write_text(EVIL_SERVER)
    (folder / "evil_client.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
    return folder


@pytest.mark.e2e
@pytest.mark.parametrize("node", ["flower-supernode", "fedtrain client"])
def test_a_run_shipping_its_own_client_code_never_executes_on_a_fedtrain_client(tmp_path: Path, node: str) -> None:
    marker, report = tmp_path / "marker.txt", tmp_path / "report.json"
    app = _evil_app(tmp_path / "app", marker)
    home = tmp_path / "flwr"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**flower_env(home), "EVIL_REPORT": str(report), "FEDTRAIN_HOME": str(tmp_path / "home")}
    shard = tmp_path / "shard.npz"
    np.savez(shard, x=np.random.default_rng(0).random((40, 1, 8, 8)), y=np.arange(40) % 10)
    provision(tmp_path / "kits", ["127.0.0.1"], 1)
    node_argv = (
        [tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port())]
        if node == "flower-supernode"
        else [str(Path(sys.executable).with_name("fedtrain")), "client", "--insecure", "--kit",
              str(tmp_path / "kits" / "client-1"), "--server", f"127.0.0.1:{port}", "--data", str(shard)]
    )  # fmt: skip
    superlink = ManagedProcess(
        "SuperLink",
        [tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
        env,
        tmp_path / "superlink.log",
    )
    client = ManagedProcess("client", node_argv, env, tmp_path / "client.log")
    try:
        wait_for_port("127.0.0.1", port, 60, superlink)
        submitted = run_tool([tool("flwr"), "run", str(app), "local", "--format", "json"], env, timeout=300)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        deadline = time.monotonic() + 150
        while not report.exists() and time.monotonic() < deadline:
            assert superlink.alive and client.alive, client.log_tail(40)
            time.sleep(0.5)
        assert report.exists(), superlink.log_tail(40)
        replies = json.loads(report.read_text())
        assert len(replies) == 1
        if node == "flower-supernode":  # the control: Flower alone runs whatever the run ships
            assert marker.exists()
        else:
            assert not marker.exists(), "the shipped ClientApp ran on a fedtrain client"
            assert "UntrustedRunError" in replies[0]["error"]
            deadline = time.monotonic() + 10
            while "refused a run that is not fedtrain's" not in client.log_tail(40) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert "the run ships files" in client.log_tail(40)
    finally:
        client.stop()
        superlink.stop()
    assert not client.alive and not superlink.alive
    for stray in subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split():
        if int(stray) != os.getpid():
            raise AssertionError(f"process {stray} outlived the test")
