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
- the simulation's message store (simulation.py): Flower 1.42's in-memory LinkState answers a node's
  `get_message_ins` by scanning and re-validating every stored message, and the Simulation Engine asks
  it for every node every 0.1 s: nodes x messages checks per pass (8.6 s at 1000 x 1000 on this
  machine), so 1000 clients all training never finished a round. `IndexedLinkState` keeps each node's
  undelivered messages and validates only those, with Flower's own checks.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# secure aggregation: the legacy workflow; simulation: the message store (in_memory_linkstate, NodeStatus)
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.server.superlink.linkstate import in_memory_linkstate as _in_memory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from flwr.supercore.constant import NodeStatus

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
    import httpcore  # noqa: F401 - httpx imports it when its first client is made
    import httpx  # noqa: F401
    from flwr.common import serde  # noqa: F401
    from flwr.supercore import tls  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401


def _runtime_client(address: str, token: str, insecure: bool, certificates: str | None, component: str) -> Any:
    """A Runtime API client as Flower's own `component` ("flwr-clientapp", "flwr-serverapp") makes it."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=_certificates(certificates, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )


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
    from flwr.supernode.runtime import run_clientapp as runtime

    size = int.from_bytes(details[:4], "big")
    ids = json.loads(details[4 : 4 + size])
    proto = MessageProto()
    proto.ParseFromString(details[4 + size :])
    message = message_from_proto(proto)
    client = _runtime_client(address, token, insecure, certificates, "flwr-clientapp")
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


def run_superexec(executor: Any, task_type: str) -> None:
    """Flower's SuperExec (`flower-superexec`, its arguments from sys.argv), for tasks of one type only
    ("clientapp" on a client, "serverapp" on the server), each launched through `executor` (an object
    with Flower's Executor protocol)."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec as loop
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    AutoExecPlugin.supported_task_types = frozenset({TaskType(f"flwr-{task_type}")})
    loop.get_executor = lambda *_args, **_kwargs: executor
    flower_superexec()


# ---------------------------------------------------------------- the ServerApp's runtime


def preload_serverapp_runtime() -> None:
    """Import what Flower's ServerApp runtime uses (a warm worker's run then imports nothing)."""
    import httpcore  # noqa: F401 - httpx imports it when its first client is made
    import httpx  # noqa: F401
    from flwr.server import run_serverapp  # noqa: F401
    from flwr.superlink.grid import http_grid  # noqa: F401
    from flwr.superlink.runtime import run_serverapp as runtime  # noqa: F401


def run_serverapp_task(
    address: str, token: str, insecure: bool, certificates: str | None, parent_pid: int | None
) -> None:
    """One run of Flower's ServerApp runtime (what `flwr-serverapp` runs) in this process, its output mirrored
    to the SuperLink's run log as Flower's does. Ends with SystemExit, as Flower's does."""
    from queue import Queue

    from flwr.supercore.logger import mirror_output_to_queue, restore_output
    from flwr.superlink.runtime.run_serverapp import run_serverapp

    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    try:
        run_serverapp(
            runtime_api_address=address,
            log_queue=log_queue,
            token=token,
            insecure=insecure,
            certificates=_certificates(certificates, insecure),
            parent_pid=parent_pid,
            runtime_dependency_install=False,
        )
    finally:
        restore_output()


def push_serverapp_failure(address: str, token: str, insecure: bool, certificates: str | None, reason: str) -> None:
    """For a ServerApp run whose process died or hung: the failed status its runtime never pushed, so the
    SuperLink ends the run at once (`fedtrain server` then says why) instead of waiting out its heartbeat."""
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest

    client = _runtime_client(address, token, insecure, certificates, "flwr-serverapp")
    try:
        client.PushTaskOutput(PushTaskOutputRequest(context=None, sub_status=SubStatus.FAILED, details=reason))
    finally:
        client.close()


def set_serverapp_superexec(command: list[str]) -> None:
    """The SuperLink of this process starts `command` (with flower-superexec's arguments) as its SuperExec for
    ServerApp runs, instead of `flower-superexec`."""
    import importlib

    # the module, not the function of the same name that flwr.superlink.cli exports
    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    flower = getattr(flower_superlink._get_superexec_command, "fedtrain_exact", flower_superlink._get_superexec_command)

    def superexec_command(*args: Any, **kwargs: Any) -> list[str]:
        argv = list(flower(*args, **kwargs))
        return [*command, *argv[1:]]  # argv[0] is "flower-superexec"

    superexec_command.fedtrain_exact = flower  # type: ignore[attr-defined]
    flower_superlink._get_superexec_command = superexec_command  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the SuperNode's heartbeat


def set_heartbeat(seconds: int) -> None:
    """Every heartbeat a SuperNode of this process sends comes `seconds` apart."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = seconds
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = seconds


# ---------------------------------------------------------------- the Control API, in this process


@contextlib.contextmanager
def control_client(flwr_home: Path, connection: str) -> Iterator[Any]:
    """Flower's Control API client for the SuperLink connection `connection` of `flwr_home`'s config, built as
    `flwr` builds it (its TLS, its stored credentials), in this process: each `flwr` call is a Python start of
    about a second of CPU, which `fedtrain server` spent on every key registration and every look at who is
    online while its clients were starting on the same cores."""
    import io
    import os

    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.supercore.credential_store import file_credential_store as store

    previous, default_store = os.environ.get("FLWR_HOME"), store.CREDENTIAL_FILE_PATH
    os.environ["FLWR_HOME"] = str(flwr_home)  # where Flower's CLI code reads the connection
    store.CREDENTIAL_FILE_PATH = flwr_home / "credentials.yaml"  # ... and its credentials (set at its import)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "Using SuperLink: ...", a CLI's line
            client = init_http_client_from_connection(read_superlink_connection(connection))
        try:
            yield client
        finally:
            client.close()
    finally:
        store.CREDENTIAL_FILE_PATH = default_store
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous


def register_node(client: Any, public_key_file: Path) -> int:
    """Register a SuperNode's public key (as `flwr supernode register`); returns its node id."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest

    return int(client.RegisterNode(RegisterNodeRequest(public_key=try_load_public_key(public_key_file))).node_id)


def online_nodes(client: Any) -> int:
    """How many registered SuperNodes are online (as `flwr supernode list` shows them)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    return sum(1 for node in client.ListNodes(ListNodesRequest()).nodes_info if node.status == "online")


# ---------------------------------------------------------------- object pulls


OBJECT_PULL_FIRST, OBJECT_PULL_CAP = 0.02, 0.5  # seconds: fedtrain's retries of an object not yet stored


def set_object_pull_backoff(initial: float = OBJECT_PULL_FIRST, cap: float = OBJECT_PULL_CAP) -> None:
    """Every object pull of this process retries a not-yet-stored object after `initial` seconds, doubling
    up to `cap` (Flower: 1 s, doubling to 10 s).

    A message is announced before its objects are stored: the SuperNode stores an incoming message, then
    pulls its objects, while the task it starts already asks for them; the SuperLink holds a pushed
    message before the pusher's objects. With Flower's 1 s first retry a task waited 1-3 s per message.
    Each retry is one local request (ClientAppIo, the SuperLink's Fleet or ServerAppIo API)."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    exact = getattr(inflatable_utils.pull_objects, "fedtrain_exact", inflatable_utils.pull_objects)

    def pull_objects(object_ids: list[str], pull_object_fn: Callable[[str], bytes], **kwargs: Any) -> Any:
        kwargs["initial_backoff"] = min(float(kwargs.get("initial_backoff", initial)), initial)
        kwargs["backoff_cap"] = min(float(kwargs.get("backoff_cap", cap)), cap)
        return exact(object_ids, pull_object_fn, **kwargs)

    pull_objects.fedtrain_exact = exact  # type: ignore[attr-defined]
    for module in (inflatable_utils, start_client_internal, http_grid):
        module.pull_objects = pull_objects  # type: ignore[attr-defined]  # each calls the name it imported


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


# ---------------------------------------------------------------- the simulation's message store


_UNREGISTERED = NodeStatus.UNREGISTERED
_SLACK = 1.0  # seconds: a message this close to expiring, or a node this close to offline, goes to Flower's check


class IndexedLinkState(InMemoryLinkState):
    """Flower's in-memory LinkState with two indexes: each node's stored, undelivered messages in the
    order they were stored, and every stored message by the time it expires; and `get_message_res`
    runs Flower's checks only on the messages it has something to return for.

    Flower's `get_message_ins(node)` runs `_check_stored_messages` on every stored message (dropping
    those expired, or whose nodes left the federation) and then returns the node's undelivered ones.
    This one runs the same check on the messages that have expired since the last call (in expiry
    order) and on the node's own undelivered messages, then returns those: the same messages, in the
    same order, with the same delivery stamps (tests/test_linkstate_index.py runs both side by side).
    What it does not repeat per call is the federation check of other nodes' messages: a simulation
    has one federation and no node leaves it, and a node's own messages are still checked before it
    gets them.

    `validated` counts the messages it checked: one per message delivered, expired or deleted before
    delivery, however many nodes poll and however often.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._undelivered: dict[int, dict[str, None]] = {}  # node -> message ids (a dict: ordered set)
        self._expiry: list[tuple[float, str]] = []  # heap of (created_at + ttl, message id)
        self._facts: dict[str, tuple[int, float, int, int]] = {}  # message id -> (run, expiry, source, destination)
        self.validated = 0

    def store_message_ins(self, message: Any) -> str | None:
        with self.lock:
            message_id = super().store_message_ins(message)
            stored = self.message_ins_store.get(message_id) if message_id is not None else None
            if stored is not None and stored is message:  # newly stored (not an id it already held)
                meta = stored.metadata
                expires = meta.created_at + meta.ttl
                self._undelivered.setdefault(meta.dst_node_id, {})[meta.message_id] = None
                heapq.heappush(self._expiry, (expires, meta.message_id))
                self._facts[meta.message_id] = (meta.run_id, expires, meta.src_node_id, meta.dst_node_id)
            return message_id

    def _drop_expired(self) -> None:
        """Flower's check on every message whose time is up (it deletes the ones still stored)."""
        current = _in_memory.now().timestamp()
        while self._expiry and self._expiry[0][0] <= current:
            _, message_id = heapq.heappop(self._expiry)
            if message_id in self.message_ins_store:
                self.validated += 1
                self._check_stored_messages({message_id})

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Any]:
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Any] = []
        with self.lock:
            self._drop_expired()
            pending = self._undelivered.get(node_id, {})
            for message_id in list(pending):
                self.validated += 1
                self._check_stored_messages({message_id})  # Flower's checks, as Flower runs them
                message = self.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "" or message.metadata.dst_node_id != node_id:
                    pending.pop(message_id, None)
                    continue
                if run_id is None or message.metadata.run_id == run_id:
                    found.append(message)
                if limit and len(found) == limit:
                    break
            for message in found:
                pending.pop(message.metadata.message_id, None)
            if not pending:
                self._undelivered.pop(node_id, None)
        delivered_at = _in_memory.now().isoformat()  # as Flower marks them: after the lookup
        for message in found:
            message.metadata.delivered_at = delivered_at
        return found

    def get_message_res(self, message_ids: set[str], run_id: int) -> list[Any]:
        """Flower's answer for the asked messages that have one now: a reply, or an error reply (message
        unknown, of another run, expired, its node offline or out of the federation). A message still
        waiting for its reply gets nothing from Flower either, so it skips Flower's per-message work: a
        server pulling 1000 outstanding messages often pays for the replies that came, not for all."""
        with self.lock:
            current = _in_memory.now().timestamp()
            answered = {m for m in message_ids if self._has_answer(m, run_id, current)}
            return super().get_message_res(answered, run_id) if answered else []

    def _has_answer(self, message_id: str, run_id: int, current: float) -> bool:
        """Whether Flower's get_message_res could return anything for this message now (on doubt: yes)."""
        facts = self._facts.get(message_id)
        if facts is None or message_id not in self.message_ins_store:
            return True  # Flower answers an unknown message with an error reply
        if message_id in self.message_ins_id_to_message_res_id:
            return True
        run, expires, src, dst = facts
        if run != run_id or expires <= current + _SLACK:
            return True
        node = self.nodes.get(dst)
        if node is None or node.status == _UNREGISTERED or node.online_until is None:
            return True
        if node.online_until < current + _SLACK:
            return True
        if src != dst:
            federation = self.run_ids[run].run.federation_id
            return len(self.federation_manager.filter_nodes({src, dst}, federation)) != 2
        return False

    def delete_messages(self, message_ins_ids: set[str]) -> None:
        with self.lock:
            for message_id in message_ins_ids:
                message = self.message_ins_store.get(message_id)
                if message is not None:
                    self._undelivered.get(message.metadata.dst_node_id, {}).pop(message_id, None)
                self._facts.pop(message_id, None)
            super().delete_messages(message_ins_ids)

    def undelivered(self) -> int:
        """Messages in the node index (stored, not yet delivered)."""
        with self.lock:
            return sum(len(ids) for ids in self._undelivered.values())


