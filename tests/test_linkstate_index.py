"""The simulation's indexed message store (fedtrain/_flower.py `IndexedLinkState`) against Flower's own
InMemoryLinkState: the same operations on both give every node the same messages in the same order, and a
node's poll validates only that node's messages, not every stored one (the nodes x messages work per
Simulation Engine pass that kept 1000 clients from finishing a round)."""

from __future__ import annotations

import random
import time
import uuid
from datetime import datetime, timezone

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.federation.noop_federation_manager import NOOP_FEDERATION_ID

from fedtrain._flower import IndexedLinkState, indexed_message_state

RUNS = (11, 22)


CLOCK = [0.0]  # the states' time (seconds since the epoch), moved by the tests


@pytest.fixture(autouse=True)
def _flower_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's Message reads its run and source from the process's task identity (a ServerApp's); both
    states and Flower's message validation read the time from a clock the tests move."""
    from flwr.server.superlink.linkstate import in_memory_linkstate
    from flwr.server.superlink.linkstate import utils as linkstate_utils
    from flwr.server.utils import validator
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", RUNS[0]), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)
    CLOCK[0] = time.time()
    for module in (in_memory_linkstate, linkstate_utils, validator):
        monkeypatch.setattr(module, "now", lambda: datetime.fromtimestamp(CLOCK[0], tz=timezone.utc))


def _state(kind: type[InMemoryLinkState], nodes: int) -> tuple[InMemoryLinkState, list[int]]:
    """A state as Flower's Simulation Engine sets it up: the runs pre-registered, every node online."""
    state = kind(NoOpFederationManager(), ObjectStoreFactory().store())
    for task_id, run_id in enumerate(RUNS, start=1):
        run = Run.create_empty(run_id=run_id)
        run.primary_task_id, run.federation_id = task_id, NOOP_FEDERATION_ID
        state.run_ids[run_id] = RunRecord(run=run)
        state.task_store[task_id] = Task(task_id=task_id, run_id=run_id)
    ids = []
    for _ in range(nodes):
        node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, uuid.uuid4().bytes * 2, HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        ids.append(node)
    return state, ids


def _message(message_id: str, node: int, run_id: int, ttl: float) -> Message:
    message = Message(RecordDict(), dst_node_id=node, message_type="train", ttl=ttl, group_id="1")
    message.metadata.__dict__.update(_message_id=message_id, _run_id=run_id, _created_at=CLOCK[0])
    return message


def _expired(message: Message) -> bool:
    return message.metadata.created_at + message.metadata.ttl <= CLOCK[0]


class Twin:
    """Flower's state and the indexed one, driven by the same operations (node i of one is node i of the other)."""

    def __init__(self, nodes: int) -> None:
        (self.flower, self.flower_nodes), (self.indexed, self.indexed_nodes) = (
            _state(InMemoryLinkState, nodes),
            _state(IndexedLinkState, nodes),
        )

    def store(self, message_id: str, node: int, run_id: int, ttl: float = 3600.0) -> tuple[str | None, str | None]:
        return (
            self.flower.store_message_ins(_message(message_id, self.flower_nodes[node], run_id, ttl)),
            self.indexed.store_message_ins(_message(message_id, self.indexed_nodes[node], run_id, ttl)),
        )

    def get(self, node: int, limit: int | None, run_id: int | None) -> tuple[list[tuple], list[tuple]]:
        def seen(messages: list[Message]) -> list[tuple]:
            return [(m.metadata.message_id, m.metadata.run_id, m.metadata.delivered_at != "") for m in messages]

        return (
            seen(self.flower.get_message_ins(self.flower_nodes[node], limit, run_id=run_id)),
            seen(self.indexed.get_message_ins(self.indexed_nodes[node], limit, run_id=run_id)),
        )

    def reply(self, message_id: str) -> tuple[bool, bool]:
        """The node's reply to a stored message, stored in both states (whether each took it)."""
        took = []
        for state in (self.flower, self.indexed):
            reply = Message(RecordDict(), reply_to=state.message_ins_store[message_id])
            reply.metadata.__dict__["_message_id"] = f"reply-{message_id}"
            took.append(state.store_message_res(reply) is not None)
        return took[0], took[1]

    def pull(self, ids: set[str], run_id: int) -> tuple[object, object]:
        """get_message_res on both, then the deletion InMemoryGrid.pull_messages does: what each returned."""

        def pulled(state: InMemoryLinkState) -> object:
            try:
                replies = state.get_message_res(set(ids), run_id)
            except ValueError as exc:
                return f"ValueError: {exc}"
            state.delete_messages({r.metadata.reply_to_message_id for r in replies})
            return sorted(
                (r.metadata.reply_to_message_id, r.has_error(), r.error.code if r.has_error() else None)
                for r in replies
            )

        return pulled(self.flower), pulled(self.indexed)

    def delete(self, ids: set[str]) -> None:
        self.flower.delete_messages(set(ids))
        self.indexed.delete_messages(set(ids))


@pytest.mark.parametrize("seed", range(6))
def test_every_node_gets_what_flowers_state_gives_it(seed: int) -> None:
    """Random stores (new and repeated ids, two runs, short and long TTLs), polls (limits 1, 2, none;
    with and without a run), replies, the server's pulls (replies, unknown, expired and other runs'
    messages), deletions and the clock moving on: every node and the server get what Flower's own state
    gives them, and both keep the same live messages."""
    rng = random.Random(seed)
    twin, nodes, stored, polled, pulled = Twin(nodes=7), 7, [], 0, 0
    for _ in range(400):
        op = rng.random()
        if op < 0.45 or not stored:
            repeat = stored and rng.random() < 0.1
            message_id = rng.choice(stored) if repeat else str(uuid.UUID(int=rng.getrandbits(128)))
            ours = twin.store(message_id, rng.randrange(nodes), rng.choice(RUNS), rng.choice([5.0, 30.0, 3600.0]))
            assert ours[0] == ours[1]
            stored.append(message_id)
        elif op < 0.85:
            node, limit, run_id = rng.randrange(nodes), rng.choice([None, 1, 1, 2]), rng.choice([None, *RUNS])
            flower, indexed = twin.get(node, limit, run_id)
            assert flower == indexed
            # both hold the same live messages; Flower's poll stops checking at its limit, so it may keep
            # expired ones a while longer
            kept = twin.flower.message_ins_store.keys() - twin.indexed.message_ins_store.keys()
            assert twin.indexed.message_ins_store.keys() <= twin.flower.message_ins_store.keys()
            assert all(_expired(twin.flower.message_ins_store[k]) for k in kept)
            polled += len(flower)
        elif op < 0.87:
            live = [m for m in stored if m in twin.flower.message_ins_store and m in twin.indexed.message_ins_store]
            if live:
                took = twin.reply(rng.choice(live))
                assert took[0] == took[1]
        elif op < 0.91:
            asked = set(rng.sample(stored, k=min(len(stored), rng.randint(1, 6)))) | {"never-stored"}
            flower, indexed = twin.pull(asked, rng.choice(RUNS))
            assert flower == indexed
            pulled += len(flower) if isinstance(flower, list) else 0
        elif op < 0.94:
            twin.delete(set(rng.sample(stored, k=min(len(stored), rng.randint(1, 3)))))
        else:
            CLOCK[0] += rng.uniform(0, 20)
    for node in range(nodes):  # what is left to deliver is the same too
        flower, indexed = twin.get(node, None, None)
        assert flower == indexed
        polled += len(flower)
    assert polled > 50 and pulled > 5  # the comparison covered deliveries and replies, not only empty calls
    assert twin.indexed.undelivered() == 0


def test_a_node_never_gets_a_message_twice_nor_an_expired_one() -> None:
    twin = Twin(nodes=2)
    twin.store("a", 0, RUNS[0], ttl=5)
    twin.store("b", 0, RUNS[0])
    twin.store("c", 1, RUNS[0], ttl=5)
    CLOCK[0] += 6
    assert twin.get(0, 1, None) == ([("b", RUNS[0], True)], [("b", RUNS[0], True)])
    assert twin.get(0, None, None) == ([], [])
    for state in (twin.flower, twin.indexed):  # both dropped the expired ones, node 1's included
        assert set(state.message_ins_store) == {"b"}
    assert twin.store("b", 0, RUNS[0]) == ("b", "b")  # stored again: still delivered once
    assert twin.get(0, None, None) == ([], [])
    assert twin.store("c", 1, RUNS[0]) == ("c", "c")  # a new message with an expired one's id is delivered
    assert twin.get(1, None, None) == ([("c", RUNS[0], True)], [("c", RUNS[0], True)])
    twin.store("d", 0, RUNS[0])
    twin.delete({"d"})
    twin.store("d", 1, RUNS[1])  # the same id, now another node's message
    assert twin.get(0, None, None) == ([], [])
    assert twin.get(1, None, None) == ([("d", RUNS[1], True)], [("d", RUNS[1], True)])


def _count_flower_checks(state: InMemoryLinkState) -> list[int]:
    """How many stored messages Flower's `_check_stored_messages` looked at (its work per poll)."""
    count = [0]
    check = state._check_stored_messages

    def counted(message_ids: set[str], run_id: int | None = None) -> None:
        count[0] += len(message_ids)
        check(message_ids, run_id)

    state._check_stored_messages = counted  # type: ignore[method-assign]
    return count


def test_a_poll_of_every_node_is_linear_not_nodes_times_messages() -> None:
    """The Simulation Engine's pass (`get_message_ins(node, limit=1)` for every node, every 0.1 s) with one
    message per node: Flower's state checks about nodes x messages stored messages per pass, the indexed
    one each message once, and nothing in later passes that find no new message."""
    nodes = 200
    twin = Twin(nodes=nodes)
    for node in range(nodes):
        twin.store(f"m{node}", node, RUNS[0])
    flower_checks, indexed_checks = _count_flower_checks(twin.flower), _count_flower_checks(twin.indexed)
    for node in range(nodes):
        flower, indexed = twin.get(node, 1, None)
        assert flower == indexed == [(f"m{node}", RUNS[0], True)]
    # Flower validates the stored messages (delivered or not) up to the node's own: n (n + 1) / 2 in all
    assert flower_checks[0] == nodes * (nodes + 1) // 2
    assert indexed_checks[0] == twin.indexed.validated == nodes
    for node in range(nodes):  # a pass with nothing new: Flower checks every stored message for every node
        assert twin.get(node, 1, None) == ([], [])
    assert flower_checks[0] == nodes * (nodes + 1) // 2 + nodes * nodes
    assert indexed_checks[0] == twin.indexed.validated == nodes  # the indexed state: no work at all


def test_the_simulation_engine_gets_the_indexed_state_only_inside() -> None:
    from flwr.server.superlink.linkstate import LinkStateFactory, linkstate_factory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    def made() -> type:
        return type(LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()).state())

    with indexed_message_state():
        assert made() is IndexedLinkState
    assert made() is InMemoryLinkState and linkstate_factory.InMemoryLinkState is InMemoryLinkState
    outer, inner = indexed_message_state(), indexed_message_state()  # overlapping uses, ended out of order
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert made() is IndexedLinkState
    inner.__exit__(None, None, None)
    assert made() is InMemoryLinkState
