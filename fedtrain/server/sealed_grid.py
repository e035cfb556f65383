"""End-to-end payload encryption as a Grid wrapper: every message pushed through it is sealed for its
node, every reply pulled through it is opened with its client's uplink key, before any fedtrain or
Flower code looks at the content. A reply that does not open becomes an error reply with the reason,
so whatever reads the round sees a failure, never ciphertext."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedtrain.server.payload_sealer import PayloadSealer


class SealedGrid(Grid):
    """`grid`, with payloads sealed for round `server_round` (one wrapper per round: the round is
    bound into every envelope)."""

    def __init__(self, grid: Grid, sealer: PayloadSealer, server_round: int) -> None:
        self.grid, self.sealer, self.server_round = grid, sealer, server_round
        self._sent: dict[str, Message] = {}

    def set_run(self, run) -> None:  # the wrapped grid already has its run
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        sealed = self.sealer.seal(list(messages), self.server_round)
        ids = list(self.grid.push_messages(sealed))
        self._sent.update({mid: msg for mid, msg in zip(ids, sealed, strict=True) if mid})
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._open(reply) for reply in self.grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The wrapped grid's own send_and_receive (its waiting), on sealed messages."""
        sealed = self.sealer.seal(list(messages), self.server_round)
        replies = list(self.grid.send_and_receive(sealed, timeout=timeout))
        self._sent.update({msg.metadata.message_id: msg for msg in sealed})
        return [self._open(reply) for reply in replies]

    def _open(self, reply: Message) -> Message:
        opened, rejected = self.sealer.open([reply], self.server_round)
        if opened:
            return opened[0]
        original = self._sent[reply.metadata.reply_to_message_id]
        return Message(Error(ErrorCode.UNKNOWN, next(iter(rejected.values()))), reply_to=original)
