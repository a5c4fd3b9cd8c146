#!/usr/bin/env bash
# One device call after integration: every CUDA-marked test of the suite, then the release pipeline on
# the bundled example with verify on the GPU, reference backend and Triton backend.
#   benchmarks/gpu_check.sh      (logs under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/fp8conv-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/check.log"
if ! python3 -c "import fp8conv.kernels.fp8_gemm" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/fp8conv-pip.log 2>&1
fi
python3 -c "import fp8conv.kernels.fp8_gemm" || exit 1
# 67 CUDA tests took 243-300+ s on an H100 (2026-11-25: 300 s cut the last one); 450 leaves the two verify runs room in a 10-minute call
timeout 450 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee -a "$OUT/check.log" | tail -8
W=$(mktemp -d)
python3 -m fp8conv.cli example "$W/ex" >/dev/null
python3 -m fp8conv.cli quantize "$W/ex" "$W/ex8" >/dev/null 2>&1 || echo "quantize failed"
for be in reference triton; do
  echo "== verify --device cuda --backend $be"
  /usr/bin/time -f "wall %e s" python3 -m fp8conv.cli verify "$W/ex" "$W/ex8" --device cuda --backend $be \
    2>&1 | tee -a "$OUT/check.log" | grep -E "top-1|Recall|head|PASS|FAIL|wall|error"
done
