"""Everything `fedtrain client`, `fedtrain server` and `fedtrain simulate` can check on their own is
checked before anything connects or is created: one sentence, exit code 2, no traceback.

"Before connecting": a client's --server is a listening socket that must see no connection, and no
SuperNode state is created; a server's run directory (made just before its port opens) never
appears and its port stays free. No test here needs a running server.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from fedtrain.config import Config
from fedtrain.processes import free_port
from fedtrain.security import pki
from fedtrain.security.kit_data import DATA_FILE, declared_data, read_data_file
from fedtrain.security.kits import provision
from tests.conftest import run_cli
from tests.test_cli_errors import _assert_user_error

DECLARED = Config(input_shape=[1, 8, 8], num_classes=10)


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, Path]:
    """Two federations: one provisioned with a data description, one without."""
    root = tmp_path_factory.mktemp("kits")
    provision(root / "declared", ["127.0.0.1"], 2, data=declared_data(DECLARED, "test"))
    provision(root / "plain", ["127.0.0.1"], 1)
    return {"declared": root / "declared", "plain": root / "plain"}


def _copy(kits: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "kits"
    shutil.copytree(kits, copy)  # modes too: secrets stay 0600
    return copy


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def _digits_like(tmp_path: Path, y: np.ndarray | None = None, shape=(1, 8, 8)) -> Path:
    labels = np.arange(20) % 10 if y is None else y
    return _npz(tmp_path / "shard.npz", np.zeros((len(labels), *shape), dtype=np.float32), labels)


def _flip(path: Path, at: int) -> None:
    """One flipped bit at `at` (counted from the start, skipping a line break)."""
    data = bytearray(path.read_bytes())
    at += data[at] == ord("\n")
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _middle(path: Path) -> int:
    return len(path.read_bytes()) // 2


@pytest.fixture
def listener():
    """The address a client is pointed at: it must never see a connection."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def _client(capsys, isolated_home: Path, listener: socket.socket, kit: Path, data: Path, *extra: str):
    port = listener.getsockname()[1]
    argv = ["client", "--kit", str(kit), "--server", f"127.0.0.1:{port}", "--data", str(data), "--max-wait", "3"]
    code, _, err = run_cli([*argv, *extra], capsys)
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    assert not (isolated_home / "supernodes").exists()  # no SuperNode was started
    return code, err


# ------------------------------------------------------------------ client: the shard against the kit

