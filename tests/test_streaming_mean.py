"""StreamingMean against an independent weighted mean (numpy on the stacked updates, in float64, and
Flower's own FedAvg aggregation), its integer rule, its refusals, and its memory: the peak while
adding updates one at a time must not grow with their number, where a list-then-mean does."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedtrain.server.streaming_mean import StreamingMean

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 700), "fc.bias": (10,)}


def random_update(rng: np.random.Generator, dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    out = {}
    for name, dtype in dtypes.items():
        shape = SHAPES.get(name, (3,))
        if np.issubdtype(dtype, np.integer):
            out[name] = rng.integers(0, 1000, size=shape).astype(dtype)
        else:
            out[name] = (rng.normal(size=shape) * rng.uniform(0.1, 10)).astype(dtype)
    return out


def stacked_mean(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """The reference: every update at once, in float64."""
    return {
        name: np.average(np.stack([u[name].astype(np.float64) for u in updates]), axis=0, weights=weights)
        for name in updates[0]
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [7, 4096, 65_536])  # chunks that split tensors unevenly, and whole tensors
def test_equals_the_weighted_mean_of_the_stacked_updates(dtype, chunk):
    rng = np.random.default_rng(1)
    dtypes = {name: np.dtype(dtype) for name in SHAPES}
    updates = [random_update(rng, dtypes) for _ in range(40)]
    weights = [float(w) for w in rng.integers(1, 500, size=len(updates))]
    mean = StreamingMean(updates[0], chunk=chunk)
    for update, weight in zip(updates, weights, strict=True):
        mean.add(update, weight)
    expected = stacked_mean(updates, weights)
    result = mean.result()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for name in SHAPES:
        assert result[name].dtype == dtype and result[name].shape == SHAPES[name]
        np.testing.assert_allclose(result[name], expected[name], **tolerance)
    assert mean.count == 40 and mean.total_weight == sum(weights)


def test_equals_flowers_fedavg_aggregation():
    rng = np.random.default_rng(2)
    updates = [random_update(rng, dict.fromkeys(SHAPES, np.dtype(np.float32))) for _ in range(12)]
    weights = [10 * (i + 1) for i in range(12)]
    records = [
        RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in u.items()}), "metrics": MetricRecord({"num-examples": w})}
        )
        for u, w in zip(updates, weights, strict=True)
    ]
    flower = aggregate_arrayrecords(records, "num-examples")
    mean = StreamingMean(updates[0])
    for update, weight in zip(updates, weights, strict=True):
        mean.add(update, weight)
    for name, value in mean.result().items():
        np.testing.assert_allclose(value, flower[name].numpy(), rtol=1e-5, atol=1e-6)


def test_integer_buffers_get_the_rounded_weighted_mean_in_their_own_dtype():
    """Flower's FedAvg gives an int64 buffer (BatchNorm's num_batches_tracked) its float64 weighted
    mean; fedtrain keeps the dtype and rounds to the nearest integer."""
    template = {"w": np.zeros(3, np.float32), "steps": np.zeros((), np.int64), "counts": np.zeros(4, np.int32)}
    updates = [
        {"w": np.ones(3, np.float32), "steps": np.array(100), "counts": np.array([1, 2, 3, 4], np.int32)},
        {"w": np.ones(3, np.float32), "steps": np.array(101), "counts": np.array([2, 2, 2, 5], np.int32)},
        {"w": np.ones(3, np.float32), "steps": np.array(103), "counts": np.array([3, 9, 2, 6], np.int32)},
    ]
    weights = [1.0, 1.0, 2.0]  # steps: (100 + 101 + 206) / 4 = 101.75 -> 102
    mean = StreamingMean(template)
    for update, weight in zip(updates, weights, strict=True):
        mean.add(update, weight)
    result = mean.result()
    expected = stacked_mean(updates, weights)
    assert result["steps"].dtype == np.int64 and result["steps"].shape == () and int(result["steps"]) == 102
    assert result["counts"].dtype == np.int32
    np.testing.assert_array_equal(result["counts"], np.rint(expected["counts"]).astype(np.int32))
    # equal updates with these weights sum to 6.999999999999999 x the total weight: truncating would give 6
    same = StreamingMean(template)
    for i in range(100):
        same.add({"w": np.ones(3, np.float32), "steps": np.array(7), "counts": np.full(4, 9, np.int32)}, 0.3 * (i + 1))
    assert int(same.result()["steps"]) == 7 and (same.result()["counts"] == 9).all()


def test_a_malformed_update_is_refused_and_leaves_the_sums_untouched():
    template = {"a": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
    mean = StreamingMean(template)
    mean.add({"a": np.ones(4, np.float32), "b": np.ones(2, np.float32)}, 2)
    bad = [
        ({"a": np.full(4, 5, np.float32), "b": np.ones(3, np.float32)}, 1, "tensor b"),  # "a" is fine, "b" is not
        ({"a": np.full(4, 5, np.float32), "b": np.ones(2, np.float64)}, 1, "tensor b"),
        ({"a": np.full(4, 5, np.float32)}, 1, "different tensors"),
        ({"a": np.full(4, 5, np.float32), "b": np.ones(2, np.float32), "c": np.ones(1)}, 1, "different tensors"),
        ({"a": np.full(4, 5, np.float32), "b": np.ones(2, np.float32)}, 0, "weight"),
        ({"a": np.full(4, 5, np.float32), "b": np.ones(2, np.float32)}, float("nan"), "weight"),
    ]
    for update, weight, message in bad:
        with pytest.raises(ValueError, match=message):
            mean.add(update, weight)
    assert mean.count == 1 and mean.total_weight == 2.0
    np.testing.assert_array_equal(mean.result()["a"], np.ones(4, np.float32))
    with pytest.raises(ValueError, match="no update"):
        StreamingMean(template).result()


def test_non_contiguous_updates_are_averaged_correctly():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    mean = StreamingMean({"t": np.zeros((6, 4), np.float32)}, chunk=5)
    mean.add({"t": base.T}, 1)  # a transposed view: not C-contiguous
    mean.add({"t": np.zeros((6, 4), np.float32)}, 3)
    np.testing.assert_allclose(mean.result()["t"], base.T / 4)


def test_keeps_no_reference_to_an_update():
    mean = StreamingMean({"t": np.zeros(10, np.float32)})
    update = np.ones(10, np.float32)
    alive = weakref.ref(update)
    mean.add({"t": update}, 1)
    del update
    gc.collect()
    assert alive() is None


# ------------------------------------------------------------------ memory

PARAMS = 1_000_000  # float32: 4 MB per update
UPDATE_BYTES = 4 * PARAMS


def streaming_peak(n: int) -> int:
    """Peak traced memory while n updates are made one at a time, added and dropped."""
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        mean = StreamingMean({"w": np.zeros(PARAMS, np.float32)})
        for _ in range(n):
            mean.add({"w": rng.standard_normal(PARAMS, dtype=np.float32)}, 3.0)
        mean.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def list_then_mean_peak(n: int) -> int:
    """The control: keep every update, then average (what `send_and_receive` + FedAvg amounts to)."""
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        updates = [rng.standard_normal(PARAMS, dtype=np.float32) for _ in range(n)]
        np.average(np.stack(updates), axis=0, weights=[3.0] * n)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def does_not_grow(peak_small: int, peak_large: int) -> bool:
    return peak_large < peak_small + UPDATE_BYTES


def test_peak_memory_does_not_grow_with_the_number_of_updates():
    small, large = streaming_peak(10), streaming_peak(200)
    assert small >= 2 * UPDATE_BYTES  # the sums and one update are traced: the measure sees numpy's buffers
    assert does_not_grow(small, large), (small, large)


def test_control_a_list_then_mean_grows_with_the_number_of_updates():
    small, large = list_then_mean_peak(10), list_then_mean_peak(30)
    assert not does_not_grow(small, large), (small, large)
