"""Every release accounted (issue 12, acceptance 3): real kit clients with their default policy, under
fedtrain's own server loop with default settings; every field of every reply is in the table of
protocol.REPLY_FIELDS (docs/privacy.md), each released metric is paid for by a ledger entry in the
same reply, and the accounted total matches Opacus's own accountant over privacy.json's full ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant
from scipy.stats import norm

from fedtrain import protocol
from fedtrain.security.keys import generate_key, write_key_file
from fedtrain.server.loop import Federation
from tests.hostile import KitGrid, provision_clients, run_config
from tests.inprocess import flower_task

COVERS = {"dp-sgd", "gaussian", "public"}


def _fields(content) -> list[tuple[str, str]]:
    out = [(name, "*") for name in content.array_records]
    for kind in (content.metric_records, content.config_records):
        out += [(name, key) for name, record in kind.items() for key in record]
    return out


@pytest.mark.timeout(600)
def test_every_field_of_every_reply_is_covered_and_the_total_matches_opacus(tmp_path: Path) -> None:
    clients = provision_clients(tmp_path, 3)
    key = write_key_file(tmp_path / "model.key", generate_key())
    config = run_config(rounds=3, run_dir=str(tmp_path / "run"), key_file=str(key))  # everything else default
    grid = KitGrid(clients, config)
    with flower_task():
        rows = Federation(config, on_round=lambda row: None).run(grid)
    assert [row["clients_ok"] for row in rows] == [3, 3, 3]
    # one train reply per client per round (rounds 2 and 3 also evaluate the model they got: one task per
    # round), and the last model's evaluate replies
    assert [kind for kind, _ in grid.seen] == ["train"] * 9 + ["evaluate"] * 3

    releases: dict[str, int] = {}
    for kind, content in grid.seen:
        fields = _fields(content)
        for field in fields:
            cover = protocol.cover(*field)
            assert cover in COVERS, f"{kind} reply field {field} is not in the table (covered by {cover})"
        privacy = protocol.read_privacy(content.config_records[protocol.PRIVACY])
        released = [f for f in fields if protocol.cover(*f) == "gaussian"]
        assert released, f"a default {kind} reply releases its metrics privately"
        # each release is on the ledger the same reply carries: one more metrics entry than before (two for a
        # train reply that evaluated first)
        count = sum(1 for e in privacy.ledger.entries if e.kind == "metrics")
        evaluated_first = (protocol.METRICS, protocol.HELD_OUT_EXAMPLES) in fields
        assert count == releases.get(privacy.client, 0) + 1 + evaluated_first, (kind, privacy.client)
        releases[privacy.client] = count
        for name, key in released:
            assert content.metric_records[name][key + protocol.STD] > 0  # its noise, stated
        if kind == "train":
            assert (protocol.ARRAYS, "*") in [(n, "*") for n, _ in fields if n == protocol.ARRAYS]
            assert privacy.ledger.entries[-2].kind == "train"  # the update's DP-SGD round, then its loss

    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    for name, client in report["clients"].items():
        kinds = [e["kind"] for e in client["ledger"]]
        assert kinds == ["train", "metrics", "metrics"] * 3, name
        reference = PRVAccountant()
        reference.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in client["ledger"]]
        independent = reference.get_epsilon(delta=client["delta"])
        assert client["epsilon"] == pytest.approx(independent, rel=0.01)
        assert client["epsilon"] <= 3.0 + 1e-9  # the default target, training and metrics together
        # the metrics got their stated 5% of it: the 6 planned releases alone are one Gaussian mechanism of
        # mu = sqrt(6) / sigma, whose exact delta at epsilon 0.15 (Balle and Wang 2018) is the client's delta
        sigma = next(e["noise_multiplier"] for e in client["ledger"] if e["kind"] == "metrics")
        mu, eps = math.sqrt(6) / sigma, 0.05 * 3.0
        exact_delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        assert exact_delta == pytest.approx(client["delta"], rel=1e-3)
        assert client["metrics"] == "private" and client["lifetime_epsilon"] == pytest.approx(client["epsilon"])
    assert "every metric computed on private data is on the ledger" in report["metrics"]
    assert np.isfinite(rows[-1]["train_loss_std"]) and rows[-1]["train_loss_std"] > 0
