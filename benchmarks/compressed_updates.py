"""8-bit updates against float32 ones (issue 18, acceptance 3): bytes each client sends per round, on the
CNN, and the demo's accuracy, over several runs of each, alternating.

    python benchmarks/compressed_updates.py --runs 3
    python benchmarks/compressed_updates.py --runs 5 --json /tmp/compressed.json

Every run is fedtrain's server loop with its real ClientApp (tests/inprocess.py, no Ray). Bytes are the
server's own record of each train reply as it travelled (metrics.json `bytes_up`), so they include the
message's framing, not just the tensors. Runs alternate float32, int8, float32, ... so load on the
machine hits both alike; every run is listed, medians are compared. The baseline of each ratio is the
float32 runs of the same invocation. Targets: bytes <= 0.27 of float32 on the CNN; the demo's median
accuracy (digits, 5 clients, epsilon 3, logistic) within 1 point of float32's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from fedtrain.config import Config  # noqa: E402
from fedtrain.security.keys import generate_key, write_key_file  # noqa: E402
from tests.inprocess import run_federation  # noqa: E402

BYTES_TARGET = 0.27
ACCURACY_POINTS = 0.01
MODES = ("none", "int8")


def one_run(compression: str, model: str, rounds: int | None) -> tuple[float, float]:
    """(the final accuracy, the median bytes a client sent per round) of one federation."""
    with tempfile.TemporaryDirectory() as tmp:
        key = write_key_file(Path(tmp) / "model.key", generate_key())
        config = Config(run_dir=str(Path(tmp) / "run"), key_file=str(key), model=model, compression=compression)
        if rounds is not None:
            config = config.replace(rounds=rounds)
        rows = run_federation(config)
    sent = [n for row in rows for n in row["bytes_up"].values()]
    return float(rows[-1]["accuracy"]), float(statistics.median(sent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="demo runs of each mode")
    parser.add_argument("--cnn-rounds", type=int, default=1, help="rounds of the CNN runs that measure bytes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    report: dict = {"cnn": {m: [] for m in MODES}, "demo": {m: [] for m in MODES}}
    started = time.perf_counter()
    for mode in MODES:
        _, sent = one_run(mode, "cnn", args.cnn_rounds)
        report["cnn"][mode].append(sent)
        print(f"cnn {mode}: {sent:,.0f} bytes per client per round", flush=True)
    for i in range(args.runs):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            accuracy, sent = one_run(mode, "logistic", None)
            report["demo"][mode].append({"accuracy": accuracy, "bytes": sent})
            said = f"demo run {i + 1} {mode}: accuracy {accuracy:.4f}, {sent:,.0f} bytes per client per round"
            print(said, flush=True)
    cnn_ratio = report["cnn"]["int8"][0] / report["cnn"]["none"][0]
    accuracy = {m: statistics.median(r["accuracy"] for r in report["demo"][m]) for m in MODES}
    drop = accuracy["none"] - accuracy["int8"]
    report["rows"] = [
        {"measure": "bytes up per client per round, cnn, int8 vs float32", "baseline": report["cnn"]["none"][0],
         "value": report["cnn"]["int8"][0], "ratio": round(cnn_ratio, 4), "target": f"<= {BYTES_TARGET}",
         "passed": cnn_ratio <= BYTES_TARGET},
        {"measure": f"demo accuracy, median of {args.runs}, int8 vs float32 updates", "baseline": accuracy["none"],
         "value": accuracy["int8"], "ratio": round(accuracy["int8"] / accuracy["none"], 4),
         "target": f"drop <= {ACCURACY_POINTS * 100:.0f} point", "passed": drop <= ACCURACY_POINTS},
    ]  # fmt: skip
    for row in report["rows"]:
        print(f"{row['measure']}: {row['value']} vs {row['baseline']} ({row['ratio']}), target {row['target']}: "
              f"{'PASS' if row['passed'] else 'FAIL'}")  # fmt: skip
    print(f"{time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(row["passed"] for row in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
