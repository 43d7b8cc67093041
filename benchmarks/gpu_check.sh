#!/usr/bin/env bash
# The GPU figures in one command, on a machine with CUDA and the project's dependencies (torch,
# pytorch-lightning, torchmetrics, pytest): the CUDA-only tests (host syncs by CUDA's own check,
# fp16 GradScaler, bf16 autocast, fused optimizers, the sampled snapshot against the CPU), the GPU rows
# of the step benchmark, then a GPT-2-small-shaped parameter set (124M parameters, 148 tensors, float32
# and bfloat16): time per step of `auto` against `clip_grad_norm_` and the kernels each step launches
# (torch.profiler). About 5 minutes on one H100/H200-class GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # OUT_DIR (default benchmarks/results) gets the reports
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$py" - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: this script checks the GPU paths only"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY

status=0
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.log" || status=1
"$py" benchmarks/bench_step.py --devices cuda --sizes 25e6,100e6 --reps 20 --rounds 3 \
    --out "$out/bench_step_cuda.md" 2>&1 | tail -n 40 || status=1
"$py" benchmarks/bench_gpu.py --out "$out/bench_gpu.md" 2>&1 | tail -n 30 || status=1
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED); reports in $out"
exit $status
