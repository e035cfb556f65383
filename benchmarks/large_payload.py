"""Peak memory of one large update through payload encryption and aggregation (issue 18, acceptance 4).

    python benchmarks/large_payload.py                   # a 1 GB update in fedtrain's 4 MiB chunks
    python benchmarks/large_payload.py --mib 256 --json /tmp/payload.json

A client seals its update (fedtrain's payload mod: `seal_content(..., consume=True)`); the server opens
it (PayloadSealer), screens it (`screen_reply`: tensors, finite values, norm) and adds it to the running
FedAvg sum (StreamingMean), all through fedtrain's own functions (tests/payload_memory.py). Each phase's
peak is measured with tracemalloc and as growth of the process's peak resident memory, and divided by
the update's own bytes (the baseline, 1.0). Target: the server's peak under 1.5 updates; the client's
is reported (the update and its sealed form: about 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from fedtrain.security.payload import CHUNK_BYTES  # noqa: E402
from tests.payload_memory import measure  # noqa: E402

SERVER_TARGET = 1.5
CLIENT_TARGET = 2.1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="the update's size in MiB (default 1 GiB)")
    parser.add_argument("--chunk-mib", type=float, default=CHUNK_BYTES / 2**20, help="plaintext per sealed chunk")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.mib < 1 or args.chunk_mib <= 0:
        parser.error("--mib and --chunk-mib must be positive")
    started = time.monotonic()
    measured = measure(args.mib * 2**20, int(args.chunk_mib * 2**20))
    seconds = time.monotonic() - started
    update = measured.update_bytes
    ratios = measured.ratios()
    size = f"{update / 2**30:.2f} GiB" if update >= 2**30 else f"{update / 2**20:.0f} MiB"
    rows = [
        {
            "measure": f"server peak memory (tracemalloc) opening, screening and summing a {size} update, "
            f"{args.chunk_mib:g} MiB chunks, in updates",
            "baseline": update,
            "value": measured.server.traced,
            "ratio": round(ratios["server"], 3),
            "target": f"< {SERVER_TARGET}",
            "passed": measured.mean_ok and ratios["server"] < SERVER_TARGET,
        },
        {
            "measure": f"client peak memory (tracemalloc) sealing the {size} update (the update and its sealed form)",
            "baseline": update,
            "value": measured.client.traced,
            "ratio": round(ratios["client"], 3),
            "target": f"< {CLIENT_TARGET}",
            "passed": ratios["client"] < CLIENT_TARGET,
        },
    ]
    if measured.server.rss is not None:
        # the server phase starts holding the sealed reply (1 update): its growth is what comes on top
        growth = measured.server.rss / update
        rows.append(
            {
                "measure": "server peak resident memory: growth over the sealed reply it starts with, in updates",
                "baseline": update,
                "value": measured.server.rss,
                "ratio": round(growth, 3),
                "target": f"< {SERVER_TARGET - 1:g}",
                "passed": growth < SERVER_TARGET - 1,
            }
        )
    for row in rows:
        print(f"{row['measure']}: {row['ratio']} (target {row['target']}) {'PASS' if row['passed'] else 'FAIL'}")
    print(f"{seconds:.1f} s; the server's sum of the update is right: {measured.mean_ok}; load {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"rows": rows, "seconds": seconds, "update_bytes": update, "chunk_bytes": int(args.chunk_mib * 2**20)}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
