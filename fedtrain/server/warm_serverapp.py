"""The server's SuperExec: each ServerApp run in a child forked from a warm worker.

Flower's SuperLink starts `flower-superexec`, which starts a new `flwr-serverapp` process for every
run: a Python start and the imports of Flower, torch and fedtrain's server (5-10 s of CPU here) between
`fedtrain server` submitting its run and the first round's messages, every run. `fedtrain server`'s
SuperLink starts this module instead (server/control_guard.py), with the same arguments: it forks a warm
worker (warm_worker.py) that has imported all of that while the server waited for its clients,
and runs each ServerApp run in a child forked from it, with Flower's own ServerApp runtime (the same
Runtime API, heartbeats, log upload and final status). The run is the server's own code: its FAB holds
only the pyproject.toml that `fedtrain server` wrote (server/deployment.py).

A run's child that dies without its runtime's final status (killed, a crash in native code) gets that
status pushed for it (`reply_failure`), so the SuperLink ends the run at once and `fedtrain server` says so.
"""

from __future__ import annotations

import sys
from typing import Any

RUN_TIMEOUT = 10 * 365 * 86400.0  # a run may take as long as it takes; `fedtrain server` bounds it (run_timeout)


def preload() -> None:
    """What a ServerApp run needs, imported once in the warm worker: Flower's runtime, fedtrain's ServerApp
    and everything its loop imports (torch, the strategies, the accountants, matplotlib for the plot)."""
    import torch

    torch.set_num_threads(1)  # no thread pool in the worker (runs are forked from it)
    import matplotlib

    matplotlib.use("Agg")
    # torch.optim's first optimizer (a server-side optimizer strategy) imports torch._dynamo: seconds
    import torch._dynamo  # noqa: F401

    from fedtrain import _flower
    from fedtrain.privacy import accountants
    from fedtrain.server import app, checkpoint, plots  # noqa: F401 - imported for the runs forked later

    _flower.preload_serverapp_runtime()
    _flower.set_object_pull_backoff()
    accountants.warm_rdp([])  # Opacus's RDP cached from here on


def run_task(request: dict[str, Any], channel: Any) -> int:
    """In a run's child: Flower's ServerApp runtime for one run."""
    from fedtrain import _flower

    channel.running(RUN_TIMEOUT, b"")
    try:
        _flower.run_serverapp_task(
            str(request["runtime_api_address"]),
            str(request["token"]),
            bool(request["insecure"]),
            request.get("root_certificates_path"),
            request.get("parent_pid"),
        )
    except SystemExit:  # Flower's runtime ends every run this way, after pushing its status
        channel.finished()
        raise
    return 1  # its runtime returned without exiting: not how a Flower run ends


def reply_failure(request: dict[str, Any], _details: bytes, why: str) -> None:
    """In a helper child, for a run whose child died or hung: the failed status its runtime never pushed."""
    from fedtrain import _flower

    _flower.push_serverapp_failure(
        str(request["runtime_api_address"]),
        str(request["token"]),
        bool(request["insecure"]),
        request.get("root_certificates_path"),
        f"fedtrain server: the ServerApp {why}",
    )


def superexec_main() -> None:
    """Flower's SuperExec for ServerApp runs only, each in a child of a warm worker; flower-superexec's arguments."""
    from fedtrain import warm_worker

    # forked before Flower's SuperExec starts any thread: the worker stays single-threaded
    worker = warm_worker.start(warm_worker.WarmWorker(run_task, reply_failure), preload)
    from fedtrain import _flower

    sys.argv[0] = "flower-superexec"
    _flower.run_superexec(warm_worker.WarmExecutor(worker), "serverapp")


if __name__ == "__main__":
    superexec_main()
