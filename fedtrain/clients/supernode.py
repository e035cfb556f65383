"""Flower's SuperNode with a 10 s heartbeat instead of 30 s, and polling set from measurement.

The SuperLink counts a node as gone after two missed heartbeats. With Flower's 30 s a client that
crashes holds up its round for a minute and cannot rejoin for as long (the SuperLink refuses to
activate a node it still counts as online); with 10 s (Flower's allowed minimum) both take 20 s,
for one small request every 4 s.

Flower's SuperNode asks the SuperLink for a message every 3 s while it has none, and looks for its
task's reply every 0.5 s: up to 3.5 s per message that the client spends waiting, twice a round.
Here it asks every POLL_IDLE seconds after a message (the next one usually follows within a
fraction of a second: the server aggregates and sends the next round), backing off by POLL_GROWTH
to POLL_IDLE_MAX while none comes, so an idle client costs about one request a second; the reply,
in this process's memory, is looked for every POLL_WAIT seconds. benchmarks/RESULTS.md has the
measurements behind these numbers. `python -m fedtrain.clients.supernode` takes flower-supernode's
arguments. The names replaced are flwr 1.42's (fedtrain/_flower.py; tests/test_flower_internals.py).
"""

from __future__ import annotations

HEARTBEAT_INTERVAL = 10  # seconds; flwr.common.constant.HEARTBEAT_MIN_INTERVAL
POLL_IDLE, POLL_IDLE_MAX, POLL_GROWTH = 0.05, 1.0, 1.5  # seconds between pulls for a message
POLL_WAIT = 0.02  # seconds between looks for a task's reply


def main() -> None:
    from fedtrain import _flower

    _flower.set_heartbeat(HEARTBEAT_INTERVAL)
    _flower.set_supernode_polling(POLL_IDLE, POLL_IDLE_MAX, POLL_GROWTH, POLL_WAIT)
    _flower.set_object_pull_backoff()  # a message's objects, pulled from the server as soon as they are there
    _flower.run_supernode()


if __name__ == "__main__":
    main()
