"""Client side of compressed updates: compress d = w_local - w_t with error feedback.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD"): what compression dropped this
round, e = (d + e_prev) - decoded, is added to the next round's update before it is compressed, so
nothing is lost for good, only delayed. The residual is this client's own: it lives in the node's
Flower context state (kept by the client's runtime between the messages of a run), keyed by the run
and never sent; a new run, or a model whose tensors changed, starts from zero. Everything here is a
function of updates DP-SGD already released: post-processing, at no privacy cost.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedtrain.compression import Compression, to_records
from fedtrain.config import Config

RESIDUAL = "fedtrain.compression-residual"  # in context.state: the residual, by tensor
RESIDUAL_RUN = "fedtrain.compression-run"  # in context.state: the run and mode the residual belongs to


def compression_of(config: Config) -> Compression:
    fed = config.federation
    return Compression(fed.compression, fed.compression_block, fed.topk_fraction)


def _residual(context: Context, run: str, mode: str, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This run's residual from the last round, or zeros when there is none that fits."""
    state = context.state
    owner = state.config_records.get(RESIDUAL_RUN)
    stored = state.array_records.get(RESIDUAL)
    if owner is None or stored is None or owner.get("run") != run or owner.get("mode") != mode:
        return {k: np.zeros_like(v) for k, v in update.items()}
    residual = {k: stored[k].numpy() for k in stored}
    if residual.keys() != update.keys() or any(residual[k].shape != v.shape for k, v in update.items()):
        return {k: np.zeros_like(v) for k, v in update.items()}
    return residual


def compress_update(
    update: dict[str, np.ndarray], config: Config, context: Context, run: str
) -> tuple[ArrayRecord, ConfigRecord | None]:
    """The update as it travels: its arrays record and, when compressed, its compression record.

    With compression off, every tensor travels as itself. Under secure aggregation (only modes whose
    sum is exact are allowed there: top-k) the decoded update travels dense, since the masked vector
    is dense anyway and Flower's SecAgg+ mod reads tensors by name.

    Args:
        update: d by tensor name (floating numpy arrays).
        config: the run's config (its federation.compression settings).
        context: this node's Flower context; its state keeps the error-feedback residual.
        run: the run's id (a residual never carries over to another run).

    Returns:
        (arrays record, compression record or None).
    """
    compression = compression_of(config)
    if not compression.active:
        return ArrayRecord({k: Array(v) for k, v in update.items()}), None
    residual = _residual(context, run, compression.mode, update)
    corrected = {k: (v + residual[k]).astype(v.dtype, copy=False) for k, v in update.items()}
    packed, decoded = compression.encode(corrected)
    context.state[RESIDUAL] = ArrayRecord({k: Array(np.asarray(corrected[k] - decoded[k])) for k in corrected})
    context.state[RESIDUAL_RUN] = ConfigRecord({"run": run, "mode": compression.mode})
    if config.federation.secure_aggregation:
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in decoded.items()}), None
    arrays, record = to_records(compression, packed, list(corrected))
    return arrays, record
