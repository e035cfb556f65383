"""An in-process federation for tests: nodes that run fedtrain's real ClientApp (mods, handlers,
DP-SGD on their digits shard) with their own Context, behind the Grid interface the server loop uses.

Messages cross as copies (serialised and parsed, as over a network), so no object is shared
between the server and a node. A node "restarts" by getting a fresh Context (`restart`), which is
what a crashed and restarted process has: only what the client keeps on disk survives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedtrain.clients.app import build_client_app
from fedtrain.config import Config

# (node, message, reply) -> the reply the server gets, or None for no reply (the node hung or died)
Fault = Callable[[int, Message, Message], Message | None]


@contextlib.contextmanager
def flower_task() -> Iterator[None]:
    """Flower stamps messages with the current task; in a real app its runtime sets one."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None


def over_the_wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class LocalGrid:
    """Flower's Grid interface over `answer(msg) -> reply or None`, answered at push time.

    push_messages / pull_messages are what fedtrain's streaming rounds use; send_and_receive is
    Flower's own composition of them. A message that gets no reply is simply never pulled."""

    def answer(self, msg: Message) -> Message | None:
        raise NotImplementedError

    def push_messages(self, messages) -> list[str]:
        self._waiting = getattr(self, "_waiting", {})
        ids = []
        for msg in messages:
            mid = msg.object_id
            msg.metadata.__dict__["_message_id"] = mid  # what pushing through a SuperLink does
            reply = self.answer(msg)
            if reply is not None:
                # a SuperLink stores a reply only to the id it gave the message (an answer built from a copy
                # of the message, as SecAgg+'s mod builds it, may name the copy's id)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self._waiting[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._waiting.pop(mid) for mid in message_ids if mid in self._waiting]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(list(messages)))


class AppGrid(LocalGrid):
    def __init__(
        self,
        config: Config,
        *,
        keys_for=None,
        ledger_key: bytes | None = None,
        fault: Fault | None = None,
        components=None,
    ):
        self.config = config
        self.app = build_client_app(config, keys_for=keys_for, ledger_key=ledger_key, components=components)
        self.fault = fault
        self.contexts: dict[int, Context] = {}
        self.restart()

    def restart(self) -> None:
        """Every node loses its in-memory state, as after a crash of the whole simulation."""
        self.contexts = {
            pid + 1: Context(
                1, pid + 1, {"partition-id": pid, "num-partitions": self.config.federation.clients}, RecordDict(), {}
            )
            for pid in range(self.config.federation.clients)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def deliver(self, node: int, msg: Message) -> Message | None:
        """Run the node's ClientApp on a copy of `msg`; the reply (a copy), or None if it never comes."""
        try:
            reply = self.app(msg, self.contexts[node])
        except Exception as exc:  # what Flower's runtime sends back when a ClientApp raises
            reason = f"<class '{type(exc).__name__}'>:<'{exc}'>"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        if self.fault is not None:
            reply = self.fault(node, msg, reply)
        if reply is not None and not reply.has_error():
            reply.content = over_the_wire(reply.content)
        return reply

    def answer(self, msg: Message) -> Message | None:
        msg.content = over_the_wire(msg.content)  # each node gets its own copy
        return self.deliver(msg.metadata.dst_node_id, msg)


def run_federation(config: Config) -> list[dict]:
    """A whole simulated run in this process: fedtrain's server loop, evaluation on the global test
    set, and an AppGrid of the config's digits clients. The rows it records, one per round."""
    from fedtrain.server.loop import Federation
    from fedtrain.simulation import prepare

    config, test_set = prepare(config.validate())
    with flower_task():
        return Federation(config, test_set=test_set, on_round=lambda row: None).run(AppGrid(config))
