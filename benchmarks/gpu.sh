#!/usr/bin/env bash
# ResNet-50 224px bf16 training throughput on the local GPU(s): images/s, TFLOP/s, fraction of peak.
# Usage: bash benchmarks/gpu.sh [gpu.py flags, e.g. --batch_size 192 --no-torch]   (~3-5 min on one H200)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
exec python3 benchmarks/gpu.py "$@"
