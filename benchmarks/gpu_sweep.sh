#!/usr/bin/env bash
# One device call: environment check, then the stages named in STAGE (comma list, default all):
#   exhaustive  benchmarks/check_quant_exhaustive.py (every bf16/fp16 value pair through the kernels' division)
#   test        the kernel tests on the GPU (CUDA-marked tests included)
#   bench       benchmarks/bench_kernels.py with its JSON and log under $OUT
#   STAGE=test,bench benchmarks/gpu_sweep.sh [bench_kernels.py args, e.g. --sweep quant,promote --m 4096,16384]
set -uo pipefail
OUT=${OUT:-/tmp/fp8conv-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
  | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/env.txt"
# fp8conv with kernels/ as fp8conv.kernels, offline: an editable install, else a symlink on PYTHONPATH
if ! python3 -c "import fp8conv.kernels.fp8_gemm" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
  if ! python3 -c "import fp8conv.kernels.fp8_gemm" 2>/dev/null; then
    ln -sfn ../kernels fp8conv/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
python3 -c "import fp8conv.kernels.fp8_gemm as m; print('fp8conv.kernels from', m.__file__)" || exit 1
STAGE=${STAGE:-exhaustive,test,bench}
[[ $STAGE == all ]] && STAGE=exhaustive,test,bench
has() { [[ ",$STAGE," == *",$1,"* ]]; }
if has exhaustive; then
  timeout 240 python3 benchmarks/check_quant_exhaustive.py --json "$OUT/quant_exhaustive.json" 2>&1 \
    | tee "$OUT/quant_exhaustive.log" | cut -c1-400
fi
if has test; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_act_quant.py tests/test_kernels_gemm.py \
    tests/test_kernels_grouped.py tests/test_kernels_backend.py ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
fi
if has bench; then
  python3 benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json" "$@" 2>&1 | tee "$OUT/bench.log" \
    | grep -v -E "^ +(q/o|k/v|gate/up|down|experts) (sweep|ab|promote)"
fi
