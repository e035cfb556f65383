"""Flower's SuperNode with a 10 s heartbeat instead of 30 s.

The SuperLink counts a node as gone after two missed heartbeats. With Flower's 30 s a client that
crashes holds up its round for a minute and cannot rejoin for as long (the SuperLink refuses to
activate a node it still counts as online); with 10 s (Flower's allowed minimum) both take 20 s,
for one small request every 4 s. `python -m fedtrain.clients.supernode` takes flower-supernode's
arguments. The names replaced are flwr 1.42's (fedtrain/_flower.py; tests/test_flower_internals.py).
"""

from __future__ import annotations

HEARTBEAT_INTERVAL = 10  # seconds; flwr.common.constant.HEARTBEAT_MIN_INTERVAL


def main() -> None:
    from fedtrain import _flower

    _flower.set_heartbeat(HEARTBEAT_INTERVAL)
    _flower.run_supernode()


if __name__ == "__main__":
    main()
