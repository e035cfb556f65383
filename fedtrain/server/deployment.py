"""`fedtrain server`: a real federation on Flower's Deployment Engine.

1. A SuperLink with TLS and SuperNode authentication, on a loopback port only this process knows.
2. The Fleet gateway on the public port: TLS, Fleet API only (see fleet_gateway.py).
   The kit's client keys are registered before the gateway opens.
3. A wait (bounded) for `min_clients` SuperNodes online.
4. The fedtrain run submitted as a FAB holding only a pyproject.toml: its components name the
   installed fedtrain apps and its [tool.flwr.app.config] is the resolved config, so no code ships.
5. Progress from the run directory's metrics.json, status from the SuperLink; exit 0 only when the
   run finished as completed. Every child is stopped on the way out, also on errors and signals.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrain import _flower
from fedtrain.config import Config, toml_value
from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_text
from fedtrain.processes import (
    ManagedProcess,
    check_port_free,
    flower_env,
    free_port,
    run_tool,
    superexec_env,
    tool,
    wait_for_port,
)
from fedtrain.security.key_handover import HandedKey, hand_over
from fedtrain.security.kit_checks import check_server_kit
from fedtrain.security.kit_data import DATA_FILE, agree
from fedtrain.security.kits import read_kit
from fedtrain.server import checkpoint
from fedtrain.server.control_guard import TOKEN_FILE_ENV, new_token, write_cli_credentials
from fedtrain.server.fleet_auth import NodeKeys
from fedtrain.server.fleet_gateway import FleetGateway
from fedtrain.server.fleet_limits import gateway_limits
from fedtrain.server.history import METRICS_JSON
from fedtrain.server.model_files import MODEL_FILE
from fedtrain.server.tracking import mlflow_store
from fedtrain.strategies import make_strategy

CONNECTION = "fedtrain"
POLL_SECONDS = 1.0
ONLINE_POLL_SECONDS = 0.2  # a look at who is online: one local request (in this process), a few ms
STATUS_SECONDS = 20.0
START_SECONDS = 300.0  # a run still pending after this long: its ServerApp never started (a dead SuperExec)


@dataclass
class ServerOptions:
    kit: Path
    config: Config
    host: str = "0.0.0.0"
    port: int = 9092
    min_clients: int = 2
    wait_timeout: float = 600.0
    run_timeout: float = 24 * 3600.0
    database: Path | None = None
    insecure: bool = False
    passphrase: bytes | None = None
    resume: bool = False  # continue the run in run_dir after its last complete round
    secret_env: tuple[str, ...] = ()  # variables that hold secrets (--passphrase-env): no child inherits them


def deployment_config(options: ServerOptions, run_dir: Path, declared: Config | None = None) -> Config:
    """The run's config: the model must be described (a server holds no data), keys from the kit.

    Args:
        options: the server's options, with the config from --config.
        run_dir: the run directory.
        declared: the kit's data description (federation.toml), which the clients check their data
            against: the config may leave it out, and must not contradict it.

    Returns:
        The config the ServerApp runs with.

    Raises:
        FedtrainError: the model's input is not described, contradicts the kit, or the strategy is bad.
    """
    config = options.config
    if declared is not None:
        config = agree(config, declared, str(options.kit / DATA_FILE))
    if config.privacy.tuning_trials is not None:  # the clients refuse it too (clients/handlers.py)
        raise FedtrainError(
            "private hyperparameter tuning runs only in simulation (`fedtrain tune`): a server that sees every "
            "trial is not covered by its guarantee; remove the tuning_* settings."
        )
    if not config.data.input_shape or not (config.data.num_classes or config.data.labels):
        raise FedtrainError(
            "a server holds no data, so the config must give input_shape and num_classes (or labels); "
            "add them to the --config file."
        )
    kit = options.kit.resolve()
    population = len(read_kit(kit, "server")["clients"])  # the clients this federation was provisioned for
    if options.min_clients > population:
        raise FedtrainError(
            f"--min-clients {options.min_clients} is more than the {population} clients this server's kit was "
            "provisioned for; lower it or provision more clients."
        )
    config = config.replace(
        run_dir=str(run_dir.resolve()),
        key_file=str(kit / "model.key"),
        kit=str(kit),
        clients=population,
        min_available_clients=config.federation.min_available_clients or options.min_clients,
        # the ServerApp runs in another process, maybe elsewhere: MLflow's default ./mlruns is the server's
        mlflow_uri=mlflow_store.absolute(config.deployment.mlflow_uri)
        if "mlflow" in (config.deployment.track or [])
        else None,
    )
    make_strategy(config)  # its name and parameters, before anything starts
    return config


def write_app(app_dir: Path, config: Config, resume: bool = False) -> Path:
    """A FAB source with no code: components point at the installed fedtrain, config is the run's."""
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedtrain-run"',
        'version = "1.0.0"',
        'description = "A fedtrain federated run"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedtrain"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedtrain.server.app:app"',
        'clientapp = "fedtrain.clients.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value)}" for key, value in config.to_run_config().items()),
        *(["fedtrain-resume = true"] if resume else []),
    ]
    atomic_write_text(app_dir / "pyproject.toml", "\n".join(lines) + "\n")
    return app_dir


