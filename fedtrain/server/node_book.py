"""Who is who in a round: each node's client name, and which node each sent message went to."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message


class NodeBook:
    """Client names by node id (learnt from replies), and the recipients of the last messages sent.

    The SuperLink itself sends the error reply of a node that stopped sending heartbeats: `node_of`
    attributes such a reply to the node the message was addressed to, not to its sender."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.recipients: dict[str, int] = {}

    def name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def sent(self, messages: Iterable[Message]) -> None:
        """Remember where each pushed message (with its id) went."""
        self.recipients.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages})

    def node_of(self, reply: Message) -> int:
        return self.recipients.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def missing(self, messages: Iterable[Message], answered: Iterable[int], why: str) -> dict[str, str]:
        """{client name: why} for every message whose node did not answer."""
        seen = set(answered)
        return {self.name(m.metadata.dst_node_id): why for m in messages if m.metadata.dst_node_id not in seen}
