"""DP-SGD training throughput (samples/s) per Opacus grad-sample mode, against non-private SGD.

    python benchmarks/dp_throughput.py --device cuda --model cnn --input 28 --steps 50
    python benchmarks/dp_throughput.py --device cpu --steps 5 --json /tmp/dp_cpu.json
    python benchmarks/dp_throughput.py --modes fedtrain     # non-private and fedtrain's choice only
    python benchmarks/dp_throughput.py --device cuda --model resnet18gn --batch 64   # benchmarks/large_models.py

Synthetic data only (random images, fixed seed): nothing is downloaded. Every run trains a fresh
copy of the same fedtrain model on the same batches, so the modes compare like with like.
The mode fedtrain's trainer would choose for this model and device (fedtrain/clients/grad_sample_mode.py)
is always measured; "fedtrain" in --modes names it. On the CNN, its ratio to non-private is the target.
Imports only torch, Opacus and fedtrain.models/clients.grad_sample_mode (no Flower), so it runs where
Flower is absent. --json writes benchmarks/run.py's rows (see its docstring) with the full report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing fedtrain
from fedtrain.clients.grad_sample_mode import choose_grad_sample_mode  # noqa: E402
from fedtrain.models import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_models import MODELS as LARGE_MODELS  # noqa: E402

NUM_CLASSES = 10
MODES = ("hooks", "functorch", "ew", "ghost")  # Opacus 1.6 grad_sample_mode values for one process
FEDTRAIN = "fedtrain"  # in --modes: the mode fedtrain's trainer chooses for this model and device
TARGET_RATIO = 0.5  # the target: DP throughput >= half of non-private, on the CNN
DISTINCT_BATCHES = 4  # a few distinct batches, cycled: enough variety, little memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--model", default="cnn", choices=("cnn", "mlp", "logistic", *LARGE_MODELS))
    p.add_argument("--input", type=int, default=28, help="image side (1 channel, 10 classes; not for large models)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN autotune, hooks)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed blocks of --steps, modes taking turns; the best counts"
    )
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated Opacus grad_sample_mode values, or {FEDTRAIN!r}"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats, args.batch) < 1 or args.warmup < 0 or args.input < 2:
        p.error("--steps, --repeats and --batch must be >= 1, --warmup >= 0, --input >= 2")
    return args


def make_loader(args: argparse.Namespace) -> DataLoader:
    """A plain, fixed-batch DataLoader, shared by every run.

    Poisson sampling is off for the timing: it only varies the batch size around --batch, which
    would add noise to the comparison, not information. Real training (fedtrain's trainer) keeps it on.
    """
    gen = torch.Generator().manual_seed(0)
    n = args.batch * DISTINCT_BATCHES
    x = torch.rand(n, *input_shape(args), generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    pin = torch.device(args.device).type == "cuda"  # page-locked memory makes non_blocking copies real
    return DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=False, drop_last=True, pin_memory=pin)


def input_shape(args: argparse.Namespace) -> list[int]:
    return LARGE_MODELS[args.model][1] if args.model in LARGE_MODELS else [1, args.input, args.input]


def fresh_model(args: argparse.Namespace) -> nn.Module:
    # Same seed every time: each mode starts from identical weights.
    spec = LARGE_MODELS[args.model][0] if args.model in LARGE_MODELS else args.model
    return build_model(spec, input_shape(args), NUM_CLASSES, seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock


def make_step(model, optimizer, criterion, loader, device) -> Callable[[], None]:
    """One training step on the next batch, as the trainer takes it."""
    batches = itertools.cycle(loader)
    model.train()

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def non_private(loader, device, args) -> Callable[[], None]:
    model = fresh_model(args).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return make_step(model, optimizer, nn.CrossEntropyLoss(), loader, device)


def private(mode: str, loader, device, args) -> Callable[[], None]:
    from opacus import PrivacyEngine

    model = fresh_model(args).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion = nn.CrossEntropyLoss()
    engine = PrivacyEngine(accountant="rdp")
    common = dict(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,  # see make_loader
        grad_sample_mode=mode,
    )
    if mode.startswith("ghost"):
        # Ghost clipping needs two backward passes; Opacus hides them in a criterion wrapper.
        model, optimizer, criterion, loader = engine.make_private(criterion=criterion, **common)
    else:
        model, optimizer, loader = engine.make_private(**common)
    return make_step(model, optimizer, criterion, loader, device)


def samples_per_s(steps: dict[str, Callable[[], None]], device, args) -> dict[str, float]:
    """Samples/s of each way of stepping, over --steps steps, after --warmup untimed ones.

    The ways take turns, one timed block each, --repeats times, and each one's best block counts:
    other load on the machine only ever slows a block down, so the fastest is the closest to what the
    code itself costs (as `timeit` does), and taking turns gives every way the same quiet moments.
    """
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: args.steps * args.batch / seconds for name, seconds in best.items()}


def _reset_peak(device: torch.device) -> int:
    """Start counting a mode's peak memory (cuda); what is allocated before it."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def short_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:120]}"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels (in warm-up)
    loader = make_loader(args)
    chosen = choose_grad_sample_mode(fresh_model(args), input_shape(args), device)
    requested = [chosen if m.strip() == FEDTRAIN else m.strip() for m in args.modes.split(",") if m.strip()]
    modes = list(dict.fromkeys([*requested, chosen]))  # fedtrain's choice is always measured, once
    steps: dict[str, Callable[[], None]] = {"non-private": non_private(loader, device, args)}
    errors: dict[str, str] = {}
    peaks: dict[str, float] = {}  # cuda: the most memory a mode's set-up and first step added (MiB)
    with warnings.catch_warnings():
        # Known-harmless: no torchcsprng (secure RNG), and hooks firing on the first layer.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        for mode in ["non-private", *modes]:
            before = _reset_peak(device)
            try:
                if mode != "non-private":
                    steps[mode] = private(mode, loader, device, args)
                steps[mode]()  # a mode that cannot train this model fails here, not in the timing
            except Exception as exc:  # an unsupported layer/mode (or out of memory) is a result, not a crash
                errors[mode] = short_reason(exc)
                steps.pop(mode, None)
            if device.type == "cuda":
                peaks[mode] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                torch.cuda.empty_cache()
        speeds = samples_per_s(steps, device, args)
    base = speeds["non-private"]
    rows = [
        {
            "mode": "non-private",
            "samples_per_s": base,
            "ratio": 1.0,
            "error": None,
            "peak_mib": peaks.get("non-private"),
        }
    ]
    for mode in modes:
        speed = speeds.get(mode)
        ratio = speed / base if speed else None
        rows.append(
            {
                "mode": mode,
                "samples_per_s": speed,
                "ratio": ratio,
                "error": errors.get(mode),
                "peak_mib": peaks.get(mode),
            }
        )
    working = [r for r in rows[1:] if r["samples_per_s"]]
    fastest = max(working, key=lambda r: r["samples_per_s"])["mode"] if working else None
    fedtrain_row = next(r for r in rows[1:] if r["mode"] == chosen)
    import opacus

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "input": input_shape(args),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "load_avg_1min": os.getloadavg()[0],  # other work on the machine skews CPU numbers
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "poisson_sampling": False,
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "target_ratio": TARGET_RATIO if args.model == "cnn" else None,
        "fastest_dp_mode": fastest,
        "fedtrain_mode": chosen,
        "results": rows,
        "rows": summary_rows(args, device, base, fedtrain_row),
    }