SHARD_CASES = {
    "label 57": ("declared", lambda t: _digits_like(t, np.array([*range(10), 57])), "label 57 in", "out of range"),
    "label -1": ("declared", lambda t: _digits_like(t, np.array([*range(10), -1])), "label -1 in", "out of range"),
    "label 0.5": ("declared", lambda t: _digits_like(t, np.array([0, 1, 0.5, 2])), "label 0.5 in", "whole number"),
    "wrong input shape": (
        "declared",
        lambda t: _digits_like(t, shape=(1, 28, 28)),
        "have shape [1, 28, 28], but this federation's model takes [1, 8, 8]",
        "give a shard of that shape",
    ),
    "header-only csv": (
        "declared",
        lambda t: (t / "h.csv").write_text("a,b,label\n") and t / "h.csv",
        "has a header but no rows",
        "one row per sample",
    ),
    "negative label, no declaration": (
        "plain",
        lambda t: _digits_like(t, np.array([0, 1, -1, 1])),
        "label -1 in",
        "is negative",
    ),
    "fractional label, no declaration": (
        "plain",
        lambda t: _digits_like(t, np.array([0, 1, 0.5, 1])),
        "label 0.5 in",
        "is not a whole number",
    ),
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_client_refuses_a_bad_shard_before_connecting(case, kits, tmp_path, capsys, isolated_home, listener) -> None:
    federation, make_data, message, advice = SHARD_CASES[case]
    code, err = _client(capsys, isolated_home, listener, kits[federation] / "client-1", make_data(tmp_path))
    _assert_user_error(code, err, message)
    _assert_user_error(code, err, advice)


def test_a_declared_shard_of_the_right_kind_passes_the_checks(kits, tmp_path) -> None:
    from fedtrain.data import check_client_shard

    shard = check_client_shard(_digits_like(tmp_path), read_data_file(kits["declared"] / "client-1"))
    assert shard.input_shape == [1, 8, 8] and shard.num_classes == 10 and len(shard) == 20


# ------------------------------------------------------------------ client: every file of the kit


def _chmod(name: str, mode: int):
    return lambda kit: (kit / name).chmod(mode)


def _garbage(name: str):
    return lambda kit: (kit / name).write_text("fedtrain-aes256gcm:not-a-key\n")


def _other_node_key(kit: Path) -> None:
    (kit / "node.key").write_bytes(pki.private_openssh(pki.new_key()))


CLIENT_KIT_CASES = {
    "uplink.key 0644": (_chmod("uplink.key", 0o644), "uplink.key is accessible by other users (mode 644)"),
    "uplink.key corrupt": (_garbage("uplink.key"), "uplink.key does not hold a fedtrain key"),
    "federation.key 0644": (_chmod("federation.key", 0o644), "federation.key is accessible by other users"),
    "federation.key corrupt": (_garbage("federation.key"), "federation.key does not hold a fedtrain key"),
    "node.key 0644": (_chmod("node.key", 0o644), "node.key is accessible by other users (mode 644)"),
    "node.key flipped": (lambda kit: _flip(kit / "node.key", 40), "node.key is damaged"),
    "node.key of another client": (_other_node_key, "node.key is damaged or not the pair of"),
    "node.key missing": (lambda kit: (kit / "node.key").unlink(), "has no node.key; copy it again from the kit"),
    "node.pub flipped": (lambda kit: _flip(kit / "node.pub", _middle(kit / "node.pub")), "node.pub is damaged"),
    "ca.crt flipped": (lambda kit: _flip(kit / "ca.crt", _middle(kit / "ca.crt")), "ca.crt is damaged"),
    "kit.json missing": (lambda kit: (kit / "kit.json").unlink(), "is not a fedtrain kit (no kit.json)"),
    "federation.toml damaged": (lambda kit: (kit / DATA_FILE).write_text("input_shape = ["), "is not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(CLIENT_KIT_CASES))
def test_client_refuses_a_bad_kit_before_connecting(case, kits, tmp_path, capsys, isolated_home, listener) -> None:
    breaks, message = CLIENT_KIT_CASES[case]
    kit = _copy(kits["declared"], tmp_path) / "client-1"
    breaks(kit)
    code, err = _client(capsys, isolated_home, listener, kit, _digits_like(tmp_path))
    _assert_user_error(code, err, message)


def test_client_passphrase_is_checked_before_connecting(tmp_path, capsys, isolated_home, listener, monkeypatch) -> None:
    provision(tmp_path / "kits", ["127.0.0.1"], 1, passphrase=b"correct horse")
    kit, shard = tmp_path / "kits" / "client-1", _digits_like(tmp_path)
    code, err = _client(capsys, isolated_home, listener, kit, shard)
    _assert_user_error(code, err, "node.key is passphrase-protected; pass --passphrase-env VAR")
    monkeypatch.setenv("WRONG_PASS", "battery staple")
    code, err = _client(capsys, isolated_home, listener, kit, shard, "--passphrase-env", "WRONG_PASS")
    _assert_user_error(code, err, "the passphrase does not open")


# ------------------------------------------------------------------ server: every file of the kit


def _server(capsys, kit: Path, config: Path, run_dir: Path) -> tuple[int, str, int]:
    port = free_port()
    argv = ["server", "--kit", str(kit), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--run-dir", str(run_dir), "--wait-timeout", "5"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    return code, err, port


def _other_server_key(kit: Path) -> None:
    (kit / "server.key").write_bytes(pki.private_pem(pki.new_key()))


SERVER_KIT_CASES = {
    "model.key 0644": (_chmod("model.key", 0o644), "model.key is accessible by other users (mode 644)"),
    "federation.key garbage": (_garbage("federation.key"), "federation.key does not hold a fedtrain key"),
    "uplink key missing": (
        lambda kit: (kit / "clients" / "client-1.uplink.key").unlink(),
        "has no clients/client-1.uplink.key",
    ),
    "client-1.pub flipped": (
        lambda kit: _flip(kit / "clients" / "client-1.pub", _middle(kit / "clients" / "client-1.pub")),
        "client-1.pub is damaged: not a readable EC public key",
    ),
    "server.crt flipped": (lambda kit: _flip(kit / "server.crt", _middle(kit / "server.crt")), "server.crt is damaged"),
    "server.key of another server": (_other_server_key, "server.key is damaged or not the key of"),
    "server.key 0644": (_chmod("server.key", 0o644), "server.key is accessible by other users (mode 644)"),
}


@pytest.mark.parametrize("case", sorted(SERVER_KIT_CASES))
def test_server_refuses_a_bad_kit_before_its_port_opens(case, kits, tmp_path, capsys) -> None:
    breaks, message = SERVER_KIT_CASES[case]
    kit = _copy(kits["declared"], tmp_path) / "server"
    breaks(kit)
    config = tmp_path / "fed.toml"
    config.write_text("rounds = 1\ninput_shape = [1, 8, 8]\nnum_classes = 10\n")
    code, err, port = _server(capsys, kit, config, tmp_path / "run")
    _assert_user_error(code, err, message)
    assert not (tmp_path / "run").exists()  # made just before the SuperLink and the port: never reached
    with socket.create_server(("127.0.0.1", port)):
        pass  # the port is free


def test_server_config_must_agree_with_what_the_kits_declare(kits, tmp_path, capsys) -> None:
    config = tmp_path / "fed.toml"
    config.write_text("rounds = 1\ninput_shape = [1, 28, 28]\nnum_classes = 10\n")
    code, err, _ = _server(capsys, kits["declared"] / "server", config, tmp_path / "run")
    _assert_user_error(code, err, "the config's input_shape [1, 28, 28] differs from [1, 8, 8]")
    assert not (tmp_path / "run").exists()


def test_server_takes_the_model_description_from_its_kit(kits, tmp_path) -> None:
    from fedtrain.security.kit_checks import check_server_kit
    from fedtrain.server.deployment import ServerOptions, deployment_config

    kit = kits["declared"] / "server"
    checked = check_server_kit(kit, None)
    config = deployment_config(ServerOptions(kit, Config(rounds=1)), tmp_path / "run", checked.data)
    assert config.data.input_shape == [1, 8, 8] and config.data.num_classes == 10
    assert checked.unlocked is None  # not protected: Flower reads the kit's own file


# ------------------------------------------------------------------ provision and simulate


def test_provision_records_the_declared_data_in_every_kit(tmp_path, capsys) -> None:
    config = tmp_path / "fed.toml"
    config.write_text('rounds = 3\ninput_shape = [4]\nlabels = ["cat", "dog"]\nlabel_column = "kind"\n')
    out = tmp_path / "kits"
    argv = ["provision", "--out", str(out), "--server-host", "127.0.0.1", "--clients", "2", "--config", str(config)]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    for party in ("server", "client-1", "client-2"):
        data = read_data_file(out / party)
        assert (data.data.input_shape, data.data.labels, data.data.num_classes, data.data.label_column) == (
            [4],
            ["cat", "dog"],
            2,
            "kind",
        )
    (tmp_path / "shard.csv").write_text("a,b,c,d,kind\n1,2,3,4,cat\n1,2,3,4,bird\n")
    from fedtrain.data import check_client_shard
    from fedtrain.errors import FedtrainError

    with pytest.raises(FedtrainError, match="label 'bird' .* is not one of the configured labels"):
        check_client_shard(tmp_path / "shard.csv", read_data_file(out / "client-1"))


def test_provision_refuses_a_config_that_does_not_describe_the_data(tmp_path, capsys) -> None:
    config = tmp_path / "fed.toml"
    config.write_text("rounds = 3\n")
    out = tmp_path / "kits"
    argv = ["provision", "--out", str(out), "--server-host", "127.0.0.1", "--clients", "1", "--config", str(config)]
    code, _, err = run_cli(argv, capsys)
    _assert_user_error(code, err, "must give input_shape and num_classes (or labels)")
    assert not out.exists()


@pytest.mark.parametrize(
    ("make_data", "message"),
    [
        (lambda t: t / "nope.npz", "does not exist"),
        (lambda t: (t / "h.csv").write_text("a,label\n") and t / "h.csv", "has a header but no rows"),
    ],
    ids=["missing data", "header-only csv"],
)
def test_simulate_checks_the_data_before_creating_anything(make_data, message, tmp_path, capsys, isolated_home):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["simulate", "--data", str(make_data(tmp_path)), "--run-dir", str(run_dir)], capsys)
    _assert_user_error(code, err, message)
    assert out == ""  # no key announced, no run directory printed, no round table
    assert not (isolated_home / "keys").exists() and not run_dir.exists()
