#!/usr/bin/env bash
# One device call per stage of a release measurement, each within the device's 10-minute limit:
#   STAGE=tune  benchmarks/gpu_release.sh   re-tune + install + GPU check (benchmarks/gpu_retune.sh, 6-minute
#                                           budget per checkpoint): tune.log, tune_*.json, the cache tarball, check.log
#   STAGE=bench benchmarks/gpu_release.sh   bench_kernels.py at every M (tuned rows use tuning_cache/ as
#                                           shipped in this tree): bench.log, bench_kernels.json
set -uo pipefail
OUT=${OUT:-/tmp/fp8conv-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import fp8conv.kernels.fp8_gemm" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/fp8conv-pip.log 2>&1
fi
case ${STAGE:-tune} in
  tune) bash benchmarks/gpu_retune.sh --budget-minutes 6 ;;
  bench)
    python3 benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json" "$@" >"$OUT/bench.log" 2>&1
    grep -A12 "== summary" "$OUT/bench.log" ;;
esac