def _flwr_json(args: list[str], env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    result = run_tool([tool("flwr"), *args, "--format", "json"], env, timeout)
    try:
        data = json.loads(result.stdout[result.stdout.index("{") :])
    except (ValueError, json.JSONDecodeError):
        data = {}
    if result.returncode != 0 or not data.get("success", False):
        detail = (data.get("error-message") or result.stderr or result.stdout).strip().splitlines()
        raise FedtrainError(
            f"`flwr {args[0]} {args[1] if len(args) > 1 else ''}` failed: {detail[-1] if detail else 'no output'}."
        )
    return data


class Server:
    """One `fedtrain server` invocation; use as a context manager so every child is stopped."""

    def __init__(self, options: ServerOptions, run_dir: Path, say: Callable[[str], None]) -> None:
        self.options = options
        self.run_dir = run_dir
        self.say = say
        self.checked = check_server_kit(options.kit, options.passphrase)  # every file, before anything starts
        self.info = self.checked.info
        self.config = deployment_config(options, run_dir, self.checked.data)
        self.kit = options.kit.resolve()
        self.superlink: ManagedProcess | None = None
        self.gateway: FleetGateway | None = None
        self.flwr_home = run_dir / ".flwr"
        self.env = flower_env(self.flwr_home, hide=options.secret_env)
        self.internal_port = 0
        self.tls_key: HandedKey | None = None
        self.token: HandedKey | None = None  # the Control API's bearer token, for the SuperLink

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.superlink is not None:
            self.superlink.stop()
            self.superlink = None
        if self.tls_key is not None:
            self.tls_key.close()
            self.tls_key = None
        if self.token is not None:
            self.token.close()
            self.token = None

    def start(self) -> None:
        check_port_free(self.options.host, self.options.port)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.internal_port = free_port()
        self.flwr_home.mkdir(mode=0o700, exist_ok=True)
        insecure = self.options.insecure
        trust = "insecure = true" if insecure else f'root-certificates = "{self.kit / "ca.crt"}"'
        atomic_write_text(
            self.flwr_home / "config.toml",
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.internal_port}"\n{trust}\n',
        )
        # Flower cannot read an encrypted key: a protected one is decrypted into memory only (key_handover).
        if self.checked.unlocked is not None:
            self.tls_key = hand_over(self.checked.unlocked, "server", "server.key")
        key = self.tls_key.path if self.tls_key else self.kit / "server.key"
        tls = (self.kit / "server.crt", key, self.kit / "ca.crt")
        security = (
            ["--insecure"]  # Flower's node authentication needs TLS: insecure means unauthenticated nodes
            if insecure
            else ["--ssl-ca-certfile", str(tls[2]), "--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1]),
                  "--enable-supernode-auth"]
        )  # fmt: skip
        argv = [
            sys.executable, "-m", "fedtrain.server.control_guard",  # flower-superlink, its Control API behind a token
            *security,
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.internal_port),
        ]  # fmt: skip
        if self.options.database is not None:
            argv += ["--database", str(self.options.database)]
        self.token = self.control_token()
        env = {**superexec_env(self.env), TOKEN_FILE_ENV: str(self.token.path)}  # its SuperExec inherits it
        fds = (*(self.tls_key.pass_fds if self.tls_key else ()), *self.token.pass_fds)
        self.superlink = ManagedProcess("SuperLink", argv, env, self.run_dir / "superlink.log", pass_fds=fds)
        wait_for_port("127.0.0.1", self.internal_port, 60, self.superlink)
        if not insecure:
            self.register_clients()  # before the public port opens: a client never meets an unknown-key refusal
        self.gateway = self.fleet_gateway(None if insecure else tls)
        self.gateway.start()
        mode = "NO TLS, unauthenticated nodes" if insecure else "TLS, authenticated nodes only"
        self.say(f"SuperLink ready; Fleet API ({mode}) on {self.options.host}:{self.options.port}")

    def control_token(self) -> HandedKey:
        """A fresh Control API token, for the SuperLink (handed over in memory, like a decrypted key) and
        this server's `flwr` calls (its private FLWR_HOME)."""
        token = new_token()
        write_cli_credentials(self.flwr_home, f"127.0.0.1:{self.internal_port}", token)
        return hand_over(token.encode(), "server", "control.token")

    def fleet_gateway(self, tls: tuple[Path, Path, Path] | None) -> FleetGateway:
        """The public port, bounded for this run's model, refusing unsigned requests unless insecure."""
        keys = None
        if tls is not None:
            keys = NodeKeys.from_files(self.kit / "clients" / f"{name}.pub" for name in self.info["clients"])
        limits = gateway_limits(self.config)
        return FleetGateway(self.options.host, self.options.port, self.internal_port, tls, limits, keys)

    def register_clients(self) -> None:
        with self.control() as client:
            for name in self.info["clients"]:
                _flower.register_node(client, self.kit / "clients" / f"{name}.pub")
        self.say(f"registered {len(self.info['clients'])} client keys: {', '.join(self.info['clients'])}")

    @contextlib.contextmanager
    def control(self) -> Iterator[Any]:
        """The SuperLink's Control API, in this process (the server's own `flwr` credentials); any failure of it
        is one sentence."""
        try:
            with _flower.control_client(self.flwr_home, CONNECTION) as client:
                yield client
        except FedtrainError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - Flower's client raises httpx's, click's, its own
            detail = str(getattr(exc, "message", "") or exc).strip().splitlines()
            raise FedtrainError(
                f"the SuperLink's Control API failed: {detail[-1] if detail else type(exc).__name__}; "
                f"see {self.run_dir / 'superlink.log'}."
            ) from None

    def wait_for_clients(self) -> None:
        deadline = time.monotonic() + self.options.wait_timeout
        wanted, last = self.options.min_clients, -1
        with self.control() as client:
            while True:
                online = _flower.online_nodes(client)
                if online != last:
                    self.say(f"{online}/{wanted} clients online")
                    last = online
                if online >= wanted:
                    return
                if time.monotonic() > deadline:
                    raise FedtrainError(
                        f"only {online} of {wanted} clients came online within {self.options.wait_timeout:.0f} s; "
                        "check that the clients can reach this server and use kits from this federation."
                    )
                time.sleep(ONLINE_POLL_SECONDS)

    def submit(self) -> str:
        app_dir = write_app(self.run_dir / "app", self.config, self.options.resume)
        data = _flwr_json(["run", str(app_dir), CONNECTION], self.env, timeout=120)
        run_id = str(data["run-id"])
        self.say(f"submitted run {run_id}; run directory {self.run_dir}")
        return run_id

    def follow(self, run_id: str, on_round: Callable[[dict[str, Any]], None]) -> str:
        """Report rounds as the ServerApp records them; return the final status.

        Each `flwr ls` is a Python process start, costly beside the clients on a small machine: the
        status is asked every STATUS_SECONDS, and promptly once the final model file appears."""
        submitted = time.monotonic()
        deadline = submitted + self.options.run_timeout
        seen, next_status, earlier_model = 0, 0.0, _mtime(self.run_dir / MODEL_FILE)
        while True:
            seen = self._report_new_rounds(seen, on_round)
            final_model = _mtime(self.run_dir / MODEL_FILE) != earlier_model
            if final_model or time.monotonic() >= next_status:
                runs = _flwr_json(["ls", CONNECTION, "--run-id", run_id], self.env)["runs"]
                status = str(runs[0].get("status", "unknown")) if runs else "unknown"
                if status.startswith("finished"):
                    self._report_new_rounds(seen, on_round, final=True)
                    return status
                if status in ("pending", "starting") and time.monotonic() - submitted > START_SECONDS:
                    raise FedtrainError(
                        f"the SuperLink did not start run {run_id}'s ServerApp within {START_SECONDS:.0f} s "
                        f"(its status is {status}); see {self.run_dir / 'superlink.log'}."
                    )
                next_status = time.monotonic() + STATUS_SECONDS
            if self.superlink is not None and not self.superlink.alive:
                raise FedtrainError(
                    f"the SuperLink exited with code {self.superlink.returncode}; see {self.superlink.log_path}."
                )
            if time.monotonic() > deadline:
                raise FedtrainError(f"run {run_id} did not finish within {self.options.run_timeout:.0f} s.")
            time.sleep(POLL_SECONDS)

    def _report_new_rounds(self, seen: int, on_round: Callable[[dict[str, Any]], None], final: bool = False) -> int:
        """Report rows after the first `seen`; a row whose federated evaluation rides on the next round's
        train messages waits for it (until the run is `final`). Returns how many are reported."""
        try:
            rows = json.loads((self.run_dir / METRICS_JSON).read_text())
        except (OSError, json.JSONDecodeError):
            return seen
        for row in rows[seen:]:
            if row.get("federated_pending") and not final:
                break
            on_round(row)
            seen += 1
        return seen


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def serve(options: ServerOptions, run_dir: Path, say: Callable[[str], None], on_round: Callable[[dict], None]) -> None:
    """Run the whole federation; raises FedtrainError unless the run finished as completed."""
    with Server(options, run_dir, say) as server:
        if options.resume:
            done = checkpoint.preflight(server.config)  # a wrong key or config fails before anything starts
            say(f"resuming the run in {run_dir} after round {done} of {server.config.federation.rounds}")
        server.start()
        server.wait_for_clients()
        run_id = server.submit()
        status = server.follow(run_id, on_round)
        if "completed" not in status:
            raise FedtrainError(f"run {run_id} ended as {status}; see {run_dir / 'superlink.log'}.")
        say(f"run {run_id} {status}")
