"""A fedtrain client executes fedtrain's installed ClientApp and nothing else, each task in a child
forked from a warm worker.

Flower's SuperExec starts `flwr-clientapp` for each task; that process unpacks the run's FAB onto
disk and sys.path and imports whatever component the FAB names, so whoever controls the SuperLink
could run code on every client. A fedtrain client therefore runs the SuperNode with
`--isolation process` and its own SuperExec (`python -m fedtrain.clients.pinned_app`), which:

- takes only ClientApp tasks (a run may ask for an agent app, which is refused), and
- runs each in a child of its warm worker (warm_worker.py): a process that imported torch,
  Opacus, Flower and fedtrain and read the shard once, when `fedtrain client` started. The child
  runs Flower's own ClientApp runtime (same Runtime API, heartbeats, replies), except that the FAB
  is checked in memory (it must hold nothing but a pyproject.toml whose components are fedtrain's
  own), nothing of it is written or imported, and the ClientApp is the installed fedtrain package's.
  A refused run gets an error reply, so the server's round goes on without this client.

A task that outlives the run's round_timeout is stopped, and one that dies without replying gets an
error reply at once (`reply_failure`), so neither holds up the next round.

The hooks replace names inside flwr 1.42's modules (fedtrain/_flower.py, pinned in pyproject.toml);
tests/test_flower_internals.py fails if a Flower upgrade moves them.
"""

from __future__ import annotations

import io
import logging
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CLIENT_APP_REF = "fedtrain.clients.app:app"
SERVER_APP_REF = "fedtrain.server.app:app"
# What a fedtrain FAB holds: the server's generated pyproject.toml and Flower's hash manifest.
ALLOWED_FAB_FILES = {"pyproject.toml", ".info/CONTENT"}
# A task may run the run's round_timeout (after that the server no longer waits for it), plus this
# share and margin for its reply to travel; one whose run sets no usable timeout gets DEFAULT_TIMEOUT.
TIMEOUT_SHARE, TIMEOUT_MARGIN, DEFAULT_TIMEOUT = 1.1, 5.0, 600.0
WARM_ARGS = ("--warm-data", "--warm-kit")  # this SuperExec's own options, taken out before Flower's parse them
WARM_READY = "fedtrain: warm worker ready"  # the SuperExec's line once its worker has loaded everything
READY_TIMEOUT = 600.0  # seconds for the worker to load (imports and the shard: 5-20 s here; more on a busy node)

log = logging.getLogger("fedtrain")


class UntrustedRunError(Exception):
    """The run asks this client to execute something other than fedtrain's installed ClientApp."""


def check_fab(content: bytes) -> None:
    """Accept only a code-free FAB whose components are fedtrain's own; raise UntrustedRunError otherwise."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = set(archive.namelist())
        extra = sorted(names - ALLOWED_FAB_FILES)
        if extra:
            raise UntrustedRunError(
                f"the run ships files ({', '.join(extra[:5])}); a fedtrain client only runs fedtrain's installed code"
            )
        config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, OSError, ValueError) as exc:
        raise UntrustedRunError(f"the run's app bundle is not a fedtrain run ({type(exc).__name__})") from None
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components")
    if components != {"serverapp": SERVER_APP_REF, "clientapp": CLIENT_APP_REF}:
        raise UntrustedRunError(f"the run names components {components!r}, not fedtrain's ClientApp")


def _check_instead_of_install(fab_content: bytes, *_args: object, **_kwargs: object) -> Path:
    check_fab(fab_content)
    return Path()  # nothing installed: the ClientApp comes from the fedtrain package


def _load_fedtrain_client_app(*_args: object, **_kwargs: object):
    def load(*_ids: str):
        from fedtrain.clients.app import app

        return app

    return load


def task_timeout(run_config: Mapping[str, Any]) -> float:
    """How long a task of a run with `run_config` may run: the run's round_timeout, with some margin."""
    value = run_config.get("round-timeout")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e7:
        return DEFAULT_TIMEOUT
    return float(value) * TIMEOUT_SHARE + TIMEOUT_MARGIN


# ---------------------------------------------------------------- in the warm worker and its tasks


def preload(data: str | None, kit: str | None) -> None:
    """What every task needs, loaded once in the warm worker: fedtrain's ClientApp and everything its
    handlers import (torch, Opacus), the pinned runtime, and the shard as the kit describes it."""
    import torch

    torch.set_num_threads(1)  # no thread pool in the worker (tasks are forked from it); tasks use one anyway

    # torch.optim's first optimizer imports torch._dynamo: seconds of a task's CPU if every task did it
    import torch._dynamo  # noqa: F401

    from fedtrain import _flower
    from fedtrain.clients import app, handlers, trainer  # noqa: F401 - imported for the tasks forked later
    from fedtrain.privacy import accountants, calibration, lifetime, releases  # noqa: F401

    accountants.warm_rdp([])  # Opacus's RDP cached from here on: a task inherits what the worker computed

    _flower.pin_clientapp(_check_instead_of_install, _load_fedtrain_client_app)
    _flower.preload_clientapp_runtime()
    _flower.set_object_pull_backoff()  # a task asks for its message while the SuperNode still stores it
    # Opacus's import gives the root logger a handler; Flower's logger has its own: say each line once
    logging.getLogger("flwr").propagate = False
    if data and kit:
        from fedtrain.components import task_for
        from fedtrain.security.kit_data import read_data_file

        try:
            declared = read_data_file(Path(kit))
            if declared is not None:
                handlers.read_shard(data, declared, task_for(declared).target_kind)
        except Exception as exc:  # noqa: BLE001 - a task reads it then; `fedtrain client` checked it already
            log.warning("the warm worker could not read %s ahead of tasks: %s", data, exc)