_INDEXED_LOCK = threading.Lock()
_indexed_users: list[Any] = []  # the factory's class before the first of the calls inside, once per call


@contextlib.contextmanager
def indexed_message_state() -> Iterator[None]:
    """A Simulation Engine started inside gets an `IndexedLinkState` from Flower's LinkStateFactory
    (nested or concurrent uses: Flower's class is back when the last one ends)."""
    from flwr.server.superlink.linkstate import linkstate_factory

    with _INDEXED_LOCK:
        _indexed_users.append(linkstate_factory.InMemoryLinkState)
        linkstate_factory.InMemoryLinkState = IndexedLinkState  # type: ignore[misc]
    try:
        yield
    finally:
        with _INDEXED_LOCK:
            original = _indexed_users[0]
            _indexed_users.pop()
            if not _indexed_users:
                linkstate_factory.InMemoryLinkState = original  # type: ignore[misc]


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
    "IndexedLinkState",
    "Parameters",
    "SecAggPlusWorkflow",
    "WorkflowKey",
    "WorkflowState",
    "bytes_to_ndarray",
    "control_client",
    "parameters_to_ndarrays",
    "indexed_message_state",
    "launch_accepted",
    "launch_failed",
    "online_nodes",
    "pin_clientapp",
    "preload_clientapp_runtime",
    "preload_serverapp_runtime",
    "push_serverapp_failure",
    "push_task_failure",
    "register_node",
    "run_clientapp_task",
    "run_serverapp_task",
    "run_superexec",
    "run_supernode",
    "set_heartbeat",
    "set_object_pull_backoff",
    "set_serverapp_superexec",
    "set_supernode_polling",
    "task_details",
]
