#!/usr/bin/env bash
# For the first machine with an NVIDIA GPU: the GPU test subset and every GPU benchmark in one command (< 10 min).
#   bash benchmarks/gpu_check.sh            (after scripts/setup.sh; a CUDA torch with triton >= 3.4 in .venv)
# Prints the device and backends first, then the tests compiled for the real GPU (no interpreter), then each
# benchmark that takes --device cuda (bench_trigrid.py; bench_sds.py / bench_inversion.py once they do).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
cd "$ROOT"
unset TRITON_INTERPRET                       # compiled kernels on the GPU, never the interpreter
export TRITON_DEFAULT_FP_FUSION=1
"$PY" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU (torch %s, CUDA %s)" % (torch.__version__, torch.version.cuda))
sys.path.insert(0, ".")
from portrait3d_core._kernels import kernels
for i in range(torch.cuda.device_count()):
    print(f"[gpu_check] cuda:{i} {torch.cuda.get_device_name(i)} sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}")
print("[gpu_check] backends:", kernels.backend_report(torch.device("cuda", 0)))
PY
start=$(date +%s)
echo "[gpu_check] GPU test subset"
timeout 420 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_triton.py tests/test_trigrid_sampling.py \
  tests/test_posed_render.py -k "triton or trigrid or nearest or sampling"
for bench in benchmarks/bench_*.py; do
  if grep -q -- '"--device"' "$bench"; then
    echo "[gpu_check] $bench --device cuda"
    timeout 420 "$PY" "$bench" --device cuda
  fi
done
echo "[gpu_check] done in $(( $(date +%s) - start )) s"
