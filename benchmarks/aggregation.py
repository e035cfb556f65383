"""Server aggregation: time and peak memory to average N client updates of P float32 parameters.

    python benchmarks/aggregation.py                 # the default grid, about a minute on 2 cores
    python benchmarks/aggregation.py --quick --json /tmp/aggregation.json

Targets (issue #6, part 4): fedtrain's streaming weighted mean (fedtrain/server/streaming_mean.py)
has at least half the throughput of a plain numpy in-place sum of the same bytes
(`np.add(acc, u, out=acc)` over the same updates, measured alternately in the same run), and its
peak memory does not grow with N: the peak at the largest N stays below the peak at the smallest N
plus one update.

Grid: throughput is bytes per second, one pass over each update, so it does not depend on N beyond
a few updates; a large N at a large P would add minutes, not information. P = 25M is measured at
N = 10 and 20, P = 5M up to N = 100, and P = 1M at N = 10, 100 and 1000 (the N-dependence, for
memory). Updates come from a pool of pre-made arrays (64 MB or more, beyond the L3 cache, so both
sides read from memory as real replies would), cycled, so making them costs nothing in the timing.
For memory, each update is a fresh copy (as a deserialised reply is), added and dropped, under
tracemalloc, which sees numpy's buffers; the pool itself is made before tracing starts.
Both sides run on one core: numpy's ufuncs do (streaming_mean.py says why fedtrain keeps it so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing fedtrain
from fedtrain.server.streaming_mean import StreamingMean  # noqa: E402

TARGET_RATIO = 0.5  # fedtrain throughput / numpy in-place sum throughput
MILLION = 1_000_000
GRID = {1 * MILLION: (10, 100, 1000), 5 * MILLION: (10, 100), 25 * MILLION: (10, 20)}
QUICK_GRID = {1 * MILLION: (10, 100), 5 * MILLION: (10, 20)}
POOL_BYTES = 64 * 2**20  # at least this much distinct update data, so it cannot sit in the L3 cache
LAYER_SHARES = (0.4, 0.3, 0.2)  # a model's P split into a few large tensors, the rest and two biases
BIAS = 512

Update = dict[str, np.ndarray]


def layout(params: int) -> dict[str, int]:
    """Tensor name -> size, summing to `params`: large weights and small biases, like a model."""
    sizes = {f"layer{i}.weight": int(params * share) for i, share in enumerate(LAYER_SHARES)}
    sizes["layer0.bias"] = sizes["layer1.bias"] = BIAS
    sizes["head.weight"] = params - sum(sizes.values())
    return sizes


def split(flat: np.ndarray, sizes: dict[str, int]) -> Update:
    """Views of one flat array, one per tensor (no copies)."""
    bounds = np.cumsum(list(sizes.values()))[:-1]
    return dict(zip(sizes, np.split(flat, bounds), strict=True))


def make_pool(params: int, seed: int = 0) -> list[Update]:
    rng = np.random.default_rng(seed)
    count = max(2, -(-POOL_BYTES // (4 * params)))
    return [split(rng.standard_normal(params, dtype=np.float32), layout(params)) for _ in range(count)]


def weight_of(i: int) -> float:
    return float(50 + (i * 37) % 200)  # unequal example counts, as real clients have


def numpy_sum(pool: list[Update], n: int) -> None:
    """The baseline: a plain in-place sum of the same arrays (no weights, no division)."""
    total = {name: np.zeros_like(a) for name, a in pool[0].items()}
    for i in range(n):
        for name, value in pool[i % len(pool)].items():
            np.add(total[name], value, out=total[name])


def streaming_mean(pool: list[Update], n: int) -> None:
    mean = StreamingMean(pool[0])
    for i in range(n):
        mean.add(pool[i % len(pool)], weight_of(i))
    mean.result()


def seconds(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def timing_row(pool: list[Update], params: int, n: int, repeats: int) -> dict:
    baseline, fedtrain = [], []
    for _ in range(repeats):  # alternated, so a busy moment on the machine hits both sides
        baseline.append(seconds(lambda: numpy_sum(pool, n)))
        fedtrain.append(seconds(lambda: streaming_mean(pool, n)))
    base, value = min(baseline), min(fedtrain)  # best of: the least disturbed run of each
    ratio = base / value  # same bytes: throughput ratio = time ratio inverted
    gb = n * params * 4 / 1e9
    passed = ratio >= TARGET_RATIO
    print(
        f"N={n:>5} P={params / MILLION:>4.0f}M  {gb:6.2f} GB  numpy sum {base:7.3f} s ({gb / base:5.1f} GB/s)  "
        f"fedtrain {value:7.3f} s ({gb / value:5.1f} GB/s)  ratio {ratio:.2f}  {'PASS' if passed else 'FAIL'}",
        flush=True,
    )
    size = f"N={n} updates of P={params / MILLION:g}M float32"
    return {
        "measure": f"seconds to aggregate {size} (ratio: throughput vs a numpy in-place sum)",
        "baseline": round(base, 4),
        "value": round(value, 4),
        "ratio": round(ratio, 3),
        "target": f">= {TARGET_RATIO}",
        "passed": passed,
    }


def streaming_peak(pool: list[Update], n: int) -> int:
    """Peak traced bytes while n updates arrive one at a time (fresh copies), are added and dropped."""
    tracemalloc.start()
    try:
        mean = StreamingMean(pool[0])
        for i in range(n):
            arrived = {name: value.copy() for name, value in pool[i % len(pool)].items()}
            mean.add(arrived, weight_of(i))
            del arrived
        mean.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def memory_row(pool: list[Update], params: int, ns: tuple[int, ...]) -> dict:
    small, large = streaming_peak(pool, min(ns)), streaming_peak(pool, max(ns))
    one_update = 4 * params
    passed = large < small + one_update
    mb = 2**20
    print(
        f"peak memory P={params / MILLION:g}M: N={min(ns)} {small / mb:.1f} MB, N={max(ns)} {large / mb:.1f} MB "
        f"(one update {one_update / mb:.1f} MB)  {'PASS' if passed else 'FAIL'}",
        flush=True,
    )
    return {
        "measure": f"peak MB aggregating P={params / MILLION:g}M float32, N={min(ns)} (baseline) vs N={max(ns)}",
        "baseline": round(small / mb, 2),
        "value": round(large / mb, 2),
        "ratio": round(large / small, 3),
        "target": f"< N={min(ns)} peak + one update ({one_update / mb:.1f} MB): no growth with N",
        "passed": passed,
    }


def run(grid: dict[int, tuple[int, ...]], repeats: int) -> list[dict]:
    rows = []
    for params, ns in grid.items():
        pool = make_pool(params)
        for n in ns:
            rows.append(timing_row(pool, params, n, repeats))
        rows.append(memory_row(pool, params, ns))
        del pool
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small grid (P up to 5M, N up to 100), for a smoke run")
    p.add_argument("--repeats", type=int, default=3, help="alternated timed runs of each side; the best counts")
    p.add_argument("--json", type=Path, default=None, help="write the rows here (benchmarks/run.py's format)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    print(
        f"aggregation benchmark: numpy {np.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    started = time.perf_counter()
    rows = run(QUICK_GRID if args.quick else GRID, args.repeats)
    print(f"{sum(r['passed'] for r in rows)}/{len(rows)} passed in {time.perf_counter() - started:.0f} s")
    print(f"median throughput ratio {statistics.median(r['ratio'] for r in rows if 'seconds' in r['measure']):.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
