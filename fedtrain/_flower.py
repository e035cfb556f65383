"""Every place fedtrain reaches into Flower beyond its public API, in one module.

pyproject.toml pins flwr < 1.43; tests/test_flower_internals.py checks that every name used here still
exists, so an upgrade that moves one fails there, not in a federation. Why each is needed:

- the client's pinned runtime (clients/pinned_app.py): a SuperNode must run fedtrain's installed
  ClientApp only, never a run's bundle: the FAB "install" becomes a check and the app loader returns
  fedtrain's app; the SuperExec runs ClientApp tasks only, launched by `fedtrain-clientapp`.
- the SuperNode's heartbeat (clients/supernode.py): 10 s instead of 30 s (Flower's allowed minimum).
- client-level DP (strategies/central_dp.py) overrides three hooks of Flower's DP wrappers: the noise
  (from a private generator, not NumPy's global one), the noisy clipped count, and the adaptive
  bound's update (whose sign Flower 1.42 has backwards).
- secure aggregation (server/secure_aggregation.py) drives the legacy SecAgg+ workflow's four stage
  methods with its own state: Flower offers SecAgg+ only as that workflow.
- checkpoints (server/checkpoint.py) save and restore the server optimizer state of Flower's FedOpt
  family and FedAvgM, held in these attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- secure aggregation: the legacy workflow
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState

SECAGG_STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")

# ---------------------------------------------------------------- client-level DP: hooks overridden
DP_NOISE_HOOK = "_add_noise_to_aggregated_arrays"  # both of Flower's server-side DP wrappers
DP_COUNT_HOOK = "_noisy_fraction"  # adaptive clipping: the noisy share of clipped updates
DP_BOUND_HOOK = "_geometric_update"  # adaptive clipping: C <- C exp(-lr (fraction - quantile))

# ---------------------------------------------------------------- checkpoints: server optimizer state
OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector")  # FedOpt's moments, FedAvgM's momentum


# ---------------------------------------------------------------- the client's pinned runtime


def pin_clientapp(install: Callable[..., Path], loader: Callable[..., Any]) -> None:
    """Flower's ClientApp process: `install` replaces the FAB's installation, `loader` the app loader."""
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.install_from_fab = install
    run_clientapp.get_load_client_app_fn = loader


def run_clientapp_process() -> None:
    from flwr.supernode.cli import flwr_clientapp

    flwr_clientapp()


def restrict_superexec(launcher: Path) -> None:
    """Flower's SuperExec: ClientApp tasks only, each started with `launcher`."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(launcher)
    AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})


def run_superexec() -> None:
    from flwr.supercore.cli import flower_superexec

    flower_superexec()


# ---------------------------------------------------------------- the SuperNode's heartbeat


def set_heartbeat(seconds: int) -> None:
    """Every heartbeat a SuperNode of this process sends comes `seconds` apart."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = seconds
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = seconds


def run_supernode() -> None:
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


__all__ = [
    "DP_BOUND_HOOK",
    "DP_COUNT_HOOK",
    "DP_NOISE_HOOK",
    "MAIN_CONFIGS_RECORD",
    "MAIN_PARAMS_RECORD",
    "OPTIMIZER_STATE",
    "SECAGG_STAGES",
    "FitIns",
    "Parameters",
    "SecAggPlusWorkflow",
    "WorkflowKey",
    "WorkflowState",
    "bytes_to_ndarray",
    "parameters_to_ndarrays",
    "pin_clientapp",
    "restrict_superexec",
    "run_clientapp_process",
    "run_superexec",
    "run_supernode",
    "set_heartbeat",
]
