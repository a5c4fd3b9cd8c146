#!/usr/bin/env bash
# One device call: tune into the shipped tuning_cache/ only the shapes it lacks for this GPU (the 4b
# preset and the bundled example at batch 32 / beam 512; entries already there are kept), and bring
# the device's folder back as $OUT/tuning_cache_<device>.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/fp8conv-out}
mkdir -p "$OUT"
python3 -c "import fp8conv.kernels.fp8_gemm" 2>/dev/null \
  || python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/fp8conv-pip.log 2>&1
DEV=$(python3 -c "from fp8conv.tuning.cache import device_key; import torch; print(device_key(torch.cuda.get_device_name()))")
W=$(mktemp -d)
python3 -m fp8conv.cli example "$W/ex" >/dev/null && python3 -m fp8conv.cli quantize "$W/ex" "$W/ex8" >/dev/null
for src in "--preset 4b" "$W/ex8"; do
  python3 -m fp8conv.cli tune $src --batch 32 --beam 512 --cache tuning_cache --budget-minutes 4 2>&1 \
    | grep -v "^tune:" | tee -a "$OUT/tune_missing.log" | tail -8
done
rm -f "tuning_cache/$DEV/.lock"
tar -C tuning_cache -czf "$OUT/tuning_cache_$DEV.tgz" "$DEV"
