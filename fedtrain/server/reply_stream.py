"""Replies to a round's messages, yielded one at a time as they arrive, within a bounded wait.

Flower's `Grid.send_and_receive` returns only when every reply is in (or the timeout passes), so
the server holds all N updates at once; and on a SuperLink it pulls every 3 s, so each exchange
waits 1.5 s on average after the last reply came. Pushing the messages and pulling the replies
ourselves lets the round screen, aggregate and drop each update while later clients are still
training, and pull often while replies are due: every POLL_FIRST seconds after a push or a reply,
backing off by POLL_GROWTH to POLL_INTERVAL (a pull is one local request to the SuperLink, about a
millisecond; benchmarks/RESULTS.md). Every exchange of a round (training, SecAgg+'s stages,
federated evaluation) goes through here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

POLL_FIRST, POLL_GROWTH, POLL_INTERVAL = 0.02, 1.5, 0.5  # seconds between pulls while replies are outstanding
PULL_BATCH = 8  # message ids asked for per pull: at most this many replies are in memory at once


def stream_replies(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    poll_interval: float = POLL_INTERVAL,
    first_poll: float = POLL_FIRST,
    pull_batch: int = PULL_BATCH,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Message]:
    """Push `messages` now (so they carry their message ids when this returns); the iterator
    returned yields each reply once, as soon as a pull brings it, until every message is answered
    or `timeout` seconds after the push have passed (the last pull may end a little later). Pulls
    come `first_poll` seconds after the push and after each reply, then further apart by POLL_GROWTH,
    up to `poll_interval`.

    A message with no reply is simply never answered: compare the replies' `reply_to_message_id`
    with the messages' `message_id` to find it. `clock` and `sleep` are there for tests."""
    if pull_batch < 1:
        raise ValueError(f"pull_batch must be at least 1, not {pull_batch}")
    deadline = clock() + timeout
    # ordered, O(1) removal; a message the SuperLink refused to store comes back without an id
    outstanding = dict.fromkeys(mid for mid in grid.push_messages(messages) if mid)
    return _pulled(grid, outstanding, deadline, (first_poll, poll_interval), pull_batch, clock, sleep)


def collect_replies(grid: Grid, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    """`Grid.send_and_receive`, with stream_replies' pulls: every reply that came within `timeout`."""
    return list(stream_replies(grid, messages, timeout=timeout))


def _pulled(
    grid: Grid,
    outstanding: dict[str, None],
    deadline: float,
    polls: tuple[float, float],
    pull_batch: int,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Iterator[Message]:
    first_poll, poll_interval = polls
    wait = first_poll
    while outstanding:
        ids = list(outstanding)
        for start in range(0, len(ids), pull_batch):
            batch = ids[start : start + pull_batch]
            asked = set(batch)
            arrived = list(grid.pull_messages(batch))
            arrived.reverse()
            while arrived:
                reply = arrived.pop()  # out of the batch before it is yielded: the caller holds the only reference
                answered = reply.metadata.reply_to_message_id
                if answered in asked:  # each message once, and only this round's
                    asked.discard(answered)
                    del outstanding[answered]
                    wait = first_poll  # replies come in clusters: the next may be close
                    yield reply
                del reply  # not kept while the next batch is pulled
        left = deadline - clock()
        if not outstanding or left <= 0:
            return
        sleep(min(wait, left))
        wait = min(poll_interval, wait * POLL_GROWTH)
