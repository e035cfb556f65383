"""A real federation of separate processes on 127.0.0.1: `fedtrain server` and three `fedtrain client`
processes with kits from `fedtrain provision`. Every process is stopped by the test, also on failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant
from sklearn.datasets import load_digits

from fedtrain.models import build_model
from fedtrain.processes import free_port
from fedtrain.security.kits import provision
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e
FEDTRAIN = str(Path(sys.executable).with_name("fedtrain"))


class Processes:
    """Children in their own process groups; `stop_all` terminates, then kills, every group."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.children = env, logs, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        child = subprocess.Popen([FEDTRAIN, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self.children.append((child, log))
        return child

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for child, _ in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child, log in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            log.close()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def federation(tmp_path: Path):
    kits = tmp_path / "kits"
    provision(kits, ["127.0.0.1"], 5)
    digits = load_digits()
    for i in range(3):
        part = slice(i * 500, (i + 1) * 500)
        np.savez(tmp_path / f"shard{i + 1}.npz", x=(digits.images[part] * 16).astype(np.uint8), y=digits.target[part])
    # client-4 holds good data and a strict policy; client-5's data has a label the run does not know
    np.savez(tmp_path / "shard4.npz", x=(digits.images[:200] * 16).astype(np.uint8), y=digits.target[:200])
    labels = digits.target[200:400].copy()
    labels[7] = 11
    np.savez(tmp_path / "shard5.npz", x=(digits.images[200:400] * 16).astype(np.uint8), y=labels)
    strict = (
        (kits / "client-4" / "policy.toml").read_text().replace("max_eval_fraction = 0.2", "max_eval_fraction = 0.05")
    )
    (tmp_path / "strict-policy.toml").write_text(strict)
    (tmp_path / "fed.toml").write_text(
        'rounds = 2\ninput_shape = [1, 8, 8]\nlabels = ["0","1","2","3","4","5","6","7","8","9"]\n'
        "eval_fraction = 0.1\nround_timeout = 300.0\n"
    )
    env = {**os.environ, "FEDTRAIN_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    procs = Processes(env, tmp_path)
    try:
        yield tmp_path, procs
    finally:
        procs.stop_all()


def _post(port: int, path: str, ca: Path) -> int:
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


# Measured 209-269 s on a quiet machine before warm workers (issue 17); with warm client and ServerApp workers
# and the server's in-process Control API client (2026-11-30): 110-114 s alone on a quiet machine, 132 s beside
# the other xdist worker of a clean-clone `make test`. CI may share the machine: 900 s (the default is 600 s).
@pytest.mark.timeout(900)
def test_clients_tls_auth_encrypted_payloads_policies_and_a_locked_control_plane(
    federation, capsys, monkeypatch
) -> None:
    """Issue 3's acceptance 1, 2, 4, 5, issue 4's secure aggregation and issue 12's client policies in one
    federation (each start-up costs a minute here). Every round runs SecAgg+ (setup, share keys, masked
    vectors, unmask) between the separate processes, over TLS, with sealed payloads. Client-3 is SIGKILLed
    while it trains in round 2: the round completes with the masked sum of the two others
    (min_fit_clients = 2) as soon as the SuperLink misses its heartbeats, and client-3, restarted at once,
    waits out its stale session and is back for round 3, which waits for it (min_available_clients = 5).
    Client-4's own policy refuses the run (it holds out more than client-4 allows); client-5's data fails
    every round, and only the category of its error leaves it."""
    tmp, procs = federation
    (tmp / "fed.toml").write_text(
        (tmp / "fed.toml").read_text().replace("rounds = 2", "rounds = 3")
        # a round may finish with 2 updates, but starts only with 5 clients online: round 3 waits for client-3
        + "min_fit_clients = 2\nmin_available_clients = 5\nsecure_aggregation = true\n"
    )
    port = free_port()
    database = tmp / "state.db"
    server = procs.start(
        "server", "server", "--kit", str(tmp / "kits" / "server"), "--config", str(tmp / "fed.toml"),
        "--min-clients", "5", "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(tmp / "run"),
        "--database", str(database), "--wait-timeout", "120",
    )  # fmt: skip
    _wait_for(lambda: "Fleet API" in procs.output("server") or server.poll() is not None, 180, "the server")
    assert server.poll() is None, procs.output("server")

    # An outsider on the public port: it speaks TLS, and nothing but the Fleet API is there.
    ca = tmp / "kits" / "client-1" / "ca.crt"
    assert _post(port, "/v1/control/start-run", ca) == 403
    assert _post(port, "/v1/control/register-node", ca) == 403
    assert _post(port, "/v1/control/list-runs", ca) == 403
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP gets no answer
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/fleet/get-run", data=b"{}", timeout=10)

    def start_client(i: int, name: str, *extra: str) -> subprocess.Popen:
        return procs.start(name, "client", "--kit", str(tmp / "kits" / f"client-{i}"), "--server",
                           f"127.0.0.1:{port}", "--data", str(tmp / f"shard{i}.npz"), *extra)  # fmt: skip

    victim = {i: start_client(i, f"client-{i}") for i in (1, 2, 3)}[3]
    start_client(4, "client-4", "--policy", str(tmp / "strict-policy.toml"))
    start_client(5, "client-5")
    node_log = tmp / "home" / "supernodes" / "client-3" / "supernode.log"

    def second_round_training() -> bool:  # SecAgg+ sends 4 train messages a round; the 3rd is the training
        return node_log.exists() and node_log.read_text(errors="replace").count("Receiving: train message") >= 7

    _wait_for(second_round_training, 500, "client-3 to receive round 2's training message")
    os.killpg(victim.pid, signal.SIGKILL)  # the client's machine dies: nothing gets to clean up
    victim.wait(timeout=10)
    # this test's client-3 only (its kit path is under tmp): other tests may run clients of that name
    _wait_for(lambda: not subprocess.run(["pgrep", "-f", f"{tmp}.*client-3"], capture_output=True).stdout, 15,
              "client-3's SuperNode to die with it")  # fmt: skip
    start_client(3, "client-3-again")  # restarted at once, while the server still counts it as online
    try:
        server.wait(timeout=550)
    except subprocess.TimeoutExpired:
        raise AssertionError("server did not finish:\n" + procs.output("server")) from None
    out = procs.output("server")
    assert server.returncode == 0, out
    assert "finished:completed" in out and "5/5 clients online" in out

    run = tmp / "run"
    rows = json.loads((run / "metrics.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    assert rows[0]["clients_ok"] == 3 and rows[1]["clients_ok"] == 2, rows
    assert rows[0]["secure_aggregation"] == {"contributors": 3, "updates_scaled": 0, "values_clipped": 0}, rows
    assert rows[1]["secure_aggregation"]["contributors"] == 2, rows  # the dead client's masks removed
    assert sorted(rows[1]["failed"]) == ["client-3", "client-5"] and "heartbeat" in rows[1]["failed"]["client-3"]
    # The missed heartbeats (20 s) ended the dead client's stage, not round_timeout (300 s for that stage
    # alone); the round measured 55-75 s on a quiet machine, and the bound leaves room for a busy one.
    assert rows[1]["seconds"] < 250, rows[1]
    assert rows[2]["clients_ok"] == 3, rows  # client-3 rejoined
    # restarted at once, it found its stale session and waited it out (on a loaded machine the session may
    # have expired before it asked: then it simply connected)
    again = procs.output("client-3-again")
    assert "previous session" in again or "connected to" in again, again
    for row in rows:  # client-4's policy refused the run, with its reason; client-5 sent a category only
        assert list(row["refused"]) == ["client-4"], row
        assert (
            "holds out 0.1 of the shard for evaluation, more than this client's max_eval_fraction 0.05"
            in (row["refused"]["client-4"])
        )
        assert row["failed"]["client-5"] == "client error (data error)", row
    assert set(privacy["clients"]) == {"client-1", "client-2", "client-3"}  # nothing spent by client-4 or 5
    rounds_trained = {"client-1": 3, "client-2": 3, "client-3": 2}
    for name, client in privacy["clients"].items():
        training = [e for e in client["ledger"] if e["kind"] == "train"]
        assert len(training) == rounds_trained[name]  # client-3 spent nothing in the round it died in
        assert client["metrics"] == "private" and any(e["kind"] == "metrics" for e in client["ledger"])
        reference = PRVAccountant()
        reference.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in client["ledger"]]
        assert client["epsilon"] == pytest.approx(reference.get_epsilon(delta=client["delta"]), rel=0.01)
        assert client["epsilon"] <= 3.0
        assert client["lifetime_epsilon"] == pytest.approx(client["epsilon"])  # its data's only run

    # Each client keeps its lifetime ledger on its own disk, sealed, so a restart cannot reset its epsilon;
    # `fedtrain ledger` reads it back.
    for name in ("client-1", "client-2", "client-3"):
        stored = tmp / "home" / "ledgers" / name / "ledger.ftenc"
        assert stored.read_bytes()[:3] == b"FTE"
    # the commands in this process (their start-up is not what this test is about; they have their own tests)
    monkeypatch.setenv("FEDTRAIN_HOME", procs.env["FEDTRAIN_HOME"])
    code, shown, err = run_cli(["ledger", "--kit", str(tmp / "kits" / "client-1")], capsys)
    assert code == 0, err
    assert f"lifetime epsilon {privacy['clients']['client-1']['epsilon']:.3f}" in " ".join(shown.split())
    assert not (tmp / "home" / "ledgers" / "client-4" / "ledger.ftenc").exists()

    # Client-5's error text (its data path, the label) stayed in its own log.
    client_logs = (tmp / "home" / "supernodes" / "client-5").glob("*.log")
    assert any("label '11'" in log.read_text(errors="replace") for log in client_logs)
    secrets = [b"shard5.npz", b"label '11'", b"not one of the configured labels"]

    # Neither the SuperLink's database nor any file the server wrote holds the weights or a client's error
    # text in plaintext.
    exported = tmp / "model.pt"
    code, _, err = run_cli(["export", str(run), "--out", str(exported)], capsys)
    assert code == 0, err
    weights = torch.load(exported, weights_only=True)
    needles = [t.numpy().astype(np.float32).tobytes()[:32] for t in weights.values()] + secrets
    scanned = [p for p in [*run.rglob("*"), *tmp.glob("state.db*"), *tmp.glob("server.log")] if p.is_file()]
    assert any(p.name == "state.db" for p in scanned)
    for path in scanned:
        data = path.read_bytes()
        assert not any(n in data for n in needles), f"plaintext weights or error text in {path}"

    # The model learned (private metrics on 50 held-out digits are noise by design; test it here instead).
    model = build_model("logistic", [1, 8, 8], 10)
    model.load_state_dict(weights)
    with torch.no_grad():
        x = torch.from_numpy(load_digits().images[1500:] / 16.0).float()[:, None]
        accuracy = (model(x).argmax(1).numpy() == load_digits().target[1500:]).mean()
    assert 0.3 <= accuracy <= 0.99, accuracy
