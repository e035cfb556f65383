"""`fedtrain audit` end to end, small: a positive control (noise silently removed, the ledger still claiming
its epsilon) is caught and exits non-zero, and bad options are one sentence. The bound the run records is
checked against Clopper-Pearson's (scipy), an independent reference for the epsilon its correct guesses
prove. The full-size runs (the demo's audit, its positive control at epsilon 3, the tiny-noise power run)
are benchmarks/audit_power.py (make bench): each is a simulation of minutes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from fedtrain.audit.guesses import GUESS_SHARES
from tests.conftest import run_cli

# small and fast: 660 gradient canaries (the logistic model's values), 6 rounds so that nearly every included
# canary is sampled at least once (Poisson, q per step: about e^-6 of them never are), a claim of epsilon 1
SMALL = ["--clients", "2", "--rounds", "6", "--target-epsilon", "1"]


def clopper_pearson_epsilon(guesses: int, correct: int, significance: float) -> float:
    """Under pure epsilon-DP each guess is right with probability at most e^eps / (1 + e^eps), independently
    enough that the correct count is dominated by a Binomial: Clopper-Pearson's one-sided lower confidence
    bound on that probability, mapped back to epsilon (0 when it is at most 1/2)."""
    if correct == 0:
        return 0.0
    low = float(stats.beta.ppf(significance, correct, guesses - correct + 1))
    return max(0.0, math.log(low / (1 - low))) if low < 1 else math.inf


def _audited(run_dir: Path) -> dict:
    report = json.loads((run_dir / "privacy.json").read_text())
    section = report["audit"]
    # the counts tried share the error (Bonferroni); with delta > 0 the theorem can only give less than
    # Clopper-Pearson's pure-DP bound, and by little (its delta term is 2 m delta times a probability)
    significance = (1 - section["confidence"]) / len(GUESS_SHARES)
    for tried in section["tried"]:
        reference = clopper_pearson_epsilon(tried["guesses"], tried["correct"], significance)
        assert tried["epsilon_lower"] <= reference + 1e-6
        assert tried["epsilon_lower"] >= reference - 0.1
    return report


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_positive_control_is_caught_and_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "control"
    code, out, err = run_cli(["audit", "--positive-control", *SMALL, "--run-dir", str(run_dir)], capsys)
    assert code == 3, err
    assert "Traceback" not in err
    assert "the privacy guarantee is broken" in " ".join(err.split())
    report = _audited(run_dir)
    section = report["audit"]
    # the truth: without noise, no finite epsilon holds; the audit must show more than the ledger claims
    assert section["epsilon"] == pytest.approx(1.0, abs=0.05)
    assert section["epsilon_lower"] > 2 * section["epsilon"]
    assert section["positive_control"] and "POSITIVE CONTROL" in report["positive_control"]
    run = json.loads((run_dir / "run.json").read_text())
    assert "POSITIVE CONTROL" in run["positive_control"]  # no file of this run passes for an ordinary one


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--canary-kind", "membership"], "--canary-kind must be one of gradient, input"),
        (["--confidence", "1.5"], "--confidence must be in (0, 1)"),
        (["--canaries", "1"], "at least 2 canaries"),
        (["--canaries", "100000"], "trainable values, not 100000"),
    ],
)
def test_bad_audit_options_are_one_sentence_and_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["audit", "--clients", "2", "--rounds", "1", *arguments, "--run-dir", str(run_dir)], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert message in " ".join(err.split())
    assert not run_dir.exists()
