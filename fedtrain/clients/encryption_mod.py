"""ClientApp mod for end-to-end payload encryption: open what the server sealed, run the handler,
seal the reply with this client's own uplink key. Unsealed or tampered messages are refused with a
sealed "decryption error" reply: nothing about the failure travels in clear."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedtrain import protocol
from fedtrain.errors import FedtrainError
from fedtrain.security.keys import read_key_file
from fedtrain.security.kits import read_kit
from fedtrain.security.payload import header_of, open_content, payload_context, seal_content


@dataclass(frozen=True)
class ClientKeys:
    name: str
    federation: bytes
    uplink: bytes


log = logging.getLogger("fedtrain")


def keys_from_kit(kit: str | Path) -> ClientKeys:
    """A client kit written by `fedtrain provision`."""
    info = read_kit(Path(kit), "client")
    return ClientKeys(
        info["name"], read_key_file(Path(kit) / "federation.key"), read_key_file(Path(kit) / "uplink.key")
    )


def payload_encryption_mod(keys_for: Callable[[Context], ClientKeys]) -> Mod:
    """Build the mod; `keys_for` finds this node's keys (from its kit, or in simulation from memory)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        try:
            keys = keys_for(context)
        except FedtrainError as exc:  # no keys to seal with: the category alone goes back, in clear
            log.error("client cannot read its payload keys: %s", exc)
            return protocol.error_reply(msg, "decryption error", str(context.node_config.get("client-name", "")))
        try:
            server_round = int(header_of(msg.content)["round"])
            down = payload_context(context.run_id, server_round, "down", kind, context.node_id)
            msg.content = open_content(
                msg.content, keys.federation, down, what=f"the round {server_round} {kind} message"
            )
        except (FedtrainError, KeyError, TypeError, ValueError) as exc:
            log.error("client %s: refused a %s message: %s", keys.name, kind, exc)
            server_round = _readable_round(msg)
            reply = protocol.error_reply(msg, "decryption error", keys.name)
        else:
            reply = call_next(msg, context)
        if reply.has_error():
            return reply
        up = payload_context(context.run_id, server_round, "up", kind, context.node_id, keys.name)
        # the reply's content is this client's own: each array is dropped once sealed (one copy of the update)
        header: dict[str, int | float | str] = {"round": server_round, "client": keys.name}
        reply.content = seal_content(reply.content, keys.uplink, up, header, consume=True)
        return reply

    return mod


def _readable_round(msg: Message) -> int:
    """The round a message says it is for, to bind into the sealed error reply (0 if unreadable)."""
    try:
        return int(header_of(msg.content)["round"])
    except (FedtrainError, KeyError, TypeError, ValueError):
        return 0
