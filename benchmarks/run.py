"""Run fedtrain's benchmarks with small settings and print one table of measures and verdicts.

    python benchmarks/run.py                                   # all of them: under 15 minutes on 2 cores
    python benchmarks/run.py --only encryption_cost,dp_throughput --json /tmp/bench.json
    make bench

The contract between this runner and a benchmark script: the script takes `--json PATH` and writes

    {"rows": [{"measure": str,            what is measured, units and baseline included
               "baseline": float | null,  the baseline's number (null where there is none)
               "value": float | null,     fedtrain's number (null where it could not be measured)
               "ratio": float | null,     the number the target is about
               "target": str,             e.g. ">= 0.5", "< 0.02"
               "passed": bool,            decided by the script, which knows its target
               "error": str}, ...]}       optional: why a row has no value

Other top-level keys are the script's own details. Its exit status is not its verdict: a script may
exit 1 for a missed target and still have written its rows. A script that crashes, runs past its time
or writes no rows becomes one FAIL row with the reason; one that is not in this checkout is skipped.
Each runs in its own process (a crash or a leak stays there), in its own session so a timeout stops
everything it started; those that open sockets run where only loopback exists (scripts/loopback-only).
The settings are the smallest that still measure what the target is about; the scripts' own
defaults (documented in each) are the ones for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing fedtrain

from fedtrain.processes import ManagedProcess  # noqa: E402

BUDGET_S = 14 * 60  # `make bench` must finish within 15 minutes on the 2-core development machine


@dataclass(frozen=True)
class Benchmark:
    name: str  # benchmarks/<name>.py
    args: str  # small settings, as on a command line (the --json argument is added)
    timeout_s: int  # never more than what is left of the budget
    loopback_only: bool = False  # it starts servers: run it in a network namespace with loopback only


# One thread for DP-SGD as fedtrain's clients train (clients/handlers.py: handle_train); with two threads
# on two cores shared with other work, torch's thread pool waits on itself and the ratio halves.
DP_SETTINGS = "--model cnn --device cpu --modes fedtrain --steps 10 --repeats 5 --threads 1"

# Cheapest first, so a slow one at the end cannot starve the others of the budget.
BENCHMARKS = (
    Benchmark("dp_throughput", DP_SETTINGS, 150),
    Benchmark("encryption_cost", "--rounds 3", 150),
    Benchmark("aggregation", "--quick", 180),
    Benchmark("accuracy", "--quick", 240),
    Benchmark("large_payload", "", 240),  # a 1 GB update: the size, no smaller setting
    # 10, 100 and 1000 clients, all training, 3 rounds each (issue 17): 310-615 s measured at load 8-27
    Benchmark("simulation_scale", "", 900, loopback_only=True),
    Benchmark("deployment_overhead", "--rounds 3 --repeats 3", 600, loopback_only=True),
    # the audit's power and its positive control (issue 20); the demo's own audit: benchmarks/audit_power.py
    Benchmark("audit_power", "--only control,tiny", 840),
)


def failed_row(benchmark: Benchmark, reason: str) -> dict:
    return {
        "benchmark": benchmark.name,
        "measure": f"benchmarks/{benchmark.name}.py",
        "baseline": None,
        "value": None,
        "ratio": None,
        "target": "runs",
        "passed": False,
        "error": reason,
    }


def _reason(log: str, returncode: int | None) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return f"exit status {returncode}: {lines[-1][:200] if lines else 'no output'}"


def run_one(benchmark: Benchmark, out: Path, seconds_left: float) -> list[dict]:
    """The benchmark's rows, each tagged with its name, or one FAIL row saying why there are none."""
    script = REPO / "benchmarks" / f"{benchmark.name}.py"
    if not script.exists():
        return [{**failed_row(benchmark, f"{script.relative_to(REPO)} is not in this checkout"), "skipped": True}]
    timeout = min(benchmark.timeout_s, seconds_left)
    if timeout < 10:
        return [failed_row(benchmark, "not run: the time budget of the whole run is spent")]
    result = out / f"{benchmark.name}.json"
    argv = [sys.executable, str(script), *shlex.split(benchmark.args), "--json", str(result)]
    if benchmark.loopback_only:
        argv = [str(REPO / "scripts" / "loopback-only"), *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"-- {benchmark.name}: {benchmark.args} (at most {timeout:.0f} s)", flush=True)
    started = time.monotonic()
    process = ManagedProcess(benchmark.name, argv, env, out / f"{benchmark.name}.log")
    try:
        while process.returncode is None and time.monotonic() - started < timeout:
            time.sleep(0.5)
        timed_out = process.returncode is None
    finally:
        process.stop()  # the whole process group, and anything it started in a session of its own
    took = time.monotonic() - started
    print(f"   {took:.0f} s, log {process.log_path}", flush=True)
    if timed_out:
        return [failed_row(benchmark, f"timed out after {timeout:.0f} s; see {process.log_path}")]
    try:
        rows = json.loads(result.read_text())["rows"]
        if not rows or not all(isinstance(row, dict) and {"measure", "passed"} <= set(row) for row in rows):
            raise ValueError("no rows, or rows without measure and passed")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = _reason(process.log_tail(5), process.returncode) if process.returncode else f"bad --json output: {exc}"
        return [failed_row(benchmark, why)]
    return [{**row, "benchmark": benchmark.name, "passed": bool(row["passed"])} for row in rows]


def _number(value: object) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"


def verdict(row: dict) -> str:
    if row.get("skipped"):
        return "SKIP"
    return "PASS" if row["passed"] else "FAIL"


def print_table(rows: list[dict]) -> None:
    """A Markdown table, as benchmarks/RESULTS.md keeps them."""
    print("| benchmark | measure | baseline | fedtrain | ratio | target | result |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        result = verdict(row) + (f": {row['error']}" if row.get("error") else "")
        cells = [row["benchmark"], row["measure"], *(_number(row.get(k)) for k in ("baseline", "value", "ratio"))]
        print("| " + " | ".join([*cells, str(row.get("target", "")), result]) + " |")


def main(argv: list[str] | None = None) -> None:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(names), help=f"comma-separated, of: {', '.join(names)}")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=None, help="folder for each script's log and JSON (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write all rows here")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(names)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtrain-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    rows: list[dict] = []
    for benchmark in BENCHMARKS:
        if benchmark.name in chosen:
            rows.extend(run_one(benchmark, out, deadline - time.monotonic()))
    load = os.getloadavg()[0]
    print(f"\n{os.cpu_count()} CPUs, load average {load:.1f} (other work on the machine moves the numbers)\n")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "load_avg_1min": load}, indent=2) + "\n")
    sys.exit(0 if all(row["passed"] or row.get("skipped") for row in rows) else 1)


if __name__ == "__main__":
    main()