def run_task(request: dict[str, Any], channel: Any) -> int:
    """In a task's child: Flower's ClientApp runtime for one task, with the FAB checked and fedtrain's
    app pinned (both set in the worker); it tells its worker when it has its message, and how long
    the run lets it take."""
    from fedtrain import _flower
    from fedtrain.clients import handlers
    from fedtrain.privacy import accountants

    def on_input(message: Any, context: Any) -> None:
        channel.running(task_timeout(context.run_config), _flower.task_details(message, context))

    try:
        _flower.run_clientapp_task(
            str(request["runtime_api_address"]),
            str(request["token"]),
            bool(request["insecure"]),
            request.get("root_certificates_path"),
            request.get("parent_pid"),
            on_input,
        )
    except SystemExit:  # Flower's runtime ends every task this way, after replying
        learned = [{"shard": args} for args in handlers.shard_reads()]
        channel.learned(learned + [{"rdp": pair} for pair in accountants.rdp_pairs()])
        channel.finished()
        raise
    return 1  # its runtime returned without exiting: not how a Flower task ends


def reply_failure(request: dict[str, Any], details: bytes, why: str) -> None:
    """In a helper child, for a task that had its message and died or hung: the error reply (and the
    task's end) that its own runtime never sent."""
    from fedtrain import _flower

    _flower.push_task_failure(
        str(request["runtime_api_address"]),
        str(request["token"]),
        bool(request["insecure"]),
        request.get("root_certificates_path"),
        details,
        f"fedtrain client: {why}",
    )


def learn(items: list[Any]) -> None:
    """In the warm worker, after a task: read the shards it had to read itself, and compute the RDP of
    the mechanisms it accounted, so that later tasks find both done (each its own JSON object)."""
    from fedtrain.clients import handlers
    from fedtrain.privacy import accountants

    pairs = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("shard"), list):
            try:
                handlers.read_shard_again(*item["shard"])
            except Exception as exc:  # noqa: BLE001 - the next task reads it itself
                log.warning("the warm worker could not keep a shard for later tasks: %s", exc)
        pair = item.get("rdp")
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, float) for v in pair):
            pairs.append(pair)
    accountants.warm_rdp(pairs)


def _own_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """This SuperExec's own options (WARM_ARGS) and the rest, for Flower's parser."""
    own, rest, it = {}, [], iter(argv)
    for arg in it:
        if arg in WARM_ARGS:
            own[arg] = next(it, "")
        else:
            rest.append(arg)
    return own, rest


def superexec_main() -> None:
    """Flower's SuperExec, restricted to ClientApp tasks run in children of a warm worker.

    Takes flower-superexec's arguments, and `--warm-data PATH --warm-kit KIT`: the shard the worker
    reads ahead of the first task, as the kit describes it. Once the worker has loaded everything it
    prints WARM_READY (`fedtrain client` starts its SuperNode only then, so a client counts as online
    to the server only when it can run a task at once), then serves tasks as soon as the SuperNode's
    runtime API listens."""
    from functools import partial

    from fedtrain import warm_worker

    own, sys.argv[1:] = _own_args(sys.argv[1:])
    # forked before Flower's SuperExec starts any thread: the worker stays single-threaded
    worker = warm_worker.start(
        warm_worker.WarmWorker(run_task, reply_failure, learn),
        partial(preload, own.get("--warm-data"), own.get("--warm-kit")),
    )
    if not worker.wait_ready(READY_TIMEOUT):
        worker.stop()
        raise SystemExit(f"the warm worker did not load within {READY_TIMEOUT:.0f} s (see the lines above)")
    print(WARM_READY, flush=True)
    _wait_for_runtime_api(sys.argv[1:], READY_TIMEOUT)
    from fedtrain import _flower

    _flower.run_superexec(warm_worker.WarmExecutor(worker), "clientapp")


def _wait_for_runtime_api(argv: list[str], timeout: float) -> None:
    """Until the SuperNode's runtime API (`--runtime-api-address`) accepts connections, or `timeout` seconds:
    Flower's SuperExec would otherwise back off from its first failed asks."""
    import socket
    import time

    address = argv[argv.index("--runtime-api-address") + 1] if "--runtime-api-address" in argv else ""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while host and port.isdigit() and time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)


if __name__ == "__main__":
    superexec_main()
