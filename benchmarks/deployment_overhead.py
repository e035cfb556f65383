"""Seconds per round of fedtrain in a real deployment, against plain Flower + Opacus on the same work.

Both federations run here on 127.0.0.1 with three clients on the same digits shards, the same
model (logistic regression), the same DP-SGD parameters (fixed noise multiplier 1.0, C 1, batch
100, 2 local epochs) and TLS with SuperNode authentication. fedtrain adds its Fleet gateway,
end-to-end payload encryption, the pinned ClientApp runtime (warm workers), the client ledger on
disk, update screening and an encrypted checkpoint every round. The baseline is
benchmarks/plain_flower_app, Flower's FedAvg with an Opacus ClientApp as Flower's examples write it,
on `flower-supernode`s with Flower's defaults (a new process per message, its polling).

Like for like (issue 17):
- the same server exchange: the baseline's ServerApp pulls its replies with fedtrain's schedule
  (fedtrain/server/reply_stream.py) instead of Flower's 3 s `send_and_receive` pulls
  (`--baseline-exchange flower` gives it Flower's own);
- the same timing boundary: from the run's submission (the `flwr run` the server does; its return)
  to the final model on disk (the file's modification time), divided by the rounds;
- the two federations alternate, `--repeats` times each (at least 3), and the medians are compared;
  every run is printed.

Targets: fedtrain / plain <= 0.2 and fedtrain <= 3 s per round (issue 17, acceptance 1).

    .venv/bin/python benchmarks/deployment_overhead.py [--rounds 5] [--repeats 3] [--json PATH]

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

from fedtrain.privacy.policy import POLICY_FILE, ClientPolicy
from fedtrain.processes import ManagedProcess, flower_env, free_port, run_tool, tool, wait_for_port
from fedtrain.security.kits import provision

HERE = Path(__file__).resolve().parent
CLIENTS = 3
TARGET = 0.2  # fedtrain / plain
TARGET_SECONDS = 3.0  # fedtrain's seconds per round
POLL = 0.05  # seconds between looks at a log or a file while timing
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


def _admit_the_benchmark(kits: Path) -> None:
    """Let each client's policy admit the benchmark's run: plain Flower's clients train whatever the
    server asks, so fedtrain's must too for the same work. With the kit's default policy (a run's epsilon
    at most 3) every client refuses sigma 1.0 over these rounds, and a round of refusals is no work."""
    generous = ClientPolicy(max_run_epsilon=100.0, max_lifetime_epsilon=1000.0).to_toml()
    for i in range(1, CLIENTS + 1):
        (kits / f"client-{i}" / POLICY_FILE).write_text(generous)


def _check_every_client_trained(rows: list[dict], rounds: int) -> None:
    """A fedtrain round counts only if every client trained in it (refusals and failures are no work)."""
    if len(rows) != rounds:
        raise SystemExit(f"the fedtrain run recorded {len(rows)} rounds, not {rounds}.")
    for row in rows:
        if row["clients_ok"] != CLIENTS:
            raise SystemExit(
                f"round {row['round']}: {row['clients_ok']} of {CLIENTS} clients trained "
                f"(refused: {row['refused']}; failed: {row['failed']}); the benchmark needs all of them."
            )


def _wait(process: ManagedProcess | subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while (process.poll() if isinstance(process, subprocess.Popen) else process.returncode) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not finish in {timeout:.0f} s")
        time.sleep(POLL)


def _submitted(server: ManagedProcess, log: Path, timeout: float) -> float:
    """When (time.time()) `fedtrain server` said its run was submitted: its `flwr run` had returned."""
    deadline = time.monotonic() + timeout
    while "submitted run" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline or not server.alive:
            raise SystemExit(f"fedtrain server did not submit its run:\n{server.log_tail(20)}")
        time.sleep(POLL)
    return time.time()


def run_fedtrain(work: Path, kits: Path, shards: list[Path], rounds: int) -> dict[str, float]:
    """One fedtrain federation: seconds per round from submission to the final model on disk, and the
    mean of the rounds' own `seconds` (the loop's time, without start-up and the final writes)."""
    run_dir, config = work / "fedtrain-run", work / "fedtrain.toml"
    config.write_text(
        f"rounds = {rounds}\ninput_shape = [1, 8, 8]\nnum_classes = 10\neval_fraction = 0.1\n"
        f"noise_multiplier = {DP['noise-multiplier']}\nlr = {DP['lr']}\n"
        f"batch_size = {DP['batch-size']}\nlocal_epochs = {DP['local-epochs']}\nround_timeout = 300.0\n"
    )
    env = {**os.environ, "FEDTRAIN_HOME": str(work / "home")}
    fedtrain = str(Path(sys.executable).with_name("fedtrain"))
    port, server_log = free_port(), work / "fedtrain-server.log"
    argv = [fedtrain, "server", "--kit", str(kits / "server"), "--config", str(config), "--min-clients",
            str(CLIENTS), "--port", str(port), "--run-dir", str(run_dir), "--wait-timeout", "120"]  # fmt: skip
    children = [ManagedProcess("server", argv, env, server_log)]
    try:
        wait_for_port("127.0.0.1", port, 60, children[0])
        for i, shard in enumerate(shards, 1):
            argv = [fedtrain, "client", "--kit", str(kits / f"client-{i}"), "--server", f"127.0.0.1:{port}",
                    "--data", str(shard)]  # fmt: skip
            children.append(ManagedProcess(f"client-{i}", argv, env, work / f"fedtrain-client-{i}.log"))
        submitted = _submitted(children[0], server_log, 240)
        _wait(children[0], 60 * rounds + 180, "the fedtrain run")
        if children[0].returncode != 0:
            raise SystemExit(f"fedtrain server failed:\n{children[0].log_tail(20)}")
    finally:
        for child in children:
            child.stop()
    rows = json.loads((run_dir / "metrics.json").read_text())
    _check_every_client_trained(rows, rounds)
    finished = (run_dir / "model.ftenc").stat().st_mtime
    return {
        "s_per_round": (finished - submitted) / rounds,
        "loop_s_per_round": sum(r["seconds"] for r in rows) / len(rows),
    }


def run_plain(work: Path, kits: Path, shards: list[Path], rounds: int, exchange: str) -> dict[str, float]:
    """One plain Flower + Opacus federation: seconds per round from submission to the final model on
    disk, and the strategy's own time per round (FedAvg.start, without the final write)."""
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
    timing, model = work / "plain-timing.json", work / "plain-model.pt"
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
        settings = {**DP, "rounds": rounds}
        run_config = " ".join(f"{k}={v}" for k, v in settings.items())
        run_config += f" timing-file='{timing}' model-file='{model}' exchange='{exchange}'"
        submitted = run_tool(
            [tool("flwr"), "run", str(HERE / "plain_flower_app"), "bench", "--run-config", run_config], env, 120
        )
        started = time.time()
        if submitted.returncode != 0:
            raise SystemExit(f"flwr run failed: {submitted.stdout}{submitted.stderr}")
        deadline = time.monotonic() + 60 * rounds + 180
        while not timing.exists():
            if time.monotonic() > deadline or not superlink.alive:
                raise SystemExit(f"the plain Flower run did not finish:\n{superlink.log_tail(20)}")
            time.sleep(POLL)
    finally:
        for child in reversed(children):
            child.stop()
    result = json.loads(timing.read_text())
    finished = model.stat().st_mtime
    timing.unlink()
    return {"s_per_round": (finished - started) / rounds, "loop_s_per_round": result["seconds"] / result["rounds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    pulls = "the baseline server's pulls: fedtrain's schedule (like for like) or Flower's"
    parser.add_argument("--baseline-exchange", choices=("fedtrain", "flower"), default="fedtrain", help=pulls)
    parser.add_argument("--json", type=Path, default=None, help="write benchmarks/run.py's rows here")
    args = parser.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        raise SystemExit("--rounds and --repeats must be at least 1.")
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "fedtrain": []}
    with tempfile.TemporaryDirectory(prefix="fedtrain-bench-") as tmp:
        work = Path(tmp)
        shards = _shards(work)
        for repeat in range(args.repeats):
            # fresh kits each repeat: a kit anchors its client's lifetime ledger, which each run keeps under
            # its own FEDTRAIN_HOME (a client would refuse a kit whose anchor counts a ledger it lost)
            kits = work / f"kits-{repeat}"
            provision(kits, ["127.0.0.1"], CLIENTS)
            _admit_the_benchmark(kits)
            order = ("plain", "fedtrain") if repeat % 2 == 0 else ("fedtrain", "plain")  # alternating
            for name in order:
                folder = work / f"{name}-{repeat}"
                folder.mkdir()
                if name == "plain":
                    measured = run_plain(folder, kits, shards, args.rounds, args.baseline_exchange)
                else:
                    measured = run_fedtrain(folder, kits, shards, args.rounds)
                runs[name].append(measured)
                print(f"repeat {repeat + 1}: {name} {measured['s_per_round']:.2f} s/round "
                      f"(loop alone {measured['loop_s_per_round']:.2f})", flush=True)  # fmt: skip
    plain = statistics.median(r["s_per_round"] for r in runs["plain"])
    fed = statistics.median(r["s_per_round"] for r in runs["fedtrain"])
    ratio = fed / plain
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    seconds_verdict = "PASS" if fed <= TARGET_SECONDS else "FAIL"
    measure = (
        f"seconds per round, deployment, {CLIENTS} clients, {args.rounds} rounds, submission to final model, "
        f"median of {args.repeats} alternating (baseline: plain Flower + Opacus, {args.baseline_exchange} pulls)"
    )
    print()
    print("| measure | plain Flower + Opacus | fedtrain | ratio | target | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {measure} | {plain:.2f} | {fed:.2f} | {ratio:.3f} | <= {TARGET:.2f} | {verdict} |")
    print(
        f"| fedtrain's seconds per round, same runs | - | {fed:.2f} | - | <= {TARGET_SECONDS:.1f} s "
        f"| {seconds_verdict} |"
    )
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    for name, measured in runs.items():
        print(f"all {name} runs, s/round: {[round(r['s_per_round'], 2) for r in measured]}; "
              f"loop alone: {[round(r['loop_s_per_round'], 2) for r in measured]}")  # fmt: skip
    if args.json:
        rows = [
            {"measure": measure, "baseline": round(plain, 3), "value": round(fed, 3), "ratio": round(ratio, 4),
             "target": f"<= {TARGET:.2f}", "passed": verdict == "PASS"},
            {"measure": f"fedtrain's seconds per round, deployment, {CLIENTS} clients, submission to final model",
             "baseline": None, "value": round(fed, 3), "ratio": round(fed, 3), "target": f"<= {TARGET_SECONDS:.1f}",
             "passed": seconds_verdict == "PASS"},
        ]  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "runs": runs}, indent=2) + "\n")
    sys.exit(0 if verdict == seconds_verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
