"""fedtrain's ClientApp: the same object runs under `fedtrain simulate` and on a real SuperNode.

It only wires Flower to fedtrain: mods (payload encryption, a guard that turns any failure into a
category-only reply, secure aggregation) and the train and evaluate handlers of
clients/handlers.py, imported when a message needs them. On a real node every message runs in a
fresh process, and torch and Opacus take seconds to import: the protocol messages of secure
aggregation never pay for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedtrain import protocol
from fedtrain.clients.encryption_mod import ClientKeys, keys_from_kit, payload_encryption_mod
from fedtrain.clients.secure_aggregation import secure_aggregation_mod
from fedtrain.clients.setup import ClientSetup, client_id
from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.privacy.policy import ClientPolicy

if TYPE_CHECKING:  # torch: not for the protocol messages of secure aggregation
    from fedtrain.components import Components

log = logging.getLogger("fedtrain")


def _config(fixed: Config | None, context: Context) -> Config:
    return fixed if fixed is not None else Config.from_run_config(dict(context.run_config))


def _keys_from_node_kit(context: Context) -> ClientKeys:
    if "kit" not in context.node_config:
        raise FedtrainError("this node has no kit: start it with `fedtrain client --kit KIT` for encrypted payloads.")
    return keys_from_kit(str(context.node_config["kit"]))


def guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Whatever fails below (secure aggregation's stages; the handlers guard themselves) reaches the
    server as a category: an exception's text may hold paths or values, so it stays in this log."""
    try:
        return call_next(msg, context)
    except Exception as exc:
        log.error(
            "client %s: %s message failed: %s: %s",
            client_id(context),
            msg.metadata.message_type,
            type(exc).__name__,
            exc,
        )
        return protocol.error_reply(msg, "protocol error", client_id(context))


def build_client_app(
    config: Config | None = None,
    keys_for: Callable[[Context], ClientKeys] | None = None,
    ledger_key: bytes | None = None,
    policy: ClientPolicy | None = None,
    components: Components | None = None,
    ledger_dir: Path | None = None,
) -> ClientApp:
    """A ClientApp.

    Args:
        config: the run's config, fixed (in-process simulation); None: each message's run config.
        keys_for: this node's payload keys; with it every message is end-to-end encrypted.
        ledger_key: a simulation's model key: each client keeps its ledger sealed under it in
            RUN_DIR/ledgers, so a resumed simulation continues every client's epsilon. None (and no
            kit in the node config): ledgers in memory.
        policy: one policy for every simulated client; None: a real node's kit policy, or in
            simulation a policy admitting the run's own settings.
        components: the model factory, task and dataset given as Python objects (simulation only).
        ledger_dir: a simulation's ledgers, if not in RUN_DIR/ledgers (a tuning's trials share them).

    Returns:
        The ClientApp. Secure aggregation takes part in a round when the server runs one.
    """
    setup = ClientSetup(policy=policy, ledger_key=ledger_key, components=components, ledger_dir=ledger_dir)
    # Outermost first: payloads are opened before SecAgg+ reads its stage, and sealed after it masks.
    mods = [payload_encryption_mod(keys_for)] if keys_for is not None else []
    client_app = ClientApp(mods=[*mods, guard_mod, secure_aggregation_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedtrain.clients import handlers

        return handlers.handle_train(msg, context, _config(config, context), setup)

    @client_app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        from fedtrain.clients import handlers

        return handlers.handle_evaluate(msg, context, _config(config, context), setup)

    return client_app


# Deployment: payloads are always end-to-end encrypted with the keys of the node's kit.
app = build_client_app(keys_for=_keys_from_node_kit)
