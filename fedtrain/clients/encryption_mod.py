"""ClientApp mod for end-to-end payload encryption: open what the server sealed, run the handler,
seal the reply with this client's own uplink key. Unsealed or tampered messages are refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedtrain.security.keys import read_key_file
from fedtrain.security.kits import read_kit
from fedtrain.security.payload import header_of, open_content, payload_context, seal_content


@dataclass(frozen=True)
class ClientKeys:
    name: str
    federation: bytes
    uplink: bytes


def keys_from_kit(kit: str | Path) -> ClientKeys:
    """A client kit written by `fedtrain provision`."""
    info = read_kit(Path(kit), "client")
    return ClientKeys(
        info["name"], read_key_file(Path(kit) / "federation.key"), read_key_file(Path(kit) / "uplink.key")
    )


def payload_encryption_mod(keys_for: Callable[[Context], ClientKeys]) -> Mod:
    """Build the mod; `keys_for` finds this node's keys (from its kit, or in simulation from memory)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        keys = keys_for(context)
        server_round = int(header_of(msg.content)["round"])
        kind = msg.metadata.message_type
        down = payload_context(context.run_id, server_round, "down", kind, context.node_id)
        msg.content = open_content(msg.content, keys.federation, down, what=f"the round {server_round} {kind} message")
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        up = payload_context(context.run_id, server_round, "up", kind, context.node_id, keys.name)
        reply.content = seal_content(reply.content, keys.uplink, up, {"round": server_round, "client": keys.name})
        return reply

    return mod
