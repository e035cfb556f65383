"""Every name fedtrain relies on beyond Flower's public API (fedtrain/_flower.py) still exists in the
installed flwr: an upgrade that moves one must fail here, not in a federation."""

from __future__ import annotations

import inspect

from fedtrain import _flower


def test_the_pinned_runtime_hooks_exist() -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin
    from flwr.supernode.runtime import run_clientapp

    assert TaskType.CLIENT_APP in AutoExecPlugin.supported_task_types
    assert callable(run_superexec.get_executor)  # the warm executor replaces it
    assert {"task_id", "token", "runtime_api_address", "insecure", "root_certificates_path", "parent_pid"} <= set(
        ExecutionSpec.__dataclass_fields__
    )
    assert callable(LaunchResult.accepted) and callable(LaunchResult.failed)
    for name in ("install_from_fab", "get_load_client_app_fn", "pull_task_input", "push_message", "push_task_output"):
        assert callable(getattr(run_clientapp, name)), name
    assert {
        "runtime_api_address",
        "token",
        "insecure",
        "certificates",
        "parent_pid",
        "runtime_dependency_install",
    } <= set(inspect.signature(run_clientapp.run_clientapp).parameters)
    # the task's input is pulled through the module's name, which run_task_for_warm_worker replaces
    assert "pull_task_input(client)" in inspect.getsource(run_clientapp.run_clientapp)


def test_the_supernode_polling_names_exist() -> None:
    from flwr.supernode import start_client_internal as loop

    assert loop.time is __import__("time") or isinstance(loop.time, _flower._PollingClock)
    source = inspect.getsource(loop)
    assert f"time.sleep({_flower.FLOWER_IDLE_SLEEP})" in inspect.getsource(loop.start_client_internal)
    assert source.count(f"time.sleep({_flower.FLOWER_WAIT_SLEEP})") == 2  # the reply, and a reply object's content
    assert "run_id = _pull_and_store_message(" in inspect.getsource(loop.start_client_internal)


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
