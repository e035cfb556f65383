"""Seconds per round of `fedtrain simulate` (Flower's Simulation Engine, Ray) with 10, 100 and 1000
clients, every client training in every round, and how the cost per trained client scales.

    python benchmarks/simulation_scale.py                      # 5-10 minutes on 2 loaded cores (RESULTS.md)
    python benchmarks/simulation_scale.py --clients 10,100 --json /tmp/simulation_scale.json

Each client count is one real `fedtrain simulate` process (the CLI, so Ray starts fresh each time)
on a synthetic dataset of 8x8 one-channel images in 10 classes (a fixed template per class plus
noise), 20 samples per client: digits has 1797 samples, and fedtrain's partitioner needs at least
2 per client, so it cannot feed 1000 clients, and equal shards keep the per-client work the same
at every count. Logistic regression, 1 local epoch, expected batch 10, DP-SGD with a fixed noise
multiplier and the RDP accountant, each client's sealed ledger on disk, no federated evaluation
(the server's central evaluation stays). Every client trains in every round (fraction_train 1).

Seconds per round: the server loop's own time per round (metrics.json), median of the rounds after
the first (the first also starts the Ray actors and has each client plan its run); 3 rounds. Seconds
per trained client: that over the clients. There is no baseline to compare with, so the target is on
scaling: the cost per trained client at the largest count is at most 1.5x the cost at the middle one
(linear or better). Also listed: the peak memory of the whole process group (driver and Ray).

What kept 1000 clients all training from finishing a round before (issue 17), and what was done:
- Flower 1.42's Simulation Engine asks the in-memory SuperLink state for each node's next message
  every 0.1 s, and each call re-validated every stored message: nodes x messages checks per pass
  (8.6 s at 1000 x 1000). fedtrain's simulation now runs an indexed state (fedtrain/_flower.py
  IndexedLinkState): a poll checks only the polling node's own messages and those that expired, and
  the server's pulls skip messages with no reply yet (tests/test_linkstate_index.py).
- Every client probed which Opacus grad-sample mode matches hooks on the same global model; a
  process now keeps the verdict per model fingerprint (fedtrain/clients/grad_sample_mode.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing fedtrain
from fedtrain.processes import ManagedProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_CLIENT = 20
TEST_FRACTION = 0.1  # fedtrain's default: the server's central test split
TARGET_SCALING = 1.5  # per-client seconds at the largest count / at the next count
ROUNDS = 3  # the first is not counted
TIMEOUT = {10: 240, 100: 600}  # seconds per simulate process, Ray's start included; others: 3 s per client-round
ROUND_TIMEOUT = 3600  # fedtrain's default 600 s would drop clients of a slow round on a loaded machine
TRAINING = [
    "--model", "logistic", "--local-epochs", "1", "--batch-size", "10",
    "--noise-multiplier", "1.0", "--accountant", "rdp", "--partition", "iid", "--seed", "0",
]  # fmt: skip


def synthetic_dataset(path: Path, clients: int, seed: int = 0) -> None:
    """Learnable 8x8 images: class template + Gaussian noise; enough samples for equal shards."""
    n = int(np.ceil(clients * SAMPLES_PER_CLIENT / (1 - TEST_FRACTION))) + 1
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 1, size=(10, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=n)
    x = np.clip(templates[y] + rng.normal(0, 0.3, size=(n, 1, 8, 8)), 0, 1).astype(np.float32)
    np.savez(path, x=x, y=y.astype(np.int64))


def group_rss(group: int) -> int:
    """Resident bytes of every process in process group `group` (Linux /proc; 0 elsewhere)."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:  # pgrp
                total += int((stat.parent / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return total


def simulate(work: Path, clients: int, rounds: int, timeout: float) -> tuple[list[dict], float, int]:
    """Run `fedtrain simulate` once; the metrics rows, the process's wall time and its group's peak RSS."""
    data, config, run_dir = work / f"data-{clients}.npz", work / f"config-{clients}.toml", work / f"run-{clients}"
    synthetic_dataset(data, clients)
    config.write_text(f"fraction_evaluate = 0.0\nfraction_train = 1.0\nround_timeout = {ROUND_TIMEOUT}\n")
    argv = [sys.executable, "-m", "fedtrain.cli", "simulate", "--config", str(config), "--data", str(data)]
    argv += ["--clients", str(clients), "--rounds", str(rounds), "--run-dir", str(run_dir), *TRAINING]
    env = {**os.environ, "FEDTRAIN_HOME": str(work / "home"), "COLUMNS": "120"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's fedtrain
    started = time.monotonic()
    process = ManagedProcess(f"simulate-{clients}", argv, env, work / f"simulate-{clients}.log")
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            peak[0] = max(peak[0], group_rss(process.process.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{clients} clients: no result within {timeout:.0f} s") from None
    finally:
        done.set()
        watcher.join(timeout=30)
        process.stop()  # the whole process group: whatever Ray left behind, or everything on a timeout
    wall = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"{clients} clients: fedtrain simulate exited with {code}:\n{process.log_tail(15)}")
    return json.loads((run_dir / "metrics.json").read_text()), wall, peak[0]


def row(measure: str, value: float | None, target: str, passed: bool, baseline=None, ratio=None) -> dict:
    return {
        "measure": measure,
        "baseline": baseline,
        "value": value,
        "ratio": ratio,
        "target": target,
        "passed": passed,
    }


def run(counts: list[int], rounds: int) -> list[dict]:
    rows, per_client = [], {}
    with tempfile.TemporaryDirectory(prefix="fedtrain-scale-") as tmp:
        for clients in counts:
            counted = f"round {rounds}" if rounds == 2 else f"median of rounds 2-{rounds}"
            measure = f"seconds per round, {clients} clients, all training ({counted})"
            timeout = TIMEOUT.get(clients, 120 + 3 * clients * rounds)
            try:
                metrics, wall, peak = simulate(Path(tmp), clients, rounds, timeout)
            except (TimeoutError, RuntimeError) as exc:
                print(f"{clients:>5} clients: FAILED: {exc}", flush=True)
                rows.append(row(measure, None, "completes", False))
                continue
            seconds = [m["seconds"] for m in metrics]
            median = statistics.median(seconds[1:])
            per_client[clients] = median / clients
            ok = len(metrics) == rounds and all(m["clients_ok"] == clients for m in metrics)
            print(
                f"{clients:>5} clients, all training: {median:7.2f} s/round "
                f"({1000 * per_client[clients]:6.1f} ms per trained client), rounds "
                f"{', '.join(f'{s:.2f}' for s in seconds)} s, whole process {wall:.0f} s, "
                f"peak memory {peak / 2**30:.2f} GiB, accuracy {metrics[-1]['accuracy']:.3f}, "
                f"every client's update used in every round: {ok}",
                flush=True,
            )
            for m in metrics:
                for name, why in list({**m["failed"], **m["refused"]}.items())[:3]:
                    print(f"      round {m['round']}: {m['clients_ok']} ok; {name}: {why}", flush=True)
            rows.append(row(measure, round(median, 3), f"{rounds} rounds complete, every client's update used", ok))
    if len(counts) >= 2 and all(c in per_client for c in counts[-2:]):
        middle, largest = counts[-2:]
        ratio = per_client[largest] / per_client[middle]
        rows.append(
            row(
                f"seconds per trained client per round, {largest} clients (baseline: {middle} clients)",
                round(per_client[largest], 5),
                f"<= {TARGET_SCALING} (linear scaling or better)",
                ratio <= TARGET_SCALING,
                baseline=round(per_client[middle], 5),
                ratio=round(ratio, 3),
            )
        )
        print(f"cost per trained client, {largest} vs {middle} clients: {ratio:.2f}x (target <= {TARGET_SCALING})")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="10,100,1000", help="comma-separated client counts, ascending")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds for every count (default {ROUNDS})")
    p.add_argument("--json", type=Path, default=None, help="write the rows here (benchmarks/run.py's format)")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or counts != sorted(counts) or counts[0] < 2 or args.rounds < 2:
        p.error("--clients must be ascending counts >= 2, --rounds >= 2 (the first round is not counted)")
    print(f"simulation scale: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start", flush=True)
    started = time.monotonic()
    rows = run(counts, args.rounds)
    print(f"{sum(r['passed'] for r in rows)}/{len(rows)} passed in {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
