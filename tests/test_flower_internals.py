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


def test_the_simulation_message_store_names_exist() -> None:
    """IndexedLinkState overrides these methods of Flower's in-memory state, reads these attributes, and
    is put in place through the factory module's name for the class; the Simulation Engine still polls
    every node with `get_message_ins(node_id=..., limit=1)`."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import in_memory_linkstate, linkstate_factory

    state = in_memory_linkstate.InMemoryLinkState
    assert linkstate_factory.InMemoryLinkState in (state, _flower.IndexedLinkState)
    overridden = ("store_message_ins", "get_message_ins", "get_message_res", "delete_messages")
    for name in (*overridden, "_check_stored_messages"):
        assert callable(getattr(state, name)), name
    assert list(inspect.signature(state.get_message_ins).parameters) == ["self", "node_id", "limit", "run_id"]
    assert list(inspect.signature(state.get_message_res).parameters) == ["self", "message_ids", "run_id"]
    init = inspect.getsource(state.__init__)
    for attribute in ("self.message_ins_store", "self.message_ins_id_to_message_res_id", "self.nodes", "self.lock"):
        assert attribute in init, attribute
    assert callable(in_memory_linkstate.now)
    assert "state.get_message_ins(node_id=node_id, limit=1)" in inspect.getsource(vce_api.add_messages_to_queue)


def test_the_serverapp_runtime_names_exist() -> None:
    import importlib

    from flwr.supercore.constant import TaskType

    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    run_serverapp = importlib.import_module("flwr.superlink.runtime.run_serverapp")  # the module, not its function
    assert TaskType("flwr-serverapp") is TaskType.SERVER_APP and TaskType("flwr-clientapp") is TaskType.CLIENT_APP
    command = flower_superlink._get_superexec_command("127.0.0.1:1", None, None, 1, False)
    assert command[0] == "flower-superexec"  # what set_serverapp_superexec replaces
    assert {"runtime_api_address", "log_queue", "token", "insecure", "certificates", "parent_pid"} <= set(
        inspect.signature(run_serverapp.run_serverapp).parameters
    )


def test_the_object_pull_names_exist() -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    for module in (inflatable_utils, start_client_internal, http_grid):
        assert callable(module.pull_objects), module.__name__
    flower = getattr(inflatable_utils.pull_objects, "fedtrain_exact", inflatable_utils.pull_objects)  # not ours
    parameters = inspect.signature(flower).parameters
    assert {"initial_backoff", "backoff_cap"} <= set(parameters)
    assert "pull_objects(" in inspect.getsource(inflatable_utils.pull_and_inflate_object_from_tree)


def test_objects_not_yet_stored_are_retried_soon() -> None:
    """Flower retries after 1 s, then 2 s: an object that turns up on the third ask took 3 s to get."""
    import time

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    _flower.set_object_pull_backoff()
    asks: list[float] = []

    def pull(object_id: str) -> bytes:
        asks.append(time.monotonic())
        if len(asks) < 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert inflatable_utils.pull_objects(["abc"], pull) == {"abc": b"content"}
    gaps = [later - earlier for earlier, later in zip(asks, asks[1:], strict=False)]
    # fedtrain's 0.02 s then 0.04 s (+-20% jitter); a loaded machine may add a little, never Flower's 1 s
    assert len(gaps) == 2 and max(gaps) < 0.5, gaps


def test_the_control_api_client_names_exist() -> None:
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
    from flwr.supercore.credential_store import file_credential_store

    assert callable(read_superlink_connection) and callable(init_http_client_from_connection)
    assert callable(try_load_public_key) and ListNodesRequest and RegisterNodeRequest
    # read when a store is made, not only at import: control_client points it at the server's own FLWR_HOME
    assert "CREDENTIAL_FILE_PATH" in inspect.getsource(file_credential_store.FileCredentialStore.__init__)
