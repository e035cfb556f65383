#!/usr/bin/env bash
# On the GPU machine (Python 3.12, torch+CUDA, numpy, scikit-learn; no Opacus, no Flower, no Ray,
# no internet), from the repo root with the carried wheels in .whl/:
#   bash benchmarks/gpu_check_device.sh
# Installs the wheels (opacus, opt_einsum) into /tmp/site without touching the system Python, then
# runs the check. Opacus's wheel also ships top-level `benchmarks` and `examples` packages: they are
# removed so they cannot shadow this repo's benchmarks/ on PYTHONPATH.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && rm -rf /tmp/site/benchmarks /tmp/site/examples && export PYTHONPATH=/tmp/site:$PWD
PYTHON=python3 bash benchmarks/gpu_check.sh
