"""fedtrain's ClientApp: the same object runs under `fedtrain simulate` and on a real SuperNode.

It only wires Flower to fedtrain: mods (payload encryption, secure aggregation) and the train and
evaluate handlers of clients/handlers.py, imported when a message needs them. On a real node every
message runs in a fresh process, and torch and Opacus take seconds to import: the protocol
messages of secure aggregation never pay for them.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtrain.clients.encryption_mod import ClientKeys, keys_from_kit, payload_encryption_mod
from fedtrain.clients.secure_aggregation import secure_aggregation_mod
from fedtrain.config import Config
from fedtrain.errors import FedtrainError


def _config(fixed: Config | None, context: Context) -> Config:
    return fixed if fixed is not None else Config.from_run_config(dict(context.run_config))


def _keys_from_node_kit(context: Context) -> ClientKeys:
    if "kit" not in context.node_config:
        raise FedtrainError("this node has no kit: start it with `fedtrain client --kit KIT` for encrypted payloads.")
    return keys_from_kit(str(context.node_config["kit"]))


def build_client_app(
    config: Config | None = None,
    keys_for: Callable[[Context], ClientKeys] | None = None,
    ledger_key: bytes | None = None,
) -> ClientApp:
    """A ClientApp; with `config` it ignores the run config (in-process simulation).

    With `ledger_key` (simulation), each client also keeps its ledger on disk under that key, so a
    resumed simulation continues every client's epsilon.
    With `keys_for`, every message is end-to-end encrypted (the mod wraps train and evaluate alike).
    Secure aggregation takes part in a round when the server runs one (its messages say so).
    """
    # Outermost first: payloads are opened before SecAgg+ reads its stage, and sealed after it masks.
    mods = [payload_encryption_mod(keys_for)] if keys_for is not None else []
    client_app = ClientApp(mods=[*mods, secure_aggregation_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedtrain.clients import handlers

        return handlers.handle_train(msg, context, _config(config, context), ledger_key)

    @client_app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        from fedtrain.clients import handlers

        return handlers.handle_evaluate(msg, context, _config(config, context))

    return client_app


# Deployment: payloads are always end-to-end encrypted with the keys of the node's kit.
app = build_client_app(keys_for=_keys_from_node_kit)
