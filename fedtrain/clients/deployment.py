"""`fedtrain client`: a SuperNode that trains fedtrain's ClientApp on one private shard.

The shard is loaded and checked before anything connects, so a bad file fails in a second. The
SuperNode authenticates with the kit's node key, trusts only the kit's CA, and learns its data
path, kit and name through `--node-config`. It is supervised: when it gives up reconnecting or
exits, `fedtrain client` stops it and says why in one sentence.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fedtrain.config import Config
from fedtrain.data import load_shard
from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_bytes
from fedtrain.processes import ManagedProcess, flower_env, free_port, tool
from fedtrain.security.keys import fedtrain_home
from fedtrain.security.kits import read_kit

GIVE_UP = ("Giving up reconnection", "Connection attempt failed, giving up")


@dataclass
class ClientOptions:
    kit: Path
    server: str
    data: Path
    device: str | None = None
    max_wait: float = 60.0
    passphrase: bytes | None = None
    insecure: bool = False


def _check_server(address: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9.\-]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", address):
        raise FedtrainError(f"--server must be HOST:PORT (for example 10.0.0.5:9092), not {address!r}.")


def _node_key(kit: Path, passphrase: bytes | None, private_dir: Path) -> Path:
    """The OpenSSH key flower-supernode reads; a passphrase-protected key is decrypted into `private_dir`."""
    path = kit / "node.key"
    data = path.read_bytes()
    if b"ENCRYPTED" not in data:
        return path
    if not passphrase:
        raise FedtrainError(f"{path} is passphrase-protected; pass --passphrase-env VAR with the passphrase.")
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except (ValueError, TypeError):
        raise FedtrainError(f"the passphrase does not open {path}.") from None
    plain = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return atomic_write_bytes(private_dir / "node.key", plain, mode=0o600)


def explain_exit(code: int | None, log: str) -> str:
    """One sentence for why a SuperNode stopped, from its exit code and log."""
    if "CERTIFICATE_VERIFY_FAILED" in log:
        return "the server's TLS certificate is not signed by this kit's CA; use the kit of this federation"
    if "WRONG_VERSION_NUMBER" in log or "wrong version number" in log.lower():
        return "the server does not speak TLS on that port (is it an --insecure server?)"
    if re.search(r"Failed to activate|not (be )?registered|NODE_NOT_FOUND|PERMISSION_DENIED", log, re.IGNORECASE):
        return "the server does not accept this client's key; is the client registered in this federation?"
    if any(marker in log for marker in GIVE_UP) or "Connection refused" in log or "ConnectError" in log:
        return "the server cannot be reached; check --server and that `fedtrain server` is running"
    return f"the SuperNode exited with code {code}"


def join(options: ClientOptions, say: Callable[[str], None], stop_after: float | None = None) -> None:
    """Run the SuperNode until it stops (or `stop_after` seconds); raise FedtrainError on failure."""
    kit = options.kit.resolve()
    info = read_kit(kit, "client")
    _check_server(options.server)
    data = options.data.resolve()
    shard = load_shard(data, Config(), infer_labels=True)  # fail fast, before connecting
    say(f"{info['name']}: {len(shard)} samples of shape {shard.input_shape} in {data}")
    state = fedtrain_home() / "supernodes" / info["name"]
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix="fedtrain-node-") as private:
        key = _node_key(kit, options.passphrase, Path(private))
        node_config = f"data-path='{data}' kit='{kit}' client-name='{info['name']}'"
        if options.device:
            node_config += f" device='{options.device}'"
        security = (
            ["--insecure"]
            if options.insecure
            else ["--root-certificates", str(kit / "ca.crt"), "--auth-supernode-private-key", str(key)]
        )
        for attempt in range(3):
            argv = [
                tool("flower-supernode"),
                "--superlink", options.server,
                *security,
                "--node-config", node_config,
                "--host", "127.0.0.1",
                "--port", str(free_port()),
                "--max-wait-time", str(int(options.max_wait)),
            ]  # fmt: skip
            node = ManagedProcess("SuperNode", argv, flower_env(state / "flwr"), state / "supernode.log")
            try:
                _supervise(node, say, info["name"], options.server, stop_after)
                return
            except FedtrainError as exc:
                if "address already in use" in node.log_tail(80) and attempt < 2:
                    continue  # its local port was taken between choosing and binding: pick another
                if options.insecure and "cannot be reached" in str(exc):
                    raise FedtrainError(
                        f"{info['name']} could not talk to {options.server} without TLS; the server probably "
                        "requires TLS: drop --insecure."
                    ) from None
                raise
            finally:
                node.stop()


def _supervise(
    node: ManagedProcess, say: Callable[[str], None], name: str, server: str, stop_after: float | None
) -> None:
    started, announced = time.monotonic(), False
    while True:
        log = node.log_tail(80)
        if not announced and "SuperNode ID" in log:
            say(f"{name}: connected to {server}; waiting for work")
            announced = True
        if not node.alive:
            if node.returncode == 0 and announced:
                return
            raise FedtrainError(f"{name} stopped: {explain_exit(node.returncode, log)} (log: {node.log_path}).")
        if any(marker in log for marker in GIVE_UP):
            raise FedtrainError(f"{name} stopped: {explain_exit(None, log)} (log: {node.log_path}).")
        if stop_after is not None and time.monotonic() - started > stop_after:
            return
        time.sleep(0.5)
