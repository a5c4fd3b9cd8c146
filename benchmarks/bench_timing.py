"""Timing shared by the GPU benchmark scripts (bench_kernels.py, bench_topk.py).

CUDA-graph replays of many calls (triton.testing.do_bench_cudagraph, median), so the Python launchers'
overhead stays out of the GPU time; inputs rotate over enough copies to exceed twice the L2, since a
graph replay does not flush it. Each time comes back as a Timed float that also carries the median SM
clock and board power while it was measured (gpu_clocks.ClockSampler; None without NVML): an H100 at
its 700 W cap runs large GEMMs clocked down, so a time means little without its clock.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.testing

from gpu_clocks import ClockSampler

L2_BYTES = 50 * 2**20
_SAMPLER = None
_CALLS = itertools.count()


class Timed(float):
    """Microseconds, with ``clock``: {"mhz", "w", "samples"} while they were measured, or None."""

    clock = None


def _sampler():
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = ClockSampler().__enter__()  # a daemon thread for the life of the process
    return _SAMPLER


def rotating(make_set, set_bytes: int):
    """Copies of the inputs so that one pass over all of them exceeds 2x L2 (at most 16)."""
    n = max(1, min(16, math.ceil(2 * L2_BYTES / max(1, set_bytes))))
    return [make_set() for _ in range(n)]


def time_us(fn, sets, rep: int = 50) -> Timed:
    """Median microseconds of ``fn(*set)``, the sets taken in turn (each set a tuple of arguments), with the
    SM clock and power while they were measured (Timed.clock)."""
    it = [0]

    def call():
        s = sets[it[0] % len(sets)]
        it[0] += 1
        return fn(*s)

    call()
    torch.cuda.synchronize()
    clocks, phase = _sampler(), f"time_us {next(_CALLS)}"
    with clocks.phase(phase):
        try:
            ms = triton.testing.do_bench_cudagraph(call, rep=rep, return_mode="median")
        except Exception as exc:  # capture failed: fall back to event timing (L2 flushed by do_bench)
            print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing with do_bench)")
            ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
    out = Timed(ms * 1e3)
    out.clock = clocks.summary(phase)
    return out
