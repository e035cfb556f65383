"""fedtrain's ServerApp: the same object runs under `fedtrain simulate` and on a SuperLink."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtrain.config import Config
from fedtrain.data import Dataset
from fedtrain.security.payload import PayloadKeys
from fedtrain.server.loop import Federation, RoundCallback
from fedtrain.server.payload_sealer import PayloadSealer


def build_server_app(
    config: Config | None = None,
    *,
    test_set: Dataset | None = None,
    on_round: RoundCallback | None = None,
    payload_keys: PayloadKeys | None = None,
) -> ServerApp:
    """A ServerApp; with `config` it ignores the run config (in-process simulation).

    `test_set` enables central evaluation (simulation only: a real server holds no data);
    `payload_keys` turn on end-to-end payload encryption.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        resolved = config if config is not None else Config.from_run_config(dict(context.run_config))
        sealer = PayloadSealer(payload_keys, context.run_id) if payload_keys is not None else None
        Federation(resolved, test_set=test_set, on_round=on_round, sealer=sealer).run(grid)

    return server_app


app = build_server_app()