def summary_rows(args: argparse.Namespace, device: torch.device, base: float, fedtrain_row: dict) -> list[dict]:
    """benchmarks/run.py's rows: fedtrain's mode against non-private, where the model has a target."""
    if args.model != "cnn":
        return []
    ratio = fedtrain_row["ratio"]
    return [
        {
            "measure": f"DP-SGD samples/s, cnn {args.input}x{args.input}, batch {args.batch}, {device.type}, "
            f"fedtrain's mode ({fedtrain_row['mode']}) vs non-private",
            "baseline": round(base, 1),
            "value": round(fedtrain_row["samples_per_s"], 1) if fedtrain_row["samples_per_s"] else None,
            "ratio": round(ratio, 3) if ratio is not None else None,
            "target": f">= {TARGET_RATIO}",
            "passed": ratio is not None and ratio >= TARGET_RATIO,
            **({"error": fedtrain_row["error"]} if fedtrain_row["error"] else {}),
        }
    ]


def print_table(report: dict) -> None:
    cpu = f"{report['threads']} CPU threads, load {report['load_avg_1min']:.1f}"
    print(
        f"DP-SGD throughput: model {report['model']} {'x'.join(map(str, report['input']))}, batch {report['batch']}, "
        f"best of {report['repeats']} turns x {report['steps']} timed steps after {report['warmup']} warm-up, "
        f"on {report['device']} ({report['device_name']}, {cpu}); "
        f"torch {report['torch']}, opacus {report['opacus']}"
    )
    target = report["target_ratio"]
    verdicts = f"target >= {target}" if target else ""
    print(f"{'mode':<12} {'samples/s':>11} {'vs non-private':>15} {'peak MiB':>9}  {verdicts}")
    for r in report["results"]:
        if r["error"]:
            print(f"{r['mode']:<12} unsupported: {r['error']}")
            continue
        verdict = ""
        if target and r["mode"] != "non-private":
            verdict = "meets" if r["ratio"] >= target else "below"
        marks = [("fastest DP mode", report["fastest_dp_mode"]), ("fedtrain's choice", report["fedtrain_mode"])]
        mark = "".join(f"  <- {label}" for label, mode in marks if r["mode"] == mode)
        peak = f"{r['peak_mib']:9.0f}" if r.get("peak_mib") is not None else f"{'-':>9}"  # cuda only
        print(f"{r['mode']:<12} {r['samples_per_s']:>11.1f} {r['ratio']:>14.2f}x {peak}  {verdict}{mark}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
