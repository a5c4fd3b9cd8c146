"""Timing shared by the GPU benchmark scripts (bench_kernels.py, bench_topk.py).

CUDA-graph replays of many calls (triton.testing.do_bench_cudagraph, median), so the Python launchers'
overhead stays out of the GPU time; inputs rotate over enough copies to exceed twice the L2, since a
graph replay does not flush it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.testing

L2_BYTES = 50 * 2**20


def rotating(make_set, set_bytes: int):
    """Copies of the inputs so that one pass over all of them exceeds 2x L2 (at most 16)."""
    n = max(1, min(16, math.ceil(2 * L2_BYTES / max(1, set_bytes))))
    return [make_set() for _ in range(n)]


def time_us(fn, sets, rep: int = 50) -> float:
    """Median microseconds of ``fn(*set)``, the sets taken in turn (each set a tuple of arguments)."""
    it = [0]

    def call():
        s = sets[it[0] % len(sets)]
        it[0] += 1
        return fn(*s)

    call()
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench_cudagraph(call, rep=rep, return_mode="median")
    except Exception as exc:  # capture failed: fall back to event timing (L2 flushed by do_bench)
        print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing with do_bench)")
        ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
    return ms * 1e3
