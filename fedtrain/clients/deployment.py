"""`fedtrain client`: a SuperNode that trains fedtrain's ClientApp on one private shard.

The kit and the shard are checked before anything connects, so a bad file fails in a second. The
SuperNode authenticates with the kit's node key, trusts only the kit's CA, and learns its data
path, kit and name through `--node-config`. ClientApps are run by fedtrain's pinned SuperExec
(clients/pinned_app.py), each in a child of its warm worker, so only fedtrain's installed ClientApp
ever runs here, and a task starts in milliseconds instead of seconds of imports. Both processes are
supervised: when the SuperNode gives up reconnecting or either exits, `fedtrain client` stops them
and says why in one sentence.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedtrain.clients.supernode import HEARTBEAT_INTERVAL
from fedtrain.data import check_client_shard
from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_text
from fedtrain.processes import ManagedProcess, flower_env, free_port, superexec_env
from fedtrain.security.key_handover import hand_over
from fedtrain.security.keys import fedtrain_home
from fedtrain.security.kit_checks import check_client_kit

SESSION_FILE = "session"
GIVE_UP = ("Giving up reconnection", "Connection attempt failed, giving up")
ACTIVATION_REFUSED = "Failed to activate SuperNode"


@dataclass
class ClientOptions:
    kit: Path
    server: str
    data: Path
    device: str | None = None
    max_wait: float = 60.0
    passphrase: bytes | None = None
    insecure: bool = False
    max_physical_batch_size: int | None = None  # this node's GPU memory, whatever the run's batch size
    policy: Path | None = None  # this client's privacy policy (default: the kit's policy.toml)
    secret_env: tuple[str, ...] = ()  # variables that hold secrets (--passphrase-env): no child inherits them
    processes: int = 1  # local processes per round (clients/local_processes.py): this node's choice


def check_privacy(kit: Path, name: str, policy: Path | None) -> Path:
    """This client's policy file, read and checked, and its lifetime ledger opened and compared with
    its anchor: a bad policy or a lost or rolled-back ledger stops the client before it connects.

    Returns:
        The policy file every ClientApp of this node reads.
    """
    from fedtrain.clients.setup import kit_store
    from fedtrain.privacy.policy import POLICY_FILE, ClientPolicy

    path = (policy or kit / POLICY_FILE).resolve()
    ClientPolicy.load(path)
    kit_store(kit, name).check()
    return path


def _check_server(address: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9.\-]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", address):
        raise FedtrainError(f"--server must be HOST:PORT (for example 10.0.0.5:9092), not {address!r}.")


# A connected SuperNode whose heartbeat or pull is refused (401) SIGINTs itself. Flower's heartbeat and its
# retries each send one SIGINT: the first exits gracefully (0); on a busy machine the second can land after
# the handler was reset, and Python dies of it (-SIGINT). fedtrain never sends the SuperNode SIGINT.
SHUT_DOWN_BY_FLOWER = (0, -signal.SIGINT)


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
    """Run the SuperNode until it stops (or `stop_after` seconds).

    Everything that can be checked without the server is checked first, each defect with its own
    sentence: the address, every file of the kit, and the shard against the kit's data description.
    Only then does a SuperNode start.

    Args:
        options: the kit, the server, the shard and how to run.
        say: where progress lines go.
        stop_after: stop (cleanly) after this many seconds; None runs until the SuperNode stops.

    Raises:
        FedtrainError: a bad input, or why the SuperNode stopped, in one sentence.
    """
    kit = options.kit.resolve()
    _check_server(options.server)
    checked = check_client_kit(kit, options.passphrase)
    name = checked.info["name"]
    data = options.data.resolve()
    shard = check_client_shard(data, checked.data)  # fail fast, before connecting
    say(f"{name}: {len(shard)} samples of shape {shard.input_shape} in {data}")
    policy = check_privacy(kit, name, options.policy)
    state = fedtrain_home() / "supernodes" / name
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Flower cannot read an encrypted key: a protected one is decrypted into memory only (key_handover).
    handed = hand_over(checked.unlocked, "node", "node.key") if checked.unlocked is not None else None
    with handed or contextlib.nullcontext():
        key = handed.path if handed is not None else kit / "node.key"
        pass_fds = handed.pass_fds if handed is not None else ()
        node_config = f"data-path='{data}' kit='{kit}' client-name='{name}' policy='{policy}'"
        if options.device:
            node_config += f" device='{options.device}'"
        if options.max_physical_batch_size:
            node_config += f" max-physical-batch-size={int(options.max_physical_batch_size)}"
        if options.processes != 1:
            node_config += f" processes={int(options.processes)}"
        security = (
            ["--insecure"]
            if options.insecure
            else ["--root-certificates", str(kit / "ca.crt"), "--auth-supernode-private-key", str(key)]
        )
        port_retries, told = 2, False
        env = flower_env(state / "flwr", hide=options.secret_env)

        def warm_superexec() -> tuple[ManagedProcess, int]:
            # the SuperExec first: the SuperNode comes online (and the server counts it) once the
            # SuperExec's warm worker can run a task at once, not seconds of imports later
            runtime_port = free_port()
            argv = [sys.executable, "-m", "fedtrain.clients.pinned_app", "--insecure",  # loopback API
                    "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--parent-pid", str(os.getpid()),
                    "--warm-data", str(data), "--warm-kit", str(kit)]  # fmt: skip
            executor = ManagedProcess("SuperExec", argv, superexec_env(env), state / "superexec.log")
            try:
                _wait_until_warm(executor, name)
            except BaseException:
                executor.stop()
                raise
            return executor, runtime_port

        warm: tuple[ManagedProcess, int] | None = None
        session_expires = _crashed_session_expiry(state, options.server)
        if session_expires > time.time():
            # Rejoining the moment the SuperLink lets the old session go would race the ServerApp: a
            # message the crashed client held gets its error reply only while the node is offline.
            say(f"{name}: the server still holds this client's previous session (did it crash?); "
                f"waiting {session_expires - time.time():.0f} s for it to expire")  # fmt: skip
            told = True
            warm = warm_superexec()  # loaded while the session expires
            try:
                time.sleep(max(0.0, session_expires - time.time()))
            except BaseException:
                warm[0].stop()
                raise
            session_expires = time.time() + 2 * HEARTBEAT_INTERVAL  # then retry a little, if it still holds it
        while True:
            executor, runtime_port = warm if warm is not None else warm_superexec()
            warm = None
            argv = [
                sys.executable, "-m", "fedtrain.clients.supernode",  # flower-supernode with a 10 s heartbeat
                "--superlink", options.server,
                *security,
                "--node-config", node_config,
                "--isolation", "process",  # ClientApps are started by fedtrain's pinned SuperExec above
                "--host", "127.0.0.1",
                "--port", str(runtime_port),
                "--max-wait-time", str(int(options.max_wait)),
            ]  # fmt: skip
            node = ManagedProcess("SuperNode", argv, env, state / "supernode.log", pass_fds=pass_fds)
            try:
                _supervise(node, executor, say, name, options.server, stop_after, state / SESSION_FILE)
                (state / SESSION_FILE).unlink(missing_ok=True)  # a clean stop deactivates the node
                return
            except FedtrainError as exc:
                log = node.log_tail(80)
                if "address already in use" in log and port_retries > 0:
                    port_retries -= 1
                    continue  # its local port was taken between choosing and binding: pick another
                if ACTIVATION_REFUSED in log and time.time() < session_expires:
                    if not told:
                        say(
                            f"{name}: the server still holds this client's previous session (did it "
                            "crash?); retrying until that session expires"
                        )
                        told = True
                    time.sleep(5)
                    continue
                if options.insecure and "cannot be reached" in str(exc):
                    raise FedtrainError(
                        f"{name} could not talk to {options.server} without TLS; the server probably "
                        "requires TLS: drop --insecure."
                    ) from None
                raise
            finally:
                executor.stop()
                node.stop()


def _wait_until_warm(executor: ManagedProcess, name: str) -> None:
    """Until the SuperExec says its warm worker has loaded (pinned_app.WARM_READY); bounded."""
    from fedtrain.clients.pinned_app import READY_TIMEOUT, WARM_READY

    deadline = time.monotonic() + READY_TIMEOUT + 30
    while WARM_READY not in executor.log_tail(200):
        if not executor.alive:
            raise FedtrainError(f"{name} stopped: its SuperExec exited while loading (log: {executor.log_path}).")
        if time.monotonic() > deadline:
            raise FedtrainError(f"{name} stopped: its SuperExec did not load in time (log: {executor.log_path}).")
        time.sleep(0.05)


def _crashed_session_expiry(state: Path, server: str) -> float:
    """When the session that a crashed `fedtrain client` left on `server` expires (0 if none).

    The SuperLink refuses to activate a node it still counts as online, with the same answer as
    for an unknown key. The session file, touched while connected and removed on a clean stop,
    tells the two apart: only right after a crash is that refusal worth waiting out."""
    path = state / SESSION_FILE
    try:
        if path.read_text() != server:
            return 0.0
        return path.stat().st_mtime + 2 * HEARTBEAT_INTERVAL + 10
    except OSError:
        return 0.0


def _supervise(
    node: ManagedProcess,
    executor: ManagedProcess,
    say: Callable[[str], None],
    name: str,
    server: str,
    stop_after: float | None,
    session: Path,
) -> None:
    started, announced, refusals = time.monotonic(), False, set[str]()
    while True:
        log = node.log_tail(80)
        if not announced and "SuperNode ID" in log:
            say(f"{name}: connected to {server}; waiting for work")
            atomic_write_text(session, server)
            announced = True
        if announced:
            os.utime(session)  # the SuperLink's session lives until two heartbeats after this
        for reason in set(re.findall(r"UntrustedRunError: (.+)", executor.log_tail(200))) - refusals:
            say(f"{name}: refused a run that is not fedtrain's: {reason}")
            refusals.add(reason)
        if not executor.alive:
            raise FedtrainError(f"{name} stopped: its SuperExec exited (log: {executor.log_path}).")
        if not node.alive:
            why = explain_exit(node.returncode, log)
            if announced and node.returncode in SHUT_DOWN_BY_FLOWER:
                why = "the server no longer accepts this client (was its key unregistered?)"
            raise FedtrainError(f"{name} stopped: {why} (log: {node.log_path}).")
        if any(marker in log for marker in GIVE_UP):
            raise FedtrainError(f"{name} stopped: {explain_exit(None, log)} (log: {node.log_path}).")
        if stop_after is not None and time.monotonic() - started > stop_after:
            return
        time.sleep(0.5)
