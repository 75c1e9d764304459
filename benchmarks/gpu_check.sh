#!/usr/bin/env bash
# The GPU check of issues 13 and 25 (benchmarks/gpu_check.py): correctness of static, reorder and dynamic
# on cuda against the CPU path, then speed and memory (static vs its read, a reorder pair at n = 14,336
# built and solved, DeepSeek-V3-like pairs solved on the device vs lapjv, one at a time and batched).
# Under 10 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh wheels            # HERE, once: the packages a GPU image may lack, as
#                                             # wheels in .whl/ (in .gitignore), for Python 3.12
#   benchmarks/gpu_check.sh [--quick] [--device cpu] [--out DIR]   # THERE (or anywhere, --quick --device cpu)
#
# On the GPU machine it installs .whl/*.whl (if present) into /tmp/site and runs with the machine's
# own python3 and torch (a CUDA build); Ray is not needed (the check runs each unit's own function,
# as a Ray task would; Ray's GPU scheduling is tested on logical GPUs in tests/test_gpu.py).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 transformers==5.24.0
        numba==0.68.1 llvmlite==0.50.0)
# lapjv 1.3.29 is on PyPI as a source archive only: its cp312 wheel is built here with a Python 3.12
# (PY312, default: pyenv's or the PATH's python3.12). transformers: the image's 5.17 lacks the mask API
# moe-ray uses.

if [[ "${1:-}" == "wheels" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    PY312=${PY312:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -n 1)}
    [[ -x "$PY312" ]] || PY312=$(command -v python3.12 || true)
    [[ -x "$PY312" ]] || { echo "gpu_check: need a Python 3.12 (PY312=...) to build lapjv's wheel" >&2; exit 2; }
    PIP_CONSTRAINT= "$PY312" -m pip wheel -q --no-deps lapjv==1.3.29 -w .whl
    for w in "${WHEELS[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$w"
    done
    ls -la .whl
    exit 0
fi

PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" -m benchmarks.gpu_check "$@"
