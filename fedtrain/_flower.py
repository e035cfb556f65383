"""Every place fedtrain reaches into Flower beyond its public API, in one module.

pyproject.toml pins flwr < 1.43; tests/test_flower_internals.py checks that every name used here still
exists, so an upgrade that moves one fails there, not in a federation. Why each is needed:

- the client's pinned runtime (clients/pinned_app.py): a SuperNode must run fedtrain's installed
  ClientApp only, never a run's bundle: the FAB "install" becomes a check and the app loader returns
  fedtrain's app; the SuperExec runs ClientApp tasks only, each through fedtrain's executor (a child
  of the warm worker, which runs Flower's ClientApp runtime in-process), and a task that died after
  pulling its message gets the error reply its runtime never sent.
- the SuperNode's heartbeat and polling (clients/supernode.py): 10 s instead of 30 s (Flower's allowed
  minimum); pulls for messages that back off from a fraction of a second after a message to a second
  while idle, instead of every 3 s, and a task's reply sent as soon as it is there, not half a second later.
- client-level DP (strategies/central_dp.py) overrides three hooks of Flower's DP wrappers: the noise
  (from a private generator, not NumPy's global one), the noisy clipped count, and the adaptive
  bound's update (whose sign Flower 1.42 has backwards).
- secure aggregation (server/secure_aggregation.py) drives the legacy SecAgg+ workflow's four stage
  methods with its own state: Flower offers SecAgg+ only as that workflow.
- checkpoints (server/checkpoint.py) save and restore the server optimizer state of Flower's FedOpt
  family and FedAvgM, held in these attributes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- secure aggregation: the legacy workflow
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState

SECAGG_STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")

# ---------------------------------------------------------------- client-level DP: hooks overridden
DP_NOISE_HOOK = "_add_noise_to_aggregated_arrays"  # both of Flower's server-side DP wrappers
DP_COUNT_HOOK = "_noisy_fraction"  # adaptive clipping: the noisy share of clipped updates
DP_BOUND_HOOK = "_geometric_update"  # adaptive clipping: C <- C exp(-lr (fraction - quantile))

# ---------------------------------------------------------------- checkpoints: server optimizer state
OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector")  # FedOpt's moments, FedAvgM's momentum


# ---------------------------------------------------------------- the client's pinned runtime


def pin_clientapp(install: Callable[..., Path], loader: Callable[..., Any]) -> None:
    """Flower's ClientApp runtime: `install` replaces the FAB's installation, `loader` the app loader."""
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.install_from_fab = install
    run_clientapp.get_load_client_app_fn = loader


def preload_clientapp_runtime() -> None:
    """Import what Flower's ClientApp runtime uses per task (a warm worker's tasks then import nothing)."""
    import httpx  # noqa: F401
    from flwr.common import serde  # noqa: F401
    from flwr.supercore import tls  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401


def _certificates(path: str | None, insecure: bool) -> bytes | None:
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    return validate_and_resolve_root_certificates(path, insecure)


def run_clientapp_task(
    address: str,
    token: str,
    insecure: bool,
    certificates: str | None,
    parent_pid: int | None,
    on_input: Callable[[Any, Any], None],
) -> None:
    """One task of Flower's ClientApp runtime (what `flwr-clientapp` runs) in this process; `on_input`
    gets (message, context) as soon as the task has pulled them. Ends with SystemExit, as Flower's does."""
    from flwr.supernode.runtime import run_clientapp as runtime

    pull = runtime.pull_task_input

    def pulled(client: Any) -> Any:
        message, context, run, fab = pull(client)
        on_input(message, context)
        return message, context, run, fab

    runtime.pull_task_input = pulled
    runtime.run_clientapp(
        runtime_api_address=address,
        token=token,
        insecure=insecure,
        certificates=_certificates(certificates, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def task_details(message: Any, context: Any) -> bytes:
    """What replying to a task's message needs, should its process die: the message's metadata and ids."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto

    proto = message_to_proto(remove_content_from_message(message)).SerializeToString()
    ids = json.dumps({"run_id": context.run_id, "node_id": context.node_id}).encode()
    return len(ids).to_bytes(4, "big") + ids + proto


def push_task_failure(
    address: str, token: str, insecure: bool, certificates: str | None, details: bytes, reason: str
) -> None:
    """For a task whose process died or hung after pulling its message (`task_details`): the error
    reply Flower's runtime never sent (ErrorCode.CLIENT_APP_CRASHED), and the task marked failed."""
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as MessageProto
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime import run_clientapp as runtime

    size = int.from_bytes(details[:4], "big")
    ids = json.loads(details[4 : 4 + size])
    proto = MessageProto()
    proto.ParseFromString(details[4 + size :])
    message = message_from_proto(proto)
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=_certificates(certificates, insecure),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    context = Context(run_id=int(ids["run_id"]), node_id=int(ids["node_id"]), node_config={}, state=RecordDict(),
                      run_config={})  # fmt: skip
    try:
        runtime.push_message(client, Message(Error(ErrorCode.CLIENT_APP_CRASHED, reason), reply_to=message), context)
    finally:
        runtime.push_task_output(client, None, SubStatus.FAILED, reason)
        client.close()


def launch_accepted() -> Any:
    from flwr.supercore.superexec.executor import LaunchResult

    return LaunchResult.accepted()


def launch_failed(why: str) -> Any:
    from flwr.supercore.superexec.executor import LaunchResult

    return LaunchResult.failed(why)


def run_superexec(executor: Any) -> None:
    """Flower's SuperExec (`flower-superexec`, its arguments from sys.argv), ClientApp tasks only, each
    launched through `executor` (an object with Flower's Executor protocol)."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec as loop
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})
    loop.get_executor = lambda *_args, **_kwargs: executor
    flower_superexec()


# ---------------------------------------------------------------- the SuperNode's heartbeat


def set_heartbeat(seconds: int) -> None:
    """Every heartbeat a SuperNode of this process sends comes `seconds` apart."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = seconds
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = seconds


FLOWER_IDLE_SLEEP = 3  # flwr 1.42's SuperNode: seconds between pulls that found no message
FLOWER_WAIT_SLEEP = 0.5  # ... and between looks for a task's reply, or a reply object's content


class _PollingClock:
    """The SuperNode loop's `time` module, with its two sleeps replaced: pulls that find nothing back
    off from `idle` to `idle_max` (x `growth` each) and start again at `idle` after a message; waits
    for a reply (in this process's memory) take `wait` seconds instead of Flower's half second."""

    def __init__(self, idle: float, idle_max: float, growth: float, wait: float) -> None:
        self.idle, self.idle_max, self.growth, self.wait = idle, idle_max, growth, wait
        self.next_idle = idle

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP:
            time.sleep(self.next_idle)
            self.next_idle = min(self.idle_max, self.next_idle * self.growth)
        elif seconds == FLOWER_WAIT_SLEEP:
            time.sleep(self.wait)
        else:
            time.sleep(seconds)

    def active(self) -> None:
        self.next_idle = self.idle

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def set_supernode_polling(idle: float, idle_max: float, growth: float, wait: float) -> None:
    """A SuperNode of this process pulls messages every `idle` seconds after one arrived, backing off by
    `growth` to `idle_max` while none come, and looks for a task's reply every `wait` seconds."""
    from flwr.supernode import start_client_internal as loop

    clock = _PollingClock(idle, idle_max, growth, wait)
    pull = loop._pull_and_store_message

    def pulled(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.active()
        return run_id

    loop.time = clock  # type: ignore[assignment]
    loop._pull_and_store_message = pulled


def run_supernode() -> None:
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


__all__ = [
    "DP_BOUND_HOOK",
    "DP_COUNT_HOOK",
    "DP_NOISE_HOOK",
    "MAIN_CONFIGS_RECORD",
    "MAIN_PARAMS_RECORD",
    "OPTIMIZER_STATE",
    "SECAGG_STAGES",
    "FitIns",
    "Parameters",
    "SecAggPlusWorkflow",
    "WorkflowKey",
    "WorkflowState",
    "bytes_to_ndarray",
    "parameters_to_ndarrays",
    "launch_accepted",
    "launch_failed",
    "pin_clientapp",
    "preload_clientapp_runtime",
    "push_task_failure",
    "run_clientapp_task",
    "run_superexec",
    "run_supernode",
    "set_heartbeat",
    "set_supernode_polling",
    "task_details",
]
