#!/usr/bin/env bash
# fedtrain on an NVIDIA GPU, in under 10 minutes: versions, DP-SGD throughput on cuda vs cpu,
# one short federated DP training on cuda, and real model shapes (benchmarks/large_models.py: a
# ResNet-18 with GroupNorm on 32x32x3, a small transformer encoder): DP throughput vs non-private and
# peak memory per Opacus mode, and a 2-round federated run of the ResNet on cuda.
#
#   PYTHON=python3 OUT=/tmp bash benchmarks/gpu_check.sh      (from the repo root)
#   DEVICE=cpu GPU_STEPS=1 LARGE_BATCH=4 LARGE_SAMPLES=120 LIMIT=900 bash benchmarks/gpu_check.sh
#       (no GPU: the same steps on the CPU, tiny, to prove the script works; the GPU/CPU step is skipped)
#
# Everything printed also goes to $OUT/gpu_check.log (default /tmp). A failing step is reported
# and the others still run; the exit status is 1 if any step failed.
# Federated step: `fedtrain simulate` where Ray and Flower import; otherwise (no Ray) the
# in-process loop of benchmarks/cuda_federated_smoke.py, which uses fedtrain's trainer and ledger.
set -euo pipefail

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-/tmp}"
GPU_STEPS="${GPU_STEPS:-50}"   # timed steps per mode (best of 3 blocks); seconds in all on a GPU
CPU_STEPS="${CPU_STEPS:-8}"    # the CPU is 10-50x slower: fewer steps keep it near half a minute
DEVICE="${DEVICE:-cuda}"       # cpu: run every "cuda" step on the CPU instead (proof that the script works)
LARGE_BATCH="${LARGE_BATCH:-64}"      # the large models' batch (ResNet-18's per-sample gradients: 45 MB each)
LARGE_SAMPLES="${LARGE_SAMPLES:-2000}"  # synthetic samples of the large models' federated run
LIMIT="${LIMIT:-100}"          # seconds per step (the large models' steps get 3x)
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
FAILED=()

# step NAME SECONDS CMD...: run CMD (a program or one of the functions below, hence the child bash)
# under a time limit; a failure is recorded and the next step still runs.
step() {
    local name="$1" limit="$2"
    shift 2
    echo
    echo "=== $name ==="
    local started=$SECONDS rc=0
    timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' step "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "!!! $name: timed out after ${limit}s"
        echo "!!! $name: failed (exit $rc)"
        FAILED+=("$name")
    fi
    echo "--- $name: $((SECONDS - started))s"
}

versions() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
    else
        echo "nvidia-smi not found"
    fi
    "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA (torch built with) {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda:0 {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
try:
    import opacus
    print(f"opacus {opacus.__version__}")
except ImportError as exc:
    print(f"opacus: NOT importable ({exc})")
for name in ("flwr", "ray"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
EOF
}

speedups() {
    "$PY" - "$OUT_DIR/dp_throughput_cuda.json" "$OUT_DIR/dp_throughput_cpu.json" <<'EOF'
import json, sys
gpu, cpu = (json.load(open(path)) for path in sys.argv[1:3])
cpu_rows = {r["mode"]: r for r in cpu["results"]}
print(f"{'mode':<12} {'cuda samples/s':>15} {'cpu samples/s':>14} {'GPU/CPU':>8}")
for r in gpu["results"]:
    c = cpu_rows.get(r["mode"], {})
    g_s, c_s = r.get("samples_per_s"), c.get("samples_per_s")
    ratio = f"{g_s / c_s:7.1f}x" if g_s and c_s else "      -"
    fmt = lambda v: f"{v:.0f}" if v else "unsupported"
    print(f"{r['mode']:<12} {fmt(g_s):>15} {fmt(c_s):>14} {ratio}")
print(f"fastest DP mode: cuda {gpu['fastest_dp_mode']}, cpu {cpu['fastest_dp_mode']}")
EOF
}

federated() {
    if "$PY" -c "import ray, flwr.simulation" 2>/dev/null; then
        echo "Ray and Flower import: fedtrain simulate on $DEVICE"
        # Its model key and run directory go under $OUT, never into the user's ~/.fedtrain.
        FEDTRAIN_HOME="$OUT_DIR/fedtrain-home" "$PY" -m fedtrain.cli simulate --device "$DEVICE" --rounds 3 --clients 3 \
            --target-epsilon 3 --model cnn --run-dir "$OUT_DIR/gpu-sim-$(date +%s)"
    else
        echo "Ray (or Flower) does not import: in-process federated DP loop instead (no Simulation Engine)"
        "$PY" benchmarks/cuda_federated_smoke.py --device "$DEVICE" --rounds 3 --clients 3 --target-epsilon 3 --model cnn
    fi
}

main() {
    echo "fedtrain GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), repo $(pwd)"
    step "versions" 60 versions
    step "DP throughput on $DEVICE" "$LIMIT" "$PY" benchmarks/dp_throughput.py --device "$DEVICE" --model cnn \
        --input 28 --steps "$GPU_STEPS" --json "$OUT_DIR/dp_throughput_cuda.json"
    step "DP throughput on cpu" "$LIMIT" "$PY" benchmarks/dp_throughput.py --device cpu --model cnn --input 28 \
        --steps "$CPU_STEPS" --json "$OUT_DIR/dp_throughput_cpu.json"
    if [ "$DEVICE" != cpu ] && [ -f "$OUT_DIR/dp_throughput_cuda.json" ] && [ -f "$OUT_DIR/dp_throughput_cpu.json" ]; then
        step "GPU/CPU speed-up per mode" 30 speedups
    fi
    step "federated DP training on $DEVICE" "$LIMIT" federated
    for model in resnet18gn transformer; do
        step "DP throughput and peak memory, $model on $DEVICE" $((3 * LIMIT)) "$PY" benchmarks/dp_throughput.py \
            --device "$DEVICE" --model "$model" --batch "$LARGE_BATCH" --steps "$GPU_STEPS" --warmup 1 \
            --json "$OUT_DIR/dp_throughput_$model.json"
    done
    step "2-round federated DP training, resnet18gn on $DEVICE" $((3 * LIMIT)) "$PY" benchmarks/large_models.py \
        --model resnet18gn --device "$DEVICE" --samples "$LARGE_SAMPLES" --batch "$LARGE_BATCH"
    echo
    if [ "${#FAILED[@]}" -gt 0 ]; then
        printf "GPU CHECK FAILED:"; printf " [%s]" "${FAILED[@]}"; echo
        return 1
    fi
    echo "GPU CHECK OK"
}

if [ ! -f benchmarks/dp_throughput.py ]; then
    echo "run this from the fedtrain repo root" >&2
    exit 2
fi
rm -f "$OUT_DIR/dp_throughput_cuda.json" "$OUT_DIR/dp_throughput_cpu.json"  # no stale numbers
export -f step versions speedups federated
export PY OUT_DIR DEVICE
export PYTHONUNBUFFERED=1  # keep the log in order and live through tee
main 2>&1 | tee "$LOG"
