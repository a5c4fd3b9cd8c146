"""Per-warpgroup clock trace of the three-consumer Gluon grouped GEMM (a diagnostic, not a benchmark).

    python benchmarks/trace_gluon.py [--m 16384] [--pid 5] [--kernel PATH] [--json OUT]

Instruments a copy of kernels/grouped_gemm_gluon.py (text patches below: they fail loudly when the
kernel changes under them) with reads of the SM clock (%clock) stored by lane 0 of each warpgroup of
one program: per K block of its first 8 items, each consumer's times before the ready-barrier wait,
after it, after the wgmma issue, after its wait, after the promotion; the epilogue's stages; the
loader's empty-barrier wait and TMA issue per step. Runs the 4b experts at --m tokens (gate/up, then
down) as bench_gluon_ab.py does and prints the means per consumer. The stores themselves cost a few
dozen clocks per step (and skew the warps of warpgroup 0), so read the table as where the time goes,
not as the kernel's speed. This is what found the loader taking 600-2000 clocks per step (an expert id
loaded at every step) and the gate/up epilogue's ~28% (docs/benchmarks.md, ninth run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402

from fp8conv.kernels import grouped_gemm as gg  # noqa: E402
from fp8conv.kernels.config import GLUON_WS3_MIN_ROWS  # noqa: E402

KERNEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels",
                      "grouped_gemm_gluon.py")


# (old, new) text patches applied in order to kernels/grouped_gemm_gluon.py: the clock stores
PATCHES = [
    ('''@gluon.jit
def _ws_step(''',
     '''@gluon.jit
def _clock(like):
    return gl.inline_asm_elementwise("mov.u32 $0, %clock;", "=r,r", [like], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _ws_step_t(acc, prod, step, sa, sg, su, is_up, a_smem, b_smem, ready, empty, tp, tmask, offs, WG: gl.constexpr,
               BLOCK_M: gl.constexpr, SWIGLU: gl.constexpr, STAGES: gl.constexpr):
    s = step % STAGES
    gl.store(tp, _clock(offs), mask=tmask)
    mbarrier.wait(ready.index(s), (step // STAGES) & 1)
    gl.store(tp + 1, _clock(offs), mask=tmask)
    prod = warpgroup_mma(a_smem.index(s * (BLOCK_M // 64) + WG), b_smem.index(s).permute((1, 0)), prod,
                         use_acc=False, is_async=True)
    gl.store(tp + 2, _clock(offs), mask=tmask)
    prod = warpgroup_mma_wait(num_outstanding=0, deps=(prod,))
    gl.store(tp + 3, _clock(offs), mask=tmask)
    mbarrier.arrive(empty.index(s), count=1)
    acc = _promote(acc, prod, sa, sg, su, is_up, SWIGLU)
    gl.store(tp + 4, _clock(offs + acc.to(gl.int32).sum(axis=1) * 0), mask=tmask)
    return acc, prod, step + 1


@gluon.jit
def _ws_step('''),
    ('''            for kb in range(k_tiles):
                sa, sg, su = _kb_scales(kb, as_ptr, P, offs_m, bs_g, bs_u)  # in flight while this warpgroup waits
                acc, prod, step = _ws_step(acc, prod, step, sa, sg, su, is_up, a_smem, b_smem, ready, empty, WG,
                                           BLOCK_M, SWIGLU, STAGES)
''',
     '''            for kb in range(k_tiles):
                sa, sg, su = _kb_scales(kb, as_ptr, P, offs_m, bs_g, bs_u)  # in flight while this warpgroup waits
                tp = trace_ptr + ((WG * 8 + item) * 16 + kb) * 8 + 0 * offs_m
                acc, prod, step = _ws_step_t(acc, prod, step, sa, sg, su, is_up, a_smem, b_smem, ready, empty, tp,
                                             tmask, offs_m, WG, BLOCK_M, SWIGLU, STAGES)
'''),
    ('''        if SWIGLU:
            amax_lo = _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_smem.index(WG), c_smem.index(2 * WG),''',
     '''        tpe = trace_ptr + 3072 + (WG * 8 + item) * 8 + 0 * offs_m
        gl.store(tpe, _clock(offs_m + acc.to(gl.int32).sum(axis=1) * 0), mask=tmask)
        if SWIGLU:
            amax_lo = _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_smem.index(WG), c_smem.index(2 * WG),'''),
    ('''
    tma.store_wait(pendings=0)


@gluon.jit
def _grouped_ws_kernel(''',
     '''
        gl.store(tpe + 5, _clock(offs_m + amax_lo.to(gl.int32) * 0), mask=tmask)
    tma.store_wait(pendings=0)


@gluon.jit
def _grouped_ws_kernel('''),
    ('''        offs_m = off_m + gl.arange(0, 64, layout=row_l)
        valid_rows = gl.load(sid_ptr + offs_m) < num_valid  # for the epilogue: loaded before the K loop''',
     '''        offs_m = off_m + gl.arange(0, 64, layout=row_l)
        tmask = (gl.arange(0, 64, layout=row_l) == 0) & (pid == TRACE_PID) & (item < 8)
        valid_rows = gl.load(sid_ptr + offs_m) < num_valid  # for the epilogue: loaded before the K loop'''),
    ('''used_ptr, c_desc, cs_ptr, P, N, K, num_valid, stride_bse, stride_bsn,
                 SWIGLU: gl.constexpr''',
     '''used_ptr, c_desc, cs_ptr, trace_ptr, TRACE_PID, P, N, K, num_valid, stride_bse, stride_bsn,
                 SWIGLU: gl.constexpr'''),
    ('''bexp_ptr, used_ptr, c_desc, cs_ptr, P, N, K, num_valid, stride_bse,''',
     '''bexp_ptr, used_ptr, c_desc, cs_ptr, trace_ptr, TRACE_PID, P, N, K, num_valid, stride_bse,'''),
    ('''    a_desc, as_ptr, b_desc, bs_ptr, sid_ptr, bexp_ptr, used_ptr, c_desc, cs_ptr,
    P, N, K, num_valid, stride_bse, stride_bsn,''',
     '''    a_desc, as_ptr, b_desc, bs_ptr, sid_ptr, bexp_ptr, used_ptr, c_desc, cs_ptr, trace_ptr, TRACE_PID,
    P, N, K, num_valid, stride_bse, stride_bsn,'''),
    ('''    if ws:
        # consumer registers after setmaxnreg''',
     '''    if ws:
        global TRACE
        TRACE = torch.zeros(3072 + 192 + 384, dtype=torch.int32, device=a.device)
        args = args[:9] + (TRACE, TRACE_PID_VALUE) + args[9:]
        # consumer registers after setmaxnreg'''),
    ('''_GL_ACT = {''',
     '''TRACE = None
TRACE_PID_VALUE = 5
_GL_ACT = {'''),
    ('''def _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_buf, c_lo, c_hi, c_desc, cs_ptr, valid_rows, P,
              row_l: gl.constexpr,''',
     '''def _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_buf, c_lo, c_hi, c_desc, cs_ptr, valid_rows, P, tpe, tmask,
              row_l: gl.constexpr,'''),
    ('''        amax = gl.convert_layout(gl.max(gl.abs(h), axis=1), row_l)
        if part == 0:''',
     '''        amax = gl.convert_layout(gl.max(gl.abs(h), axis=1), row_l)
        gl.store(tpe + 1, _clock(offs_m + amax.to(gl.int32) * 0), mask=tmask)
        if part == 0:'''),
    ('''            tma.store_wait(pendings=0)  # the previous group's stores have left c_lo / c_hi
            c_lo.store(q_lo.to(c_desc.dtype))
            c_hi.store(q_hi.to(c_desc.dtype))
            fence_async_shared()''',
     '''            gl.store(tpe + 2, _clock(offs_m + gl.convert_layout(gl.sum(q_hi, axis=1), row_l).to(gl.int32) * 0), mask=tmask)
            tma.store_wait(pendings=0)  # the previous group's stores have left c_lo / c_hi
            gl.store(tpe + 3, _clock(offs_m), mask=tmask)
            c_lo.store(q_lo.to(c_desc.dtype))
            c_hi.store(q_hi.to(c_desc.dtype))
            fence_async_shared()
            gl.store(tpe + 4, _clock(offs_m), mask=tmask)'''),
    ('''c_desc, cs_ptr, valid_rows, P, row_l, SWIGLU, ACT, FAST_DIV, BLOCK_N)''',
     '''c_desc, cs_ptr, valid_rows, P, tpe, tmask, row_l, SWIGLU, ACT, FAST_DIV, BLOCK_N)'''),
    ('''c_desc, cs_ptr, valid_rows, P, row_l, SWIGLU, ACT, FAST_DIV,
''',
     '''c_desc, cs_ptr, valid_rows, P, tpe, tmask, row_l, SWIGLU, ACT, FAST_DIV,
'''),
    ('''c_smem.index(2 * WG + 1), c_desc, cs_ptr, valid_rows, P, row_l, SWIGLU, ACT,''',
     '''c_smem.index(2 * WG + 1), c_desc, cs_ptr, valid_rows, P, tpe, tmask, row_l, SWIGLU, ACT,'''),
    ('''def _ws_producer(a_desc, b_desc, a_smem, b_smem, ready, empty, bexp_ptr, used_ptr, N, K,''',
     '''def _ws_producer(a_desc, b_desc, a_smem, b_smem, ready, empty, bexp_ptr, used_ptr, trace_ptr, TRACE_PID, N, K,'''),
    ('''        for kb in range(k_tiles):
            s = step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) - 1) & 1, pred=step >= STAGES)
            _load_step(s, off_m, row0, kb * BLOCK_K, a_desc, b_desc, a_smem, b_smem, ready, BLOCK_M)
            step += 1''',
     '''        for kb in range(k_tiles):
            s = step % STAGES
            lane = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
            pm = (lane == 0) & (pid == TRACE_PID) & (step < 96)
            pp = trace_ptr + 3072 + 192 + step * 4 + lane * 0
            gl.store(pp, _clock(lane), mask=pm)
            mbarrier.wait(empty.index(s), ((step // STAGES) - 1) & 1, pred=step >= STAGES)
            gl.store(pp + 1, _clock(lane), mask=pm)
            _load_step(s, off_m, row0, kb * BLOCK_K, a_desc, b_desc, a_smem, b_smem, ready, BLOCK_M)
            gl.store(pp + 2, _clock(lane), mask=pm)
            step += 1'''),
    ('''(_ws_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, bexp_ptr, used_ptr, N, K,''',
     '''(_ws_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, bexp_ptr, used_ptr, trace_ptr, TRACE_PID, N, K,'''),
]

def instrument(s: str) -> str:
    """The kernel source with the clock stores added (each patch must apply)."""
    for old, new in PATCHES:
        if old not in s:
            sys.exit("trace_gluon: kernels/grouped_gemm_gluon.py changed; this patch no longer applies:\n" + old[:300])
        s = s.replace(old, new)
    return s


def _mean(v):
    return statistics.mean(v) if v else float("nan")


def load_traced(kernel=KERNEL):
    src = instrument(open(kernel).read())
    d = tempfile.mkdtemp(prefix="trace_gluon_")
    path = os.path.join(d, "grouped_gemm_gluon_traced.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("grouped_gemm_gluon_traced", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--pid", default="5", help="comma list of program ids to trace")
    ap.add_argument("--kernel", default=KERNEL, help="the kernel file to instrument (a variant's copy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not gg.gluon_ok("cuda"):
        sys.exit("trace_gluon needs a Hopper GPU and Triton with Gluon (grouped_gemm.gluon_ok)")
    tm = load_traced(args.kernel)
    D, I, E, TOPK = bk.D, bk.INTER_E, bk.E, bk.TOPK
    g = torch.Generator(device="cuda").manual_seed(0)
    _, packed = bk.preset_experts(g)
    m = args.m
    rows = m * TOPK
    x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(m, E, device="cuda", generator=g).topk(TOPK, dim=1).indices
    c1, c2, align, (sid, bexp, pos, used), xq, xs = bk.sorted_operands(x, ids)
    if c1.BLOCK_M != 192 or c2.BLOCK_M != 192:
        sys.exit(f"trace_gluon traces the three-consumer form (BLOCK_M 192, from {GLUON_WS3_MIN_ROWS} rows per "
                 f"expert); {m} tokens get BLOCK_M {c1.BLOCK_M} / {c2.BLOCK_M}: use more tokens (--m 16384)")
    gg._GLUON = tm
    gg._OCCUPANCY.clear()
    out = {}
    pids = args.pid.split(",")

    def run(name, fn):
        for pidv in [int(p) for p in pids]:
            tm.TRACE_PID_VALUE = pidv
            for _ in range(2):  # the second launch's trace (the first compiles)
                fn()
                torch.cuda.synchronize()
            t = tm.TRACE.cpu().numpy().astype("int64")
            base = t[0]
            t = (t - base + (1 << 31)) % (1 << 32) - (1 << 31)
            kt = t[:3072].reshape(3, 8, 16, 8)
            ep = t[3072:3072 + 192].reshape(3, 8, 8)
            pr = t[3072 + 192:].reshape(96, 4)
            out[f"{name}_pid{pidv}"] = {"k": kt.tolist(), "e": ep.tolist(), "p": pr.tolist()}
            K = min(16, -(-(D if name == "gate_up" else I) // 128))  # K blocks per item (traced: up to 16)
            print(f"== {name} pid {pidv}: per consumer, items 1..7, mean clocks per K block")
            for c in range(3):
                def f(a, b, c=c):
                    return _mean([kt[c, it, kb, b] - kt[c, it, kb, a] for it in range(1, 8) for kb in range(K)])
                gap = _mean([kt[c, it, kb + 1, 0] - kt[c, it, kb, 4] for it in range(1, 8) for kb in range(K - 1)])
                print(f"  c{c}: data wait {f(0, 1):5.0f}  issue {f(1, 2):5.0f}  mma {f(2, 3):5.0f}  "
                      f"arrive+promote {f(3, 4):5.0f}  loop gap {gap:5.0f}")
            print("  epilogue of c0 per item: swiglu+amax / quantize (2nd item) or h store (1st) / store_wait / "
                  "smem stores+fence / TMA+scales, total")
            for it in range(0, 6):
                e = [int(v) for v in ep[0, it]]
                second = name == "gate_up" and it % 2 == 1
                if name != "gate_up":  # the down epilogue has no stages of its own here
                    stages = []
                elif second:
                    stages = [e[1] - e[0], e[2] - e[1], e[3] - e[2], e[4] - e[3], e[5] - e[4]]
                else:
                    stages = [e[1] - e[0], e[5] - e[1]]
                print(f"    item {it}: {stages} total {e[5] - e[0]}")
            print("  per consumer and item: start (clocks after c0's) / K loop / wait before the epilogue / epilogue")
            for c in range(3):
                cells = [f"{kt[c, it, 0, 0] - kt[0, it, 0, 0]:6d}/{kt[c, it, K - 1, 4] - kt[c, it, 0, 0]:6d}/"
                         f"{ep[c, it, 0] - kt[c, it, K - 1, 4]:5d}/{ep[c, it, 5] - ep[c, it, 0]:5d}"
                         for it in range(1, 7)]
                print(f"    c{c}: " + "  ".join(cells))
            steps = [(it, kb) for it in range(8) for kb in range(K)]  # the loader's step order
            print("  producer per step: empty wait / issue; lead = consumer c0 data-ready time - producer issue time")
            for j in range(22, 44, 2):
                it, kb = steps[j]
                lead = kt[0, it, kb, 1] - pr[j, 2]
                print(f"    step {j:3d} (item {it} kb {kb:2d}): empty wait {pr[j, 1] - pr[j, 0]:6d}  "
                      f"issue {pr[j, 2] - pr[j, 1]:5d}  c0 waited {kt[0, it, kb, 1] - kt[0, it, kb, 0]:5d}  "
                      f"issue->c0 ready {lead:6d}")

    run("gate_up", lambda: gg.grouped_gemm_sorted(xq, xs, packed.w13, packed.s13, sid, bexp, used, swiglu=True,
                                               num_valid=rows, align_m=align, config=c1, impl="gluon"))
    hq, hs = gg.grouped_gemm_sorted(xq, xs, packed.w13, packed.s13, sid, bexp, used, swiglu=True,
                                    num_valid=rows, align_m=align, config=c1, impl="gluon")
    run("down", lambda: gg.grouped_gemm_sorted(hq, hs, packed.w2, packed.s2, sid, bexp, used, swiglu=False,
                                            num_valid=rows, align_m=align, config=c2, impl="gluon"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
