#!/usr/bin/env bash
# A release measurement in two device calls, each within the device's 10-minute limit:
#   STAGE=tune  benchmarks/gpu_release.sh   re-tune + install + GPU check (benchmarks/gpu_retune.sh, 6-minute
#                                           budget per checkpoint): tune.log, tune_*.json, the cache tarball, check.log
#   STAGE=bench benchmarks/gpu_release.sh   bench_kernels.py at every M (benchmarks/gpu_sweep.sh; its `fp8_gemm
#                                           tuned` rows use tuning_cache/ as in this tree): env.txt, bench.log, bench_kernels.json
set -uo pipefail
case ${STAGE:-tune} in
  tune) bash benchmarks/gpu_retune.sh --budget-minutes 6 "$@" ;;
  bench) STAGE=bench bash benchmarks/gpu_sweep.sh "$@" | grep -A12 "== summary" ;;
  *) echo "STAGE must be tune or bench" >&2; exit 2 ;;
esac
