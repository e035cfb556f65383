"""stream_replies against a fake grid whose nodes answer after different numbers of pulls, on a fake
clock (no real waiting, no timing assertions): replies come out as they arrive, each once, in
bounded pulls, and a node that never answers ends the stream at the timeout."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from flwr.app import Message

from fedtrain.server.reply_stream import stream_replies


@dataclass
class Metadata:
    message_id: str = ""
    reply_to_message_id: str = ""
    dst_node_id: int = 0


@dataclass
class FakeMessage:
    metadata: Metadata = field(default_factory=Metadata)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


class SlowGrid:
    """Node i's reply is ready from the `answers_at[i]`-th pull on (None: never). Like the SuperLink,
    a pulled reply is handed out once, unless `repeat` says to hand it out again."""

    def __init__(self, answers_at: dict[int, int | None], repeat: bool = False) -> None:
        self.answers_at = answers_at
        self.repeat = repeat
        self.pulls: list[list[str]] = []
        self.pushed: dict[str, int] = {}
        self.handed: set[str] = set()

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"m{msg.metadata.dst_node_id}"
            msg.metadata.message_id = mid
            self.pushed[mid] = msg.metadata.dst_node_id
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls.append(list(message_ids))
        out = []
        for mid in message_ids:
            ready = self.answers_at[self.pushed[mid]]
            if ready is not None and len(self.pulls) >= ready and (self.repeat or mid not in self.handed):
                self.handed.add(mid)
                out.append(FakeMessage(Metadata(f"r{mid}", mid, 0)))
        if self.repeat:
            out.append(FakeMessage(Metadata("stray", "m-from-another-round", 0)))
        return out


def messages_to(nodes) -> list[Message]:
    return [FakeMessage(Metadata(dst_node_id=n)) for n in nodes]  # type: ignore[misc]


def test_yields_each_reply_as_soon_as_it_arrives():
    grid = SlowGrid({1: 1, 2: 3, 3: 2, 4: 3})
    clock = FakeClock()
    seen = []
    for reply in stream_replies(grid, messages_to([1, 2, 3, 4]), timeout=60, clock=clock, sleep=clock.sleep):
        seen.append((reply.metadata.reply_to_message_id, len(grid.pulls)))  # how many pulls it took
    assert seen == [("m1", 1), ("m3", 2), ("m2", 3), ("m4", 3)]
    assert grid.pulls == [["m1", "m2", "m3", "m4"], ["m2", "m3", "m4"], ["m2", "m4"]]  # answered ids not asked again
    assert clock.slept == [0.02, 0.02]  # a reply came in each pass: the next pull soon; none after the last


def test_pulls_back_off_while_nothing_arrives_and_speed_up_after_a_reply():
    grid = SlowGrid({1: 12, 2: 13})
    clock = FakeClock()
    replies = list(stream_replies(grid, messages_to([1, 2]), timeout=60, clock=clock, sleep=clock.sleep))
    assert len(replies) == 2
    waits = [0.02 * 1.5**i for i in range(9)]  # 0.02 ... 0.51: capped at the poll interval
    assert clock.slept == pytest.approx([*waits[:8], 0.5, 0.5, 0.5, 0.02])


def test_messages_are_pushed_and_carry_their_ids_before_the_first_pull():
    grid = SlowGrid({1: 1, 2: 1})
    clock = FakeClock()
    messages = messages_to([1, 2])
    replies = stream_replies(grid, messages, timeout=60, clock=clock, sleep=clock.sleep)
    assert [m.metadata.message_id for m in messages] == ["m1", "m2"] and grid.pulls == []
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2"]


def test_each_reply_once_and_only_this_rounds():
    grid = SlowGrid({1: 1, 2: 2}, repeat=True)
    clock = FakeClock()
    replies = list(stream_replies(grid, messages_to([1, 2]), timeout=60, clock=clock, sleep=clock.sleep))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2"]


def test_pulls_ask_for_at_most_pull_batch_ids():
    nodes = range(1, 21)
    grid = SlowGrid(dict.fromkeys(nodes, 2))
    clock = FakeClock()
    replies = list(stream_replies(grid, messages_to(nodes), timeout=60, pull_batch=3, clock=clock, sleep=clock.sleep))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(f"m{n}" for n in nodes)
    assert max(len(ids) for ids in grid.pulls) == 3
    with pytest.raises(ValueError, match="pull_batch"):
        stream_replies(grid, messages_to([1]), timeout=1, pull_batch=0)


def test_a_node_that_never_answers_ends_the_stream_at_the_timeout():
    grid = SlowGrid({1: 1, 2: None, 3: 4})
    clock = FakeClock()
    stream = stream_replies(
        grid, messages_to([1, 2, 3]), timeout=10, poll_interval=3, first_poll=3, clock=clock, sleep=clock.sleep
    )
    replies = [r.metadata.reply_to_message_id for r in stream]
    assert replies == ["m1", "m3"]  # node 2's message is the one never answered
    assert sum(clock.slept) == 10  # waited the whole timeout, not a poll interval more
    assert clock.slept == [3, 3, 3, 1]  # the last wait is cut to the deadline
    assert len(grid.pulls) == 5  # one pull per pass: bounded, and a last look at the deadline


def test_nothing_to_wait_for_when_no_message_could_be_pushed():
    class RefusingGrid(SlowGrid):
        def push_messages(self, messages):
            super().push_messages(messages)
            return [None, ""]  # what a SuperLink returns for messages it could not store

    grid = RefusingGrid({1: 1, 2: 1})
    clock = FakeClock()
    assert list(stream_replies(grid, messages_to([1, 2]), timeout=60, clock=clock, sleep=clock.sleep)) == []
    assert grid.pulls == [] and clock.slept == []
