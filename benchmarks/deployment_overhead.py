"""Round overhead of fedtrain in a real deployment, against plain Flower on the same SuperLink settings.

Both federations run here on 127.0.0.1 with three clients on the same digits shards, the same
model (logistic regression), the same DP-SGD parameters (fixed noise multiplier 1.0, C 1, batch
100, 2 local epochs) and TLS with SuperNode authentication. fedtrain adds its Fleet gateway,
end-to-end payload encryption, the pinned ClientApp runtime, the client ledger on disk, update
screening and an encrypted checkpoint every round. The baseline is benchmarks/plain_flower_app,
Flower's FedAvg with an Opacus ClientApp as Flower's examples write it.

Seconds per round = the server loop's time over R rounds / R (process start-up excluded on both
sides). The two federations alternate, `--repeats` times each, and the medians are compared.
Target: fedtrain / plain <= 1.05 (issue #6; issue #3 asked for 1.10).

    .venv/bin/python benchmarks/deployment_overhead.py [--rounds 5] [--repeats 2] [--json PATH]

--json writes benchmarks/run.py's rows (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from fedtrain.processes import ManagedProcess, flower_env, free_port, run_tool, tool, wait_for_port
from fedtrain.security.kits import provision

HERE = Path(__file__).resolve().parent
CLIENTS = 3
TARGET = 1.05
DP = {"lr": 1.0, "batch-size": 100, "local-epochs": 2, "noise-multiplier": 1.0, "max-grad-norm": 1.0}


def _shards(folder: Path) -> list[Path]:
    digits = load_digits()
    paths = []
    for i in range(CLIENTS):
        part = slice(i * 500, (i + 1) * 500)
        path = folder / f"shard{i + 1}.npz"
        np.savez(path, x=(digits.images[part] * 16).astype(np.uint8), y=digits.target[part])
        paths.append(path)
    return paths


def _wait(process: ManagedProcess | subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while (process.poll() if isinstance(process, subprocess.Popen) else process.returncode) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not finish in {timeout:.0f} s")
        time.sleep(0.5)


def run_fedtrain(work: Path, kits: Path, shards: list[Path], rounds: int) -> float:
    run_dir, config = work / "fedtrain-run", work / "fedtrain.toml"
    config.write_text(
        f"rounds = {rounds}\ninput_shape = [1, 8, 8]\nnum_classes = 10\neval_fraction = 0.1\n"
        f"noise_multiplier = {DP['noise-multiplier']}\nlr = {DP['lr']}\n"
        f"batch_size = {DP['batch-size']}\nlocal_epochs = {DP['local-epochs']}\nround_timeout = 300.0\n"
    )
    env = {**os.environ, "FEDTRAIN_HOME": str(work / "home")}
    fedtrain = str(Path(sys.executable).with_name("fedtrain"))
    port = free_port()
    children = [
        ManagedProcess(
            "server",
            [
                fedtrain,
                "server",
                "--kit",
                str(kits / "server"),
                "--config",
                str(config),
                "--min-clients",
                str(CLIENTS),
                "--port",
                str(port),
                "--run-dir",
                str(run_dir),
                "--wait-timeout",
                "120",
            ],
            env,
            work / "fedtrain-server.log",
        )  # fmt: skip
    ]
    try:
        wait_for_port("127.0.0.1", port, 60, children[0])
        for i, shard in enumerate(shards, 1):
            argv = [fedtrain, "client", "--kit", str(kits / f"client-{i}"), "--server", f"127.0.0.1:{port}",
                    "--data", str(shard)]  # fmt: skip
            children.append(ManagedProcess(f"client-{i}", argv, env, work / f"fedtrain-client-{i}.log"))
        _wait(children[0], 60 * rounds + 180, "the fedtrain run")
        if children[0].returncode != 0:
            raise SystemExit(f"fedtrain server failed:\n{children[0].log_tail(20)}")
    finally:
        for child in children:
            child.stop()
    rows = json.loads((run_dir / "metrics.json").read_text())
    return sum(row["seconds"] for row in rows) / len(rows)


def run_plain(work: Path, kits: Path, shards: list[Path], rounds: int) -> float:
    server_kit, port = kits / "server", free_port()
    home = work / "flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{server_kit / "ca.crt"}"\n'
    )
    env = flower_env(home)
    superlink = ManagedProcess(
        "SuperLink",
        [tool("flower-superlink"), "--ssl-ca-certfile", str(server_kit / "ca.crt"), "--ssl-certfile",
         str(server_kit / "server.crt"), "--ssl-keyfile", str(server_kit / "server.key"), "--enable-supernode-auth",
         "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
        env, work / "plain-superlink.log",
    )  # fmt: skip
    children = [superlink]
    timing = work / "plain-timing.json"
    try:
        wait_for_port("127.0.0.1", port, 60, superlink)
        for i, shard in enumerate(shards, 1):
            public = server_kit / "clients" / f"client-{i}.pub"
            registered = run_tool([tool("flwr"), "supernode", "register", str(public), "bench"], env, 60)
            if registered.returncode != 0:
                raise SystemExit(f"could not register client-{i}: {registered.stdout}{registered.stderr}")
            argv = [tool("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                    str(kits / f"client-{i}" / "ca.crt"), "--auth-supernode-private-key",
                    str(kits / f"client-{i}" / "node.key"), "--node-config", f"data-path='{shard}'",
                    "--port", str(free_port())]  # fmt: skip
            children.append(ManagedProcess(f"node-{i}", argv, env, work / f"plain-node-{i}.log"))
        run_config = " ".join(f"{k}={v}" for k, v in {**DP, "rounds": rounds}.items())
        run_config += f" timing-file='{timing}'"
        submitted = run_tool(
            [tool("flwr"), "run", str(HERE / "plain_flower_app"), "bench", "--run-config", run_config], env, 120
        )
        if submitted.returncode != 0:
            raise SystemExit(f"flwr run failed: {submitted.stdout}{submitted.stderr}")
        deadline = time.monotonic() + 60 * rounds + 180
        while not timing.exists():
            if time.monotonic() > deadline or not superlink.alive:
                raise SystemExit(f"the plain Flower run did not finish:\n{superlink.log_tail(20)}")
            time.sleep(0.5)
    finally:
        for child in reversed(children):
            child.stop()
    result = json.loads(timing.read_text())
    timing.unlink()
    return result["seconds"] / result["rounds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write benchmarks/run.py's rows here")
    args = parser.parse_args()
    fedtrain_s, plain_s = [], []
    with tempfile.TemporaryDirectory(prefix="fedtrain-bench-") as tmp:
        work = Path(tmp)
        kits = work / "kits"
        provision(kits, ["127.0.0.1"], CLIENTS)
        shards = _shards(work)
        for repeat in range(args.repeats):
            for name, runner, times in (("plain", run_plain, plain_s), ("fedtrain", run_fedtrain, fedtrain_s)):
                folder = work / f"{name}-{repeat}"
                folder.mkdir()
                times.append(runner(folder, kits, shards, args.rounds))
                print(f"repeat {repeat + 1}: {name} {times[-1]:.2f} s/round", flush=True)
    ratio = statistics.median(fedtrain_s) / statistics.median(plain_s)
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print()
    print("| measure | plain Flower + Opacus | fedtrain | ratio | target | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| seconds per round, deployment, {CLIENTS} clients, {args.rounds} rounds, median of {args.repeats} "
        f"| {statistics.median(plain_s):.2f} | {statistics.median(fedtrain_s):.2f} | {ratio:.3f} "
        f"| <= {TARGET:.2f} | {verdict} |"
    )
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"all runs, s/round: plain {[round(s, 2) for s in plain_s]}, fedtrain {[round(s, 2) for s in fedtrain_s]}")
    if args.json:
        row = {
            "measure": f"seconds per round, deployment on 127.0.0.1, {CLIENTS} clients, {args.rounds} rounds, "
            f"median of {args.repeats} (baseline: plain Flower + Opacus)",
            "baseline": round(statistics.median(plain_s), 3),
            "value": round(statistics.median(fedtrain_s), 3),
            "ratio": round(ratio, 4),
            "target": f"<= {TARGET:.2f}",
            "passed": verdict == "PASS",
        }
        runs = {"plain_s_per_round": plain_s, "fedtrain_s_per_round": fedtrain_s}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [row], "runs": runs}, indent=2) + "\n")
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
