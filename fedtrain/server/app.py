"""fedtrain's ServerApp: the same object runs under `fedtrain simulate` and on a SuperLink."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtrain import _flower
from fedtrain.components import Components
from fedtrain.config import Config
from fedtrain.data import Dataset
from fedtrain.security.keys import read_key_file
from fedtrain.security.kits import read_kit
from fedtrain.security.payload import PayloadKeys
from fedtrain.server.loop import Federation, RoundCallback
from fedtrain.server.payload_sealer import PayloadSealer


def build_server_app(
    config: Config | None = None,
    *,
    test_set: Dataset | None = None,
    on_round: RoundCallback | None = None,
    payload_keys: PayloadKeys | None = None,
    resume: bool = False,
    components: Components | None = None,
) -> ServerApp:
    """A ServerApp; with `config` it ignores the run config (in-process simulation).

    `test_set` enables central evaluation (simulation only: a real server holds no data);
    `payload_keys` turn on end-to-end payload encryption; `resume` continues the run in the
    config's run_dir after its last complete round.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _flower.set_object_pull_backoff()  # a reply's objects, pulled as soon as the SuperLink has them
        resolved = config if config is not None else Config.from_run_config(dict(context.run_config))
        keys = payload_keys if payload_keys is not None else _kit_keys(resolved)
        sealer = PayloadSealer(keys, context.run_id) if keys is not None else None
        resuming = resume or bool(resolved.extra.get("fedtrain-resume"))  # deployment: set by `fedtrain server`
        Federation(
            resolved, test_set=test_set, on_round=on_round, sealer=sealer, resume=resuming, components=components
        ).run(grid)

    return server_app


def _kit_keys(config: Config) -> PayloadKeys | None:
    """Deployment: the server kit's federation key and every client's uplink key."""
    if not config.deployment.kit:
        return None
    kit = Path(config.deployment.kit)
    info = read_kit(kit, "server")
    uplink = {name: read_key_file(kit / "clients" / f"{name}.uplink.key") for name in info["clients"]}
    return PayloadKeys(read_key_file(kit / "federation.key"), uplink)


app = build_server_app()
