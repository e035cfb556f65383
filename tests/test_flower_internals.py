"""Every name fedtrain relies on beyond Flower's public API (fedtrain/_flower.py) still exists in the
installed flwr: an upgrade that moves one must fail here, not in a federation."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from fedtrain import _flower


def test_the_pinned_runtime_hooks_exist() -> None:
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == "flwr-clientapp"
    assert TaskType.CLIENT_APP in AutoExecPlugin.supported_task_types
    assert callable(run_clientapp.install_from_fab) and callable(run_clientapp.get_load_client_app_fn)
    assert callable(flwr_clientapp)
    assert Path(sys.executable).with_name("fedtrain-clientapp").exists()


def test_the_heartbeat_names_exist() -> None:
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    from flwr.supernode.cli import flower_supernode

    from fedtrain.clients.supernode import HEARTBEAT_INTERVAL

    assert hasattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL") and hasattr(
        fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL"
    )
    assert HEARTBEAT_INTERVAL >= HEARTBEAT_MIN_INTERVAL and callable(flower_supernode)


def test_the_dp_wrapper_hooks_fedtrain_overrides_exist() -> None:
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    for wrapper in (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping):
        assert callable(getattr(wrapper, _flower.DP_NOISE_HOOK))
    for hook in (_flower.DP_COUNT_HOOK, _flower.DP_BOUND_HOOK):
        assert callable(getattr(DifferentialPrivacyServerSideAdaptiveClipping, hook))
    assert list(inspect.signature(DifferentialPrivacyServerSideAdaptiveClipping._geometric_update).parameters) == [
        "self",
        "clipped_fraction",
    ]


def test_the_secagg_workflow_stages_and_state_exist() -> None:
    for stage in _flower.SECAGG_STAGES:
        assert list(inspect.signature(getattr(_flower.SecAggPlusWorkflow, stage)).parameters) == [
            "self",
            "grid",
            "context",
            "state",
        ]
    state = _flower.WorkflowState()
    assert hasattr(state, "nid_to_fitins")
    assert _flower.WorkflowKey.CURRENT_ROUND


def test_the_optimizer_state_attributes_exist() -> None:
    from flwr.serverapp.strategy import FedAdam, FedAvgM

    adam, avgm = FedAdam(), FedAvgM(server_momentum=0.9)
    assert hasattr(adam, "m_t") and hasattr(adam, "v_t") and hasattr(avgm, "momentum_vector")
    assert set(_flower.OPTIMIZER_STATE) == {"m_t", "v_t", "momentum_vector"}
