#!/usr/bin/env bash
# The GPU check, as one command for the few minutes a GPU machine is lent:
#   bash benchmarks/gpu_check.sh
# Installs onnxruntime-gpu from carried wheels in .whl/ when there are any (the machine has
# no network), then runs benchmarks/gpu_check.py, which writes gpu_check.json to $OUT (or
# build/) and exits 0 measured, 1 CUDA disagrees with the CPU, 2 no CUDA provider here.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec timeout 290 python3 benchmarks/gpu_check.py
