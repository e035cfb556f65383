"""Client side of secure aggregation: Flower's SecAgg+ mod, fed with fedtrain's update.

Flower's `secaggplus_mod` runs the protocol's client stages (keys, shares, masking, unmasking) and,
in the stage that collects masked vectors, calls the train handler and masks what it returns. It
expects a legacy reply (`fitres.*` records); `legacy_update` turns fedtrain's reply into one:

- the update d, in the order of the global arrays the server sent, bounded to L2 norm R (the
  round's quantisation range, sent by the server). Flower quantises each coordinate into [-R, R]
  and silently clips anything outside; with ||d||_2 <= R no coordinate can fall outside. Scaling
  an update down is post-processing of DP-SGD's output: it costs no privacy. Both the scaling and
  any coordinate still outside the range are counted in the reply's metrics, never silent.
- weight 1 (uniform mean), or weight 0 and a zero update when the client refuses the round (or its
  handler failed): it still takes part in masking, so the protocol goes on, and the server's mean
  leaves it out.

fedtrain's own records (metrics, privacy ledger) stay in the reply beside the masked vector.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtrain import protocol
from fedtrain.errors import FedtrainError

SCALED = protocol.SECAGG_SCALED  # 1 when this client's update was scaled down to the range
CLIPPED = protocol.SECAGG_CLIPPED  # coordinates outside [-R, R] that quantisation would clip
LEGACY_PARAMETERS, LEGACY_EXAMPLES = "fitres.parameters", "fitres.num_examples"


def bound_update(update: dict[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], bool]:
    """(update scaled to L2 norm <= bound, whether it had to be scaled)."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values())))
    if not np.isfinite(norm):
        raise FedtrainError("this client's update has NaN or infinite values; it sends none this round.")
    if norm <= bound:
        return update, False
    return {k: (v * (bound / norm)).astype(v.dtype) for k, v in update.items()}, True


def values_outside(update: dict[str, np.ndarray], bound: float) -> int:
    """Coordinates that Flower's quantisation would clip to [-bound, bound]."""
    return sum(int(np.count_nonzero(np.abs(v) > bound)) for v in update.values())


def legacy_update(reply: Message, sent: Message, bound: float) -> Message:
    """fedtrain's train reply as the legacy `fitres` records that Flower's SecAgg+ mod masks."""
    if reply.has_error():
        return reply
    content = reply.content
    global_arrays = protocol.global_arrays(sent)
    names = list(global_arrays.keys())
    if protocol.ARRAYS not in content.array_records:  # a refusal or a failure: no update
        update = {k: np.zeros_like(global_arrays[k].numpy()) for k in names}
        weight = 0
    else:
        arrays = content.array_records[protocol.ARRAYS]
        # every global tensor, in order (zeros for what this model does not train): one vector length for all
        sent_update = {k: arrays[k].numpy() if k in arrays else np.zeros_like(global_arrays[k].numpy()) for k in names}
        update, scaled = bound_update(sent_update, bound)
        outside = values_outside(update, bound)  # 0 unless float rounding or a skipped bound
        weight = 1
        metrics = content.metric_records[protocol.METRICS]
        metrics[SCALED] = int(scaled)
        metrics[CLIPPED] = outside
    content[LEGACY_PARAMETERS] = ArrayRecord({str(i): Array(update[k]) for i, k in enumerate(names)})
    content[LEGACY_EXAMPLES] = MetricRecord({"num_examples": weight})
    content["fitres.metrics"] = ConfigRecord()
    content["fitres.status"] = ConfigRecord({"code": 0, "message": "Success"})
    return reply


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Runs SecAgg+ for train messages that carry its stage; every other message passes through."""
    if msg.metadata.message_type != "train" or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    bound = None
    if configs.get(Key.STAGE) == Stage.SETUP:
        context.state["fedtrain.secagg"] = ConfigRecord({"bound": protocol.number(configs[Key.CLIPPING_RANGE])})
    if "fedtrain.secagg" in context.state.config_records:
        bound = protocol.number(context.state.config_records["fedtrain.secagg"]["bound"])

    def train_then_adapt(train_msg: Message, ctx: Context) -> Message:
        if bound is None:
            raise FedtrainError("secure aggregation reached masking without its setup stage; the round fails.")
        return legacy_update(call_next(train_msg, ctx), train_msg, bound)

    return secaggplus_mod(msg, context, train_then_adapt)
