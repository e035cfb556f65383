"""Server side of end-to-end payload encryption: seal every outgoing message for its node and open
every reply with its client's uplink key, before any fedtrain or Flower code looks at the content.

The round loop applies it through SealedGrid (server/sealed_grid.py), a Grid wrapper: whatever runs
the exchange (plain, streamed, SecAgg+'s stages) and the screening only ever sees plaintext.
"""

from __future__ import annotations

import logging

from flwr.app import Message

from fedtrain.errors import FedtrainError
from fedtrain.security.payload import PayloadKeys, header_of, open_content, payload_context, seal_content

log = logging.getLogger("fedtrain")


class PayloadSealer:
    def __init__(self, keys: PayloadKeys, run_id: int) -> None:
        self.keys = keys
        self.run_id = run_id

    def seal(self, messages: list[Message], server_round: int) -> list[Message]:
        for msg in messages:
            kind, node = msg.metadata.message_type, msg.metadata.dst_node_id
            aad = payload_context(self.run_id, server_round, "down", kind, node)
            msg.content = seal_content(msg.content, self.keys.federation, aad, {"round": server_round})
        return messages

    def open(self, replies: list[Message], server_round: int) -> tuple[list[Message], dict[int, str]]:
        """(replies with plaintext content or a client error, {node id: why it could not be opened}).

        A rejected reply's claimed client name is not trusted: it is reported by node id."""
        opened: list[Message] = []
        rejected: dict[int, str] = {}
        for reply in replies:
            if reply.has_error():
                opened.append(reply)
                continue
            node = reply.metadata.src_node_id
            try:
                header = header_of(reply.content)
                client = str(header.get("client", ""))
                key = self.keys.uplink.get(client)
                if key is None:
                    raise FedtrainError(f"it claims to be {client!r}, which has no uplink key in this federation")
                if int(header.get("round", -1)) != server_round:
                    raise FedtrainError(f"it is for round {header.get('round')}, not round {server_round}")
                aad = payload_context(self.run_id, server_round, "up", reply.metadata.message_type, node, client)
                reply.content = open_content(reply.content, key, aad, what=f"the reply of {client}")
                opened.append(reply)
            except FedtrainError as exc:
                rejected[node] = f"reply rejected: {exc}"
                log.warning("round %d: node %d: reply rejected: %s", server_round, node, exc)
        return opened, rejected
