"""`fedtrain export --quantize int8`: a run's final model in 8-bit codes, its size, and its headline
metric on the run's central test split next to the full model's.

The metric is measured on the file's own bytes read back, so what is printed is what is shipped. Only a
simulation has a central test split (the server of a deployment holds no data; run.json records which);
without one, or for a run whose data, model or task was given from Python, the reason is reported
instead of a number.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtrain.errors import FedtrainError
from fedtrain.model_quantization import QUANTIZE_MODES, dequantize_state, quantized_bytes

CENTRAL_SPLIT = "central_test_split"  # run.json: whether the server evaluated on its own test split


@dataclass(frozen=True)
class QuantizedExport:
    """What `quantized_export` made: the file's bytes, sizes, and the metric of both models (or why not)."""

    data: bytes
    full_bytes: int  # the plain float export's size (`fedtrain export` without --quantize)
    round: int | None
    metric: str
    full: float | None
    quantized: float | None
    why_no_metric: str | None


def quantized_export(run_dir: Path, key_file: str | None, mode: str) -> QuantizedExport:
    """A run's final model quantised, with its size and central-test metric beside the full model's.

    Args:
        run_dir: the run's directory.
        key_file: its model key file (None: $FEDTRAIN_MODEL_KEY or the store).
        mode: the quantisation (only "int8").

    Returns:
        The export, not yet written.

    Raises:
        FedtrainError: an unknown mode, not a run, a wrong key, tampered files.
    """
    from fedtrain.security.keys import load_model_key
    from fedtrain.server.model_files import MODEL_FILE, load_model, read_run_info
    from fedtrain.server.verification import require_intact_reports

    if mode not in QUANTIZE_MODES:
        raise FedtrainError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, not {mode!r}.")
    info = read_run_info(run_dir)
    model_key = load_model_key(key_file)
    state, meta = load_model(run_dir / MODEL_FILE, model_key.key, info["run_id"], "model")
    require_intact_reports(run_dir, model_key)  # edited metrics or privacy report: no export
    full = io.BytesIO()
    torch.save(state, full)
    data = quantized_bytes(state)
    shipped = dequantize_state(data)
    metric, scores, why = _central_metric(run_dir, info, [state, shipped])
    return QuantizedExport(
        data, len(full.getvalue()), meta.get("round"), metric, scores[0], scores[1], why
    )  # fmt: skip


def _central_metric(
    run_dir: Path, info: Mapping, states: list[Mapping[str, torch.Tensor]]
) -> tuple[str, list[float | None], str | None]:
    """(the task's headline metric, its value for each state, None) or (name, Nones, why not)."""
    from fedtrain.components import outputs_for
    from fedtrain.config import from_mapping, load_toml
    from fedtrain.data.partition import simulation_test_set
    from fedtrain.evaluation import evaluate_task
    from fedtrain.models import build_model
    from fedtrain.tasks import build_task

    config = from_mapping(load_toml(run_dir / "config.toml"), str(run_dir / "config.toml"))
    nothing: list[float | None] = [None] * len(states)
    given = [v for v in (config.data.source, config.training.model, config.training.task) if v.startswith("python:")]
    if given:
        return "accuracy", nothing, "the run's data, model or task was given from Python"
    task = build_task(config.training.task)
    if not info.get(CENTRAL_SPLIT):
        return task.headline, nothing, "the run has no central test split (a deployment's server holds no data)"
    test_set = simulation_test_set(config, target_kind=task.target_kind)
    assert config.data.input_shape is not None  # a finished run's config records it
    model = build_model(config.training.model, config.data.input_shape, outputs_for(config, task),
                        hidden=config.training.hidden)  # fmt: skip
    scores: list[float | None] = []
    for state in states:
        model.load_state_dict(state, strict=True)
        scores.append(evaluate_task(model, test_set, torch.device("cpu"), task)[task.headline])
    return task.headline, scores, None
