"""The client owns its privacy (issue 12, acceptance 1): settings a hostile server puts in its run
config are refused by each client, with the reason, before any data is touched; code the server
names is never imported; the server's run goes on or stops as the other clients' policies allow."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest

from fedtrain import protocol
from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.privacy.policy import ClientPolicy
from fedtrain.security.keys import fedtrain_home, generate_key, write_key_file
from fedtrain.server.loop import Federation
from fedtrain.simulation import prepare
from tests.hostile import initial_weights, provision_clients, run_config
from tests.inprocess import AppGrid, flower_task

HOSTILE = {
    "noise 0.3": (
        {"noise_multiplier": 0.3, "target_epsilon": None},
        "noise multiplier 0.3 is below this client's minimum 0.5",
    ),
    "held-out share 0.5": (
        {"eval_fraction": 0.5},
        "holds out 0.5 of the shard for evaluation, more than this client's max_eval_fraction 0.2",
    ),
    "epsilon 8": ({"target_epsilon": 8.0}, "targets epsilon 8, more than this client's max_run_epsilon 3"),
    "plain metrics": ({"metrics": "plain"}, "asks for plain metrics; this client releases at most private metrics"),
    "whole shard per step": ({"batch_size": 1000}, "sample rate of 1, above this client's max_sample_rate 0.5"),
}  # fmt: skip


def _reasons(reply) -> protocol.Reply:
    return protocol.read_reply(reply)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_setting_is_refused_before_the_data_is_touched(tmp_path: Path, case: str, monkeypatch) -> None:
    settings, reason = HOSTILE[case]
    (client,) = provision_clients(tmp_path, 1)
    config = run_config(**settings)
    touched: list[str] = []
    import fedtrain.clients.handlers as handlers

    real = handlers.client_data
    monkeypatch.setattr(handlers, "client_data", lambda *a: touched.append("data") or real(*a))
    reply = _reasons(client.send("train", config, initial_weights(config)))
    assert reply.kind == "refused" and reply.refusal_kind == protocol.POLICY, reply
    assert reason in reply.reason and reply.reason.startswith("client-1 refuses this run:"), reply.reason
    if case != "whole shard per step":  # the sample rate needs the shard's size: checked once it is known
        assert not touched
    # nothing was spent: the client's lifetime ledger holds no entry
    assert not (fedtrain_home() / "ledgers" / "client-1" / "ledger.ftenc").exists()
    evaluate = _reasons(client.send("evaluate", config, initial_weights(config)))
    assert evaluate.kind == "refused" and reason in evaluate.reason


def test_a_model_the_server_names_is_never_imported(tmp_path: Path, monkeypatch) -> None:
    """`model = "tempfile:mkdtemp"` made every client call that function; any installed callable that
    needs no arguments could be run. Here the module writes a marker when imported."""
    module = tmp_path / "server_named_code.py"
    marker = tmp_path / "imported"
    module.write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("ran")
        def factory(**kwargs):
            raise SystemExit("the server's code ran")
    """))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    (client,) = provision_clients(tmp_path, 1)
    honest = run_config()
    for model in ("server_named_code:factory", "tempfile:mkdtemp"):
        reply = _reasons(client.send("train", honest.replace(model=model), initial_weights(honest)))
        assert reply.kind == "refused" and reply.refusal_kind == protocol.POLICY
        assert f"the run's model {model!r} is not one this client accepts (logistic, mlp, cnn)" in reply.reason
    assert not marker.exists() and "server_named_code" not in sys.modules


def test_a_client_that_lists_a_model_runs_it(tmp_path: Path, monkeypatch) -> None:
    module = tmp_path / "listed_model.py"
    module.write_text("from torch import nn\ndef build(input_shape, num_classes):\n"
                      "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    (client,) = provision_clients(tmp_path, 1)
    policy = client.kit / "policy.toml"
    policy.write_text(
        policy.read_text().replace('models = ["logistic", "mlp", "cnn"]', 'models = ["listed_model:build"]')
    )
    config = run_config(model="listed_model:build")
    reply = _reasons(client.send("train", config, initial_weights(config)))
    assert reply.kind == "update", reply


def test_the_run_goes_on_with_clients_whose_policy_admits_it_and_stops_without_them(tmp_path: Path) -> None:
    """Five simulated clients; three hold a strict policy. The server asks noise 0.3: those three refuse
    and the run goes on with the two others; when every client is strict the run stops, saying why."""
    strict = tmp_path / "strict.toml"
    strict.write_text(ClientPolicy().to_toml())
    key = write_key_file(tmp_path / "model.key", generate_key())
    config, test_set = prepare(
        Config(
            rounds=2,
            noise_multiplier=0.3,
            target_epsilon=None,
            max_epsilon=100.0,
            run_dir=str(tmp_path / "run"),
            key_file=str(key),
            fraction_evaluate=0.0,
        )  # fmt: skip
    )
    grid = AppGrid(config)
    for node in (1, 2, 3):
        grid.contexts[node].node_config["policy"] = str(strict)
    with flower_task():
        rows = Federation(config, test_set=test_set, on_round=lambda row: None).run(grid)
    assert [row["clients_ok"] for row in rows] == [2, 2]
    assert sorted(rows[0]["refused"]) == ["client-0", "client-1", "client-2"]
    assert all("noise multiplier 0.3 is below this client's minimum 0.5" in r for r in rows[0]["refused"].values())

    config = config.replace(run_dir=str(tmp_path / "run2"))
    grid = AppGrid(config)
    for context in grid.contexts.values():
        context.node_config["policy"] = str(strict)
    with (
        flower_task(),
        pytest.raises(FedtrainError, match=r"round 1: 0 usable updates.*5 refused the run.*minimum 0.5"),
    ):
        Federation(config, test_set=test_set, on_round=lambda row: None).run(grid)


def test_policy_file_round_trip_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(ClientPolicy().to_toml())
    assert ClientPolicy.load(path) == ClientPolicy()
    for text, message in (
        ("max_run_epsilon = -1\n", "max_run_epsilon in policy file"),
        ("metrics = 'loud'\n", "metrics in policy file"),
        ("models = 'cnn'\n", "models in policy file"),
        ("noise = 1\n", "unknown key 'noise'"),
        ("max_run_epsilon = [\n", "is not valid TOML"),
    ):
        path.write_text(text)
        with pytest.raises(FedtrainError, match=message):
            ClientPolicy.load(path)
    with pytest.raises(FedtrainError, match="does not exist"):
        ClientPolicy.load(tmp_path / "missing.toml")


def test_a_simulation_admits_its_own_settings() -> None:
    config = Config(noise_multiplier=0.3, target_epsilon=None, eval_fraction=0.5, metrics="plain", model="mlp")
    policy = ClientPolicy.admitting(config)
    assert policy.refusal_for_run(config) is None
    assert policy.max_run_epsilon == math.inf and policy.models == ("mlp",)
