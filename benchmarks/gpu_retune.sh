#!/usr/bin/env bash
# One device call: re-tune the shipped configs for this GPU from an empty cache (the 4b preset and the
# bundled example at batch 32 / beam 512, the same cache), install them over tuning_cache/<device>/ in
# this copy of the tree, then run benchmarks/gpu_check.sh on them (every CUDA-marked test, verify on
# the GPU with both backends). Reports and the new cache (tuning_cache_<device>.tgz) under $OUT; unpack it into
# tuning_cache/ to ship it.
#   [SKIP_CHECK=1] benchmarks/gpu_retune.sh [--budget-minutes 6]
set -uo pipefail
OUT=${OUT:-/tmp/fp8conv-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import fp8conv.kernels.fp8_gemm" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/fp8conv-pip.log 2>&1
fi
python3 -c "import fp8conv.kernels.fp8_gemm" || exit 1
DEV=$(python3 -c "from fp8conv.tuning.cache import device_key; import torch; print(device_key(torch.cuda.get_device_name()))")
echo "device folder: $DEV"
rm -rf "$OUT/tc"
python3 benchmarks/bench_tune.py --preset 4b --batch 32 --beam 512 --cache "$OUT/tc" "$@" \
  --json-out "$OUT/tune_4b.json" 2>&1 | tee -a "$OUT/tune.log" | tail -12
W=$(mktemp -d)
python3 -m fp8conv.cli example "$W/ex" >/dev/null
python3 -m fp8conv.cli quantize "$W/ex" "$W/ex8" >/dev/null  # tune reads the schemes from FP8 weights
python3 benchmarks/bench_tune.py "$W/ex8" --batch 32 --beam 512 --cache "$OUT/tc" "$@" \
  --json-out "$OUT/tune_example.json" 2>&1 | tee -a "$OUT/tune.log" | tail -6
if [[ -d "$OUT/tc/$DEV" ]]; then
  rm -f "$OUT/tc/$DEV/.lock"
  rm -rf "tuning_cache/$DEV" && cp -r "$OUT/tc/$DEV" "tuning_cache/$DEV"
  echo "installed $(ls tuning_cache/$DEV | wc -l) files into tuning_cache/$DEV"
  tar -C "$OUT/tc" -czf "$OUT/tuning_cache_$DEV.tgz" "$DEV" && rm -rf "$OUT/tc"  # one file comes back
fi
[[ ${SKIP_CHECK:-0} == 1 ]] && exit 0
bash benchmarks/gpu_check.sh
