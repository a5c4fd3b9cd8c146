"""Build, check and time the FP8 kernels against torch's baselines at the 4b preset's shapes (issue 4).

    python benchmarks/bench_kernels.py [--m 32,512,4096,16384] [--json OUT.json] [--sweep [quant,gemm,promote,grouped,gluon]]

Per case one line `M N K | us | TFLOP/s | GB/s | x vs baseline`, then a summary of the issue's goals
at the largest M (geometric means over the preset's shapes). Every timed output is first checked
against the dequantized float32 reference (kernels/testing.py); a failed check is reported and the
case is marked, never silently timed.

Timing: CUDA-graph replays of many calls (triton.testing.do_bench_cudagraph, median of its retries),
so launch gaps of the Python launchers stay out of the GPU time; inputs rotate over enough copies to
exceed twice the L2 (graphs do not flush it). GB/s counts the least bytes the operation must move
(each input read once, each output written once) for its interface: bf16 in/out for a Linear,
FP8 operands for a GEMM alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone

import torch
import triton
import triton.testing

from fp8conv import numerics as fp8
from fp8conv.kernels import act_quant, fp8_gemm as gemm_mod, grouped_gemm as gg
from fp8conv.kernels.config import PROMOTE_MIN_K, KernelConfig, default_config, resolve_config
from fp8conv.kernels.fp8_gemm import fp8_gemm_nt, interleave_gate_up
from fp8conv.kernels.testing import TOL, TOL_CHAINED, check, poison, ref_gemm_nt
from fp8conv.runtime.ops import rms_norm

from bench_timing import rotating, time_us  # benchmarks/ is on sys.path when run as a script

D, INTER, E, TOPK = 1408, 3840, 53, 3  # 4b preset (DESIGN)
INTER_E = 1408  # routed expert width
DENSE = [("q/o", 1408, 1408), ("k/v", 128, 1408), ("gate/up", 3840, 1408), ("down", 1408, 3840)]
# the producer of each Linear's input in the model: RMSNorm before q/k/v and gate/up, SwiGLU before down
# (o's producer is attention: it takes the standalone quantization, the "fp8 linear" rows)
PRODUCER = {"q/o": "rmsnorm", "k/v": "rmsnorm", "gate/up": "rmsnorm", "down": "swiglu"}
RESULTS: list[dict] = []


def record(case, variant, m, n, k, us, flops, nbytes, base_us=None, base_name="", err=None, extra=None):
    tf = flops / us / 1e6
    gbs = nbytes / us / 1e3
    ratio = base_us / us if base_us else None
    r = {"case": case, "variant": variant, "M": m, "N": n, "K": k, "us": round(us, 3),
         "tflops": round(tf, 1), "gbs": round(gbs, 1), "baseline": base_name,
         "x_vs_baseline": None if ratio is None else round(ratio, 3), "mean_rel_err": err}
    # the SM clock and power while each was timed (bench_timing.Timed; sums of times carry none)
    r.update(sm_mhz_w=getattr(us, "clock", None), baseline_sm_mhz_w=getattr(base_us, "clock", None))
    r.update(extra or {})
    RESULTS.append(r)
    rs = f"{ratio:5.2f}x vs {base_name}" if ratio else "baseline"
    es = "" if err is None else f" err {err:.1e}"
    ck = r["sm_mhz_w"]
    cs = f" | {ck['mhz']:4.0f} MHz {ck['w']:5.1f} W" if ck else ""
    print(f"{case:>8} {variant:<22} {m:6d} {n:5d} {k:5d} | {us:9.1f} us | {tf:7.1f} TFLOP/s | "
          f"{gbs:7.1f} GB/s | {rs}{es}{cs}", flush=True)
    return us


def checked(out, ref, what, tol=TOL):
    try:
        return check(out, ref, tol=tol, what=what)
    except AssertionError as exc:
        print(f"  CHECK FAILED: {exc}")
        return float("nan")


# -- torch baselines -----------------------------------------------------------------------------

def torch_per_token_quant(x):
    amax = x.abs().amax(dim=1, keepdim=True).float()
    s = torch.where(amax == 0, torch.ones_like(amax), amax / 448.0)
    return (x.float() / s).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), s


def scaled_mm(a, sa, b, sb, dtype=torch.bfloat16):
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.reshape(1, -1), out_dtype=dtype)


# -- dense -----------------------------------------------------------------------------------------

def _dense_set(m, n, k, swiglu=False):
    """One set of inputs: x bf16, the weight as bf16 and as FP8 (per channel), x pre-quantized, and for
    a SwiGLU producer the (m, 2k) gate/up GEMM output it reads."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * k ** -0.5
    wq, ws = fp8.quantize_channel(w)
    xq, xs = fp8.quantize_per_token(x)
    gu = (torch.randn(m, 2 * k, device="cuda") * 2).to(torch.bfloat16) if swiglu else None
    return x, w.to(torch.bfloat16), wq, ws, xq, xs, gu


def _silu_mul(g, u):
    return torch.nn.functional.silu(g) * u


_SILU_MUL = None


def silu_mul_bf16():
    """The bf16 baseline's SwiGLU: torch.compile'd silu(g) * u (one fused kernel, as a bf16 deployment
    would run it); eager torch (two kernels) if compiling fails."""
    global _SILU_MUL
    if _SILU_MUL is None:
        try:
            fn = torch.compile(_silu_mul, dynamic=False)
            g = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
            fn(g, g)
            _SILU_MUL = fn
        except Exception as exc:
            print(f"  torch.compile unavailable ({type(exc).__name__}); eager silu * up as the baseline")
            _SILU_MUL = _silu_mul
    return _SILU_MUL


def bench_dense(ms, sweep):
    for m in ms:
        for name, n, k in DENSE:
            swiglu = PRODUCER[name] == "swiglu"
            sets = rotating(lambda: _dense_set(m, n, k, swiglu), (7 if swiglu else 3) * m * k + 3 * n * k)
            x, wb, wq, ws, xq, xs, gu = sets[0]
            nw = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)  # the model holds it in bf16
            flops = 2 * m * n * k
            lin_bytes = 2 * m * k + n * k + 2 * m * n
            bf_bytes = 2 * m * k + 2 * n * k + 2 * m * n
            gemm_bytes = m * k + n * k + 2 * m * n
            ref_lin = ref_gemm_nt(xq, xs, wq, ws, torch.bfloat16)

            bf = time_us(lambda x, wb, wq, ws, xq, xs, gu: x @ wb.t(), sets)
            record(name, "cublas bf16", m, n, k, bf, flops, bf_bytes)
            # torch FP8: eager per-token quantization + _scaled_mm rowwise
            try:
                checked(scaled_mm(*torch_per_token_quant(x), wq, ws), ref_lin, "torch quant+_scaled_mm")
                tq = time_us(lambda x, wb, wq, ws, xq, xs, gu: scaled_mm(*torch_per_token_quant(x), wq, ws), sets)
                record(name, "torch quant+_scaled_mm", m, n, k, tq, flops, lin_bytes, bf, "bf16")
                smm = time_us(lambda x, wb, wq, ws, xq, xs, gu: scaled_mm(xq, xs, wq, ws), sets)
                record(name, "_scaled_mm", m, n, k, smm, flops, gemm_bytes, bf, "bf16")
            except Exception as exc:
                print(f"  torch._scaled_mm unavailable: {exc}")
                tq = smm = None
            # ours: GEMM alone, Linear (quant + GEMM), RMSNorm-fused Linear
            # past PROMOTE_MIN_K "auto" takes the Gluon kernel on Hopper: "tma" times the tl.dot one there
            for variant in ("auto", "ptr") + (("tma",) if k >= PROMOTE_MIN_K else ()):
                err = checked(fp8_gemm_nt(xq, xs, wq, ws, variant=variant), ref_lin, f"gemm {variant}")
                g = time_us(lambda x, wb, wq, ws, xq, xs, gu, v=variant: fp8_gemm_nt(xq, xs, wq, ws, variant=v), sets)
                record(name, f"fp8_gemm {variant}", m, n, k, g, flops, gemm_bytes, smm, "_scaled_mm", err)
            # with the tuning cache's config where it has one for this shape (what serving runs)
            cfg, src = resolve_config("fp8_gemm", m, n, k)
            if src != "default":
                err = checked(fp8_gemm_nt(xq, xs, wq, ws, config=cfg), ref_lin, "gemm tuned")
                g = time_us(lambda x, wb, wq, ws, xq, xs, gu: fp8_gemm_nt(xq, xs, wq, ws, config=cfg), sets)
                record(name, "fp8_gemm tuned", m, n, k, g, flops, gemm_bytes, smm, "_scaled_mm", err,
                       {"config": cfg.to_dict(), "source": src})
            err = checked(fp8_gemm_nt(*act_quant.per_token_quant(x), wq, ws), ref_lin, "linear")
            lin = time_us(lambda x, wb, wq, ws, xq, xs, gu: fp8_gemm_nt(*act_quant.per_token_quant(x), wq, ws), sets)
            record(name, "fp8 linear (quant+gemm)", m, n, k, lin, flops, lin_bytes, bf, "bf16", err,
                   {"x_vs_torch_fp8": None if tq is None else round(tq / lin, 3)})
            qt = time_us(lambda x, *_: act_quant.per_token_quant(x), sets)
            record(name, "  per_token_quant only", m, n, k, qt, 0, 3 * m * k + 4 * m)
            qn = time_us(lambda x, *_: act_quant.rmsnorm_quant(x, nw, 1e-6), sets)
            record(name, "  rmsnorm_quant only", m, n, k, qn, 0, 3 * m * k + 4 * m)
            tqo = time_us(lambda x, *_: torch_per_token_quant(x), sets)
            record(name, "  torch per-token quant", m, n, k, tqo, 0, 3 * m * k + 4 * m)
            # fused producer: RMSNorm + quant + GEMM vs torch rms_norm + cuBLAS
            ref_n = ref_gemm_nt(*fp8.quantize_per_token(rms_norm(x, nw, 1e-6)), wq, ws, torch.bfloat16)
            err = checked(fp8_gemm_nt(*act_quant.rmsnorm_quant(x, nw, 1e-6), wq, ws), ref_n, "norm linear")
            bfn = time_us(lambda x, wb, *_: torch.nn.functional.rms_norm(x, (k,), nw, 1e-6) @ wb.t(), sets)
            record(name, "rms_norm+cublas bf16", m, n, k, bfn, flops, bf_bytes)
            fn = time_us(lambda x, wb, wq, ws, *_: fp8_gemm_nt(*act_quant.rmsnorm_quant(x, nw, 1e-6), wq, ws), sets)
            record(name, "fp8 rmsnorm_quant+gemm", m, n, k, fn, flops, lin_bytes, bfn, "norm+bf16", err,
                   {"goal": "producer"} if PRODUCER[name] == "rmsnorm" else None)
            # (the down projection's producer-fused row, SwiGLU in the gate/up GEMM's epilogue, is
            # bench_mlp's: it needs the gate/up GEMM)
            if swiglu:  # the down projection's real producer: SwiGLU of the gate/up output
                g0, u0 = gu[:, :k], gu[:, k:]
                ref_s = ref_gemm_nt(*fp8.quantize_per_token(
                    (torch.nn.functional.silu(g0.float()) * u0.float()).to(torch.bfloat16)), wq, ws, torch.bfloat16)
                err = checked(fp8_gemm_nt(*act_quant.swiglu_quant(g0, u0), wq, ws), ref_s, "swiglu linear")
                sm = silu_mul_bf16()
                bfs = time_us(lambda x, wb, wq, ws, xq, xs, gu: sm(gu[:, :k], gu[:, k:]) @ wb.t(), sets)
                record(name, "silu*up+cublas bf16", m, n, k, bfs, flops, bf_bytes + 2 * m * k)
                fs = time_us(lambda x, wb, wq, ws, xq, xs, gu: fp8_gemm_nt(
                    *act_quant.swiglu_quant(gu[:, :k], gu[:, k:]), wq, ws), sets)
                record(name, "fp8 swiglu_quant+gemm", m, n, k, fs, flops, lin_bytes + 2 * m * k, bfs,
                       "silu*up+bf16", err)
                qs = time_us(lambda x, wb, wq, ws, xq, xs, gu: act_quant.swiglu_quant(gu[:, :k], gu[:, k:]), sets)
                record(name, "  swiglu_quant only", m, n, k, qs, 0, 5 * m * k + 4 * m)
            if "quant" in sweep and m == max(ms) and name in ("q/o", "down"):
                sweep_quant(name, m, k, sets, nw)
            if "gemm" in sweep and m == max(ms):
                sweep_gemm(name, m, n, k, sets, ref_lin, smm, flops, gemm_bytes)
            if "promote" in sweep and m == max(ms) and k >= 2048:
                sweep_promote(name, m, n, k, sets, ref_lin, smm, flops, gemm_bytes)
            if "splitk" in sweep and m <= 64:
                sweep_splitk(name, m, n, k, sets, ref_lin, smm, flops, gemm_bytes)


def _mlp_set(m, d, inter):
    """One set of the dense SwiGLU MLP's inputs: x, the RMSNorm weight, the weights in bf16 and FP8
    (gate/up side by side and pair-interleaved), and each GEMM's input precomputed (to time it alone)."""
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(d, device="cuda")).to(torch.bfloat16)  # the model holds it in bf16
    w1, w3 = (torch.randn(inter, d, device="cuda") * d ** -0.5 for _ in range(2))
    w2 = torch.randn(d, inter, device="cuda") * inter ** -0.5
    (q1, s1), (q3, s3), (q2, s2) = (fp8.quantize_channel(w) for w in (w1, w3, w2))
    sbs = (torch.cat([q1.view(torch.uint8), q3.view(torch.uint8)]).view(torch.float8_e4m3fn), torch.cat([s1, s3]))
    pairs = (interleave_gate_up(q1, q3), interleave_gate_up(s1, s3))
    xq, xs = act_quant.rmsnorm_quant(x, nw, 1e-6)
    h = fp8_gemm_nt(xq, xs, *pairs, swiglu=True)
    xn = torch.nn.functional.rms_norm(x, (d,), nw, 1e-6)
    w13b = torch.cat([w1, w3]).to(torch.bfloat16)
    return dict(x=x, nw=nw, w13b=w13b, w2b=w2.to(torch.bfloat16), sbs=sbs,
                pairs=pairs, w2q=(q2, s2), xq=xq, xs=xs, h=h, gub=xn @ w13b.t(),
                pairs1=(interleave_gate_up(q1, q3, order=1), interleave_gate_up(s1, s3, order=1)))


def bench_mlp(m, d=1408, inter=3840, sweep=False):
    """The dense SwiGLU MLP (RMSNorm, gate/up, SwiGLU, down) at the 4b preset's widths, three ways:
    bf16 (torch's rms_norm, cuBLAS, torch.compile'd silu * up, cuBLAS); FP8 as the backend ran it before
    (rmsnorm_quant, the (M, 2I) GEMM, swiglu_quant, the down GEMM); FP8 now (rmsnorm_quant, the gate/up
    GEMM with SwiGLU in its epilogue, per_token_quant of the (M, I) product, the down GEMM). The two FP8
    paths must agree bit for bit. Also records the down projection's producer-fused row for the issue's
    goal: FP8 = (gate/up GEMM with the SwiGLU epilogue - the same GEMM without it) + quantization + down
    GEMM, against silu * up + cuBLAS down, all measured here on the same tensors."""
    named = rotating(lambda: _mlp_set(m, d, inter), 7 * m * d + 6 * inter * d)
    keys = list(named[0])
    sets = [tuple(st.values()) for st in named]
    sm = silu_mul_bf16()
    c13, _ = resolve_config("fp8_gemm", m, 2 * inter, d)  # the plain (M, 2I) GEMM (the path before)
    c13s, _ = resolve_config("fp8_gemm_swiglu", m, 2 * inter, d)
    c2, _ = resolve_config("fp8_gemm", m, d, inter)

    def bf16_mlp(t):
        gu = torch.nn.functional.rms_norm(t["x"], (d,), t["nw"], 1e-6) @ t["w13b"].t()
        return sm(gu[:, :inter], gu[:, inter:]) @ t["w2b"].t()

    def fp8_before(t):
        gu = fp8_gemm_nt(*act_quant.rmsnorm_quant(t["x"], t["nw"], 1e-6), *t["sbs"], config=c13)
        return fp8_gemm_nt(*act_quant.swiglu_quant(gu[:, :inter], gu[:, inter:]), *t["w2q"], config=c2)

    def fp8_now(t):
        h = fp8_gemm_nt(*act_quant.rmsnorm_quant(t["x"], t["nw"], 1e-6), *t["pairs"], config=c13s, swiglu=True)
        return fp8_gemm_nt(*act_quant.per_token_quant(h), *t["w2q"], config=c2)

    t0 = named[0]
    ref = bf16_mlp(t0)
    y_before, y_now = fp8_before(t0), fp8_now(t0)
    same = bool(torch.equal(y_before, y_now))
    # FP8's own error against bf16 (~3e-2) as a sanity gate; the FP8 kernels are each checked elsewhere
    err = checked(y_now, ref, "fp8 MLP vs bf16", tol=0.1)
    err_before = checked(y_before, ref, "fp8 MLP (before) vs bf16", tol=0.1)
    print(f"  MLP M={m}: the two FP8 paths identical: {same}")
    flops = 2 * m * d * 3 * inter
    run = lambda f: time_us(lambda *st: f(dict(zip(keys, st))), sets)  # noqa: E731
    bf = run(bf16_mlp)
    record("mlp", "bf16 rms_norm+cublas+silu*up+cublas", m, inter, d, bf, flops, 0)
    record("mlp", "fp8 before (swiglu_quant pass)", m, inter, d, run(fp8_before), flops, 0, bf, "bf16 MLP",
           err_before)
    record("mlp", "fp8 SwiGLU epilogue", m, inter, d, run(fp8_now), flops, 0, bf, "bf16 MLP", err,
           {"identical_to_before": same})
    # the parts
    g13 = run(lambda t: fp8_gemm_nt(t["xq"], t["xs"], *t["pairs"], config=c13))
    record("mlp", "  gate/up GEMM (2I out)", m, 2 * inter, d, g13, 2 * m * 2 * inter * d, 0)
    g13s = run(lambda t: fp8_gemm_nt(t["xq"], t["xs"], *t["pairs"], config=c13s, swiglu=True))
    record("mlp", "  gate/up GEMM+SwiGLU (I out)", m, 2 * inter, d, g13s, 2 * m * 2 * inter * d, 0, g13,
           "plain epilogue")
    qd = run(lambda t: fp8_gemm_nt(*act_quant.per_token_quant(t["h"]), *t["w2q"], config=c2))
    record("mlp", "  quant(h)+down GEMM", m, d, inter, qd, 2 * m * d * inter, 0)
    bfs = run(lambda t: sm(t["gub"][:, :inter], t["gub"][:, inter:]) @ t["w2b"].t())
    record("mlp", "  silu*up+cublas bf16 down", m, d, inter, bfs, 2 * m * d * inter, 0)
    if sweep:
        sweep_swiglu(m, d, inter, run, t0)
    fused = g13s - g13 + qd  # a sum of timings: carries no clock
    record("down", "fp8 SwiGLU-epilogue+quant+gemm", m, d, inter, fused, 2 * m * d * inter, 0, bfs,
           "silu*up+bf16", None, {"goal": "producer", "derived": "gate/up GEMM+SwiGLU - gate/up GEMM + quant(h)+down"})


def _swiglu_candidates():
    kc = lambda bm, bn, w, s, ws=0, pp=1: KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8,  # noqa: E731
                                                       num_warps=w, num_stages=s, WARP_SPEC=ws, PROGRAMS_PER_SM=pp)
    return [kc(128, 256, 8, 3), kc(128, 256, 8, 3, ws=1), kc(128, 128, 8, 4), kc(128, 128, 8, 3, pp=2),
            kc(128, 128, 4, 3, pp=2), kc(128, 128, 8, 4, ws=1), kc(64, 256, 4, 3, pp=2), kc(256, 128, 8, 3)]


def sweep_swiglu(m, d, inter, run, t0):
    """The gate/up GEMM with and without the SwiGLU epilogue over candidate configs (and programs per
    SM: a second resident program can run its MMAs under the other's epilogue); each SwiGLU output is
    first compared bit for bit with the plain GEMM's output put through act_quant's SwiGLU. run(f) times
    f over bench_mlp's rotating input sets (each a dict like t0)."""
    ref_q = None
    cands = _swiglu_candidates()
    for cfg in cands:
        ppsm = cfg.PROGRAMS_PER_SM
        tag = f"{cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}{' ws' if cfg.WARP_SPEC else ''} {ppsm}/SM"
        for order in ((1, 2) if cfg == cands[0] else (2,)):
            key = "pairs" if order == 2 else "pairs1"
            try:
                h = fp8_gemm_nt(t0["xq"], t0["xs"], *t0[key], config=cfg, swiglu=True, swiglu_order=order)
                gu = fp8_gemm_nt(t0["xq"], t0["xs"], *t0[key], config=cfg)
                pos = torch.argsort(gemm_mod.swiglu_order(inter, order).cuda())  # column c's pair
                q0, s0 = act_quant.swiglu_quant(gu[:, 0::2][:, pos].contiguous(), gu[:, 1::2][:, pos].contiguous())
                q1, s1 = act_quant.per_token_quant(h)
                same = torch.equal(s0, s1) and torch.equal(q0.view(torch.uint8), q1.view(torch.uint8))
                if ref_q is None:
                    ref_q = q1
                err = checked(q1.float(), ref_q.float(), f"sweep {tag}", tol=0.05)
                us = run(lambda t, c=cfg, k=key, o=order: fp8_gemm_nt(t["xq"], t["xs"], *t[k], config=c, swiglu=True,
                                                                      swiglu_order=o))
                plain = run(lambda t, c=cfg, k=key: fp8_gemm_nt(t["xq"], t["xs"], *t[k], config=c))
            except Exception as exc:  # out of resources etc.
                print(f"  sweep {tag} order {order}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            record("mlp", f"sweep swiglu o{order} {tag}", m, 2 * inter, d, us, 2 * m * 2 * inter * d, 0, plain,
                   "plain epilogue", err, {"sweep": True, "bit_exact_vs_unfused": same, "config": cfg.to_dict()})


def sweep_quant(name, m, k, sets, nw):
    """Rows per program x warps, and an A/B of the division (IEEE tl.div_rn vs reciprocal + FMA
    correction) and the FP8 rounding (software vs the hardware cast)."""
    for rows, warps in [(1, 1), (1, 2), (2, 2), (1, 4), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)]:
        cfg = KernelConfig(BLOCK_M=rows, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=warps, num_stages=1)
        us = time_us(lambda x, *_: act_quant.per_token_quant(x, config=cfg), sets)
        record(name, f"sweep quant rows{rows} w{warps}", m, 0, k, us, 0, 3 * m * k + 4 * m, None, "", None,
               {"config": cfg.to_dict(), "sweep": True})
        us = time_us(lambda x, *_: act_quant.rmsnorm_quant(x, nw, 1e-6, config=cfg), sets)
        record(name, f"sweep rmsquant rows{rows} w{warps}", m, 0, k, us, 0, 3 * m * k + 4 * m, None, "", None,
               {"config": cfg.to_dict(), "sweep": True})
    for fast_div, soft in itertools.product((False, True), (True, False)):
        for prod, label in ((act_quant._NONE, "quant"), (act_quant._RMSNORM, "rmsquant")):
            def run(x, *_):
                return act_quant._launch(x, None, nw if prod else None, 1e-6, prod, False, None,
                                         fast_div=fast_div, soft_round=soft)
            us = time_us(run, sets)
            record(name, f"ab {label} fast_div={fast_div} soft_round={soft}", m, 0, k, us, 0,
                   3 * m * k + 4 * m, None, "", None, {"sweep": True})


def _try_config(name, tag, m, n, k, sets, ref, smm, flops, nbytes, run, extra):
    """Check ``run`` against ``ref``, time it and record it as a sweep row; None (and a line saying why)
    if it cannot run (out of shared memory, unsupported feature, ...). Returns (err, us): a failed check
    is still timed (err NaN), to show what a promotion mode saves, but never counts as a best."""
    try:
        err = checked(run(*sets[0]), ref, tag)
        us = time_us(run, sets)
    except Exception as exc:
        print(f"  skip {tag}: {type(exc).__name__}: {str(exc)[:120]}")
        return None
    record(name, tag, m, n, k, us, flops, nbytes, smm, "_scaled_mm", err, {"sweep": True, **extra})
    return err, us


def sweep_promote(name, m, n, k, sets, ref, smm, flops, nbytes, modes=(0, 1, 2)):
    """FP8 promotion mode (fp8_gemm.PROMOTE_MODES) x tiles at a long K."""
    tiles = [(128, 128, 128, 8, 4), (128, 128, 128, 8, 3), (128, 128, 256, 8, 3), (128, 128, 128, 4, 4),
             (128, 256, 128, 8, 3), (128, 128, 64, 8, 5), (128, 128, 128, 4, 5), (256, 128, 128, 8, 3)]
    for (bm, bn, bk, w, st), steps in itertools.product(tiles, modes):
        cfg = KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
        for variant in ("tma",) if (bm, bn) != (128, 128) or w != 8 else ("tma", "tma_ws"):
            run = lambda x, wb, wq, ws, xq, xs, gu: fp8_gemm_nt(  # noqa: E731
                xq, xs, wq, ws, config=cfg, variant=variant, promote=steps)
            _try_config(name, f"promote {steps} {variant} {bm}x{bn}x{bk} w{w}s{st}", m, n, k, sets, ref, smm,
                        flops, nbytes, run, {"config": cfg.to_dict(), "kernel_variant": variant, "promote": steps})


def sweep_splitk(name, m, n, k, sets, ref, smm, flops, nbytes):
    """Split-K (KernelConfig.SPLIT_K) at decode-sized M: tiles x splits."""
    tiles = [(64, 32, 256, 4, 5), (64, 64, 128, 4, 4), (64, 128, 128, 4, 4)]
    for (bm, bn, bk, w, st), split in itertools.product(tiles, (1, 2, 4, 8)):
        cfg = KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st, SPLIT_K=split)
        run = lambda x, wb, wq, ws, xq, xs, gu: fp8_gemm_nt(xq, xs, wq, ws, config=cfg)  # noqa: E731
        _try_config(name, f"splitk {split} {bm}x{bn}x{bk} w{w}s{st}", m, n, k, sets, ref, smm, flops, nbytes, run,
                    {"config": cfg.to_dict(), "kernel_variant": "tma"})


def gemm_candidates(m):
    if m <= 512:
        tiles = [(32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 128, 128, 4, 3),
                 (64, 256, 128, 8, 3)]
    else:
        tiles = [(128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                 (128, 256, 64, 8, 4), (64, 256, 128, 4, 4), (128, 128, 256, 8, 3), (128, 128, 256, 4, 3)]
    return [KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def sweep_gemm(name, m, n, k, sets, ref, smm, flops, nbytes):
    """Time candidate configs (and kernel variants). A candidate whose check fails is still timed
    (to show what the promotion costs) but never chosen as best."""
    best = None
    variants = [("tma", None), ("tma_ws", None)]
    for cfg in gemm_candidates(m):
        for variant, promote in variants:
            tag = (f"sweep {variant}{'' if promote is None else ' promote=' + str(promote)} "
                   f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} w{cfg.num_warps}s{cfg.num_stages}")
            run = lambda x, wb, wq, ws, xq, xs, gu: fp8_gemm_nt(  # noqa: E731
                xq, xs, wq, ws, config=cfg, variant=variant, promote=promote)
            got = _try_config(name, tag, m, n, k, sets, ref, smm, flops, nbytes, run,
                              {"config": cfg.to_dict(), "kernel_variant": variant, "promote": promote})
            if got is None:
                continue
            err, us = got
            if err == err and (best is None or us < best[0]):
                best = (us, tag)
    if best:
        print(f"  best {name} M={m}: {best[1]} {best[0]:.1f} us ({smm / best[0]:.2f}x _scaled_mm)")


# -- MoE -----------------------------------------------------------------------------------------------

def block_fp8_experts(g, rows, cols):
    """The E experts' (rows, cols) weights from generator g: bf16 copies, block-FP8 (128x128) values, scales."""
    w = torch.randn(E, rows, cols, device="cuda", generator=g) * cols ** -0.5
    qs = [fp8.quantize_block(w[e]) for e in range(E)]
    return w.to(torch.bfloat16), torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def preset_block_experts(g):
    """The preset's gate, up and down expert weights from generator g (in that order): their bf16 copies,
    and pack_experts' operands (gate, up, down block-FP8 values, then their scales)."""
    gb, gq, gs = block_fp8_experts(g, INTER_E, D)
    ub, uq, us_ = block_fp8_experts(g, INTER_E, D)
    db, dq, ds = block_fp8_experts(g, D, INTER_E)
    return (gb, ub, db), (gq, uq, dq, gs, us_, ds)


def preset_experts(g, interleave=1):
    """preset_block_experts' bf16 copies and the experts packed with ``interleave`` (1: the Gluon kernels'
    layout)."""
    bf16, blocks = preset_block_experts(g)
    return bf16, gg.pack_experts(*blocks, interleave=interleave)


def sorted_operands(x, ids, kernels=(gg.GLUON_KERNEL, gg.GLUON_KERNEL)):
    """The two expert GEMMs' default configs for these tokens (kernels: gate/up's, down's), the rows'
    alignment (the lcm of their BLOCK_Ms, as fused_experts aligns them), moe_align's (sorted ids, block
    experts, positions, used blocks) and x quantized into the sorted rows (values, K-major scales)."""
    rpe = max(1, ids.numel() // E)
    c1 = default_config(kernels[0], rpe, 2 * INTER_E, D, gate_up=True)
    c2 = default_config(kernels[1], rpe, D, INTER_E, gate_up=False)
    align = math.lcm(c1.BLOCK_M, c2.BLOCK_M)
    aligned = gg.moe_align(ids, E, align, with_pos=True)
    return (c1, c2, align, aligned) + tuple(act_quant.per_group_quant_sorted(x, aligned[2], aligned[0].numel()))


def bf16_expert_views(gb, ub, db):
    """torch._grouped_mm's (E, K, N) column-major weights: w13 (gate and up blocks interleaved by 128, the
    FP8 weight's layout, I_E % 128 == 0) and w2."""
    return gg._interleave_blocks(gb, ub, 128).transpose(1, 2), db.transpose(1, 2)


def bf16_sorted_rows(x, ids):
    """torch._grouped_mm's rows: the stable order of the routed slots by expert, x's rows in that order
    and each expert's end offset."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    return order, x[order // TOPK].contiguous(), offs


def bench_moe(ms, sweep):
    g = torch.Generator(device="cuda").manual_seed(0)
    (gb, ub, db), (gq, uq, dq, gs, us_, ds) = preset_block_experts(g)
    packed = gg.pack_experts(gq, uq, dq, gs, us_, ds, interleave=64)  # the sorted layout's (serving path)
    packed_g = gg.pack_experts(gq, uq, dq, gs, us_, ds)  # the gather layout's, for its comparison rows
    # the Gluon kernels (Hopper, where gg.gluon_ok): serving runs both GEMMs there (the "gluon" layout,
    # gate/up rows interleaved by 1, grouped_gemm.expert_layout); the tl.dot sorted layout is timed beside
    use_gluon = gg.gluon_ok("cuda")
    packed_gl = gg.pack_experts(gq, uq, dq, gs, us_, ds, interleave=1) if use_gluon else None
    w13t, w2t = bf16_expert_views(gb, ub, db)
    for m in ms:
        rows = m * TOPK
        x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(m, E, device="cuda", generator=g).topk(TOPK, dim=1).indices
        tw = torch.rand(m, TOPK, device="cuda", generator=g)
        f13 = 2 * rows * 2 * INTER_E * D
        f2 = 2 * rows * D * INTER_E
        rpe = max(1, rows // E)
        c1 = default_config("fp8_grouped_gemm", rpe, 2 * INTER_E, D, gate_up=True)
        c2 = default_config("fp8_grouped_gemm", rpe, D, INTER_E, gate_up=False)
        align = max(c1.BLOCK_M, c2.BLOCK_M)
        xq, xs = act_quant.per_group_quant(x)
        sid, bexp = gg.moe_align(ids, E, align)
        # bf16 baseline: rows sorted by expert, torch._grouped_mm for gate/up and down
        order, xs_sorted, offs = bf16_sorted_rows(x, ids)
        have_gmm = hasattr(torch, "_grouped_mm")
        if have_gmm:
            gu = torch._grouped_mm(xs_sorted, w13t, offs=offs)
            h_b = (torch.nn.functional.silu(gu.view(rows, -1, 2, 128)[:, :, 0].float())
                   * gu.view(rows, -1, 2, 128)[:, :, 1].float()).to(torch.bfloat16).reshape(rows, INTER_E)
            t13 = time_us(lambda a: torch._grouped_mm(a, w13t, offs=offs), [(xs_sorted,)])
            record("experts", "_grouped_mm bf16 gate/up", rows, 2 * INTER_E, D, t13, f13,
                   2 * rows * D + 2 * E * 2 * INTER_E * D + 2 * rows * 2 * INTER_E)
            t2 = time_us(lambda a: torch._grouped_mm(a, w2t, offs=offs), [(h_b,)])
            record("experts", "_grouped_mm bf16 down", rows, D, INTER_E, t2, f2,
                   2 * rows * INTER_E + 2 * E * D * INTER_E + 2 * rows * D)
        else:
            print("  torch._grouped_mm not available")
            t13 = t2 = None
        # torch._scaled_grouped_mm (rowwise scales: per token x per channel, not block) for reference
        if hasattr(torch, "_scaled_grouped_mm"):
            try:
                aq, asc = torch_per_token_quant(xs_sorted)
                w13c = packed.w13  # (E, N, K) fp8 row-major; mat_b wants (E, K, N) column-major
                sb = torch.ones(E, 2 * INTER_E, device="cuda")
                fn = lambda a, s: torch._scaled_grouped_mm(a, w13c.transpose(1, 2), s.reshape(-1), sb,  # noqa: E731
                                                           offs=offs, out_dtype=torch.bfloat16)
                fn(aq, asc)
                ts = time_us(fn, [(aq, asc)])
                record("experts", "_scaled_grouped_mm g/u", rows, 2 * INTER_E, D, ts, f13,
                       rows * D + E * 2 * INTER_E * D + 2 * rows * 2 * INTER_E, t13, "_grouped_mm")
            except Exception as exc:
                print(f"  torch._scaled_grouped_mm failed: {type(exc).__name__}: {str(exc)[:200]}")
        # ours, the serving path (fused_experts' sorted layout): x quantized into expert-sorted rows, the
        # persistent TMA GEMMs (gate/up with fused SwiGLU + 1x128 quant; down writing sorted rows)
        sid_s, bexp_s, pos, used = gg.moe_align(ids, E, align, with_pos=True)
        n_pad = sid_s.numel()
        xq_s, xs_s = act_quant.per_group_quant_sorted(x, pos, n_pad)
        tq = time_us(lambda a: act_quant.per_group_quant_sorted(a, pos, n_pad), [(x,)])
        record("experts", "fp8 quant into sorted rows", m, D, 0, tq, 0, 2 * m * D + n_pad * D, None, "")
        if have_gmm:
            tg = time_us(lambda a: a[order // TOPK], [(x,)])
            record("experts", "bf16 gather into sorted rows", m, D, 0, tg, 0, 2 * m * D + 2 * rows * D, None, "")
        gu_args = (xq_s, xs_s, packed.w13, packed.s13, sid_s, bexp_s, used)
        hq_s, hs_s = gg.grouped_gemm_sorted(*gu_args, swiglu=True, num_valid=rows, align_m=align, config=c1)
        k13 = time_us(lambda: gg.grouped_gemm_sorted(*gu_args, swiglu=True, num_valid=rows, align_m=align,
                                                     config=c1), [()])
        dn_args = (hq_s, hs_s, packed.w2, packed.s2, sid_s, bexp_s, used)
        y_s = gg.grouped_gemm_sorted(*dn_args, swiglu=False, num_valid=rows, align_m=align, config=c2)
        k2 = time_us(lambda: gg.grouped_gemm_sorted(*dn_args, swiglu=False, num_valid=rows, align_m=align,
                                                    config=c2), [()])
        # the gather layout (the fallback for unaligned shapes) on the same data: its outputs check the
        # sorted kernels' at every M (the same rows, other accumulation order: the 1e-3 gate)
        hq, hs = gg.grouped_gemm_block_fp8(xq, xs, packed_g.w13, packed_g.s13, sid, bexp, topk=TOPK, swiglu=True,
                                           align_m=align, config=c1)
        y_g = gg.grouped_gemm_block_fp8(hq, hs, packed_g.w2, packed_g.s2, sid, bexp, topk=TOPK, swiglu=False,
                                        align_m=align, num_valid=rows, config=c2)
        fl_pos = pos.reshape(-1).long()
        rows_of = lambda q, r: q.view(torch.uint8)[r].view(torch.float8_e4m3fn)  # noqa: E731 - FP8 by bytes
        err13 = checked(fp8.dequantize(rows_of(hq_s, fl_pos), hs_s.t()[fl_pos].contiguous()),
                        fp8.dequantize(rows_of(hq, fl_pos), hs[fl_pos].contiguous()), "sorted vs gather gate/up", TOL)
        err2 = checked(y_s[fl_pos], y_g, "sorted vs gather down", TOL)
        record("experts", "fp8 gate/up+swiglu+q", rows, 2 * INTER_E, D, k13, f13,
               rows * D + E * 2 * INTER_E * D + rows * INTER_E, t13, "_grouped_mm", err13)
        record("experts", "fp8 down", rows, D, INTER_E, k2, f2, rows * INTER_E + E * D * INTER_E + 2 * rows * D,
               t2, "_grouped_mm", err2)
        if use_gluon:
            # the same tokens through the Gluon kernels at their own defaults (w13 interleaved by 1; rows
            # aligned to their BLOCK_M), checked against the tl.dot kernels' outputs row for row
            gc1, gc2, galign, (sid_l, bexp_l, pos_l, used_l), xq_l, xs_l = sorted_operands(x, ids)
            fl_l = pos_l.reshape(-1).long()
            gl13 = (xq_l, xs_l, packed_gl.w13, packed_gl.s13, sid_l, bexp_l, used_l)
            run13 = lambda: gg.grouped_gemm_sorted(*gl13, swiglu=True, num_valid=rows, align_m=galign,  # noqa: E731
                                                   config=gc1, impl="gluon")
            hq_l, hs_l = run13()
            e13 = checked(fp8.dequantize(rows_of(hq_l, fl_l), hs_l.t()[fl_l].contiguous()),
                          fp8.dequantize(rows_of(hq_s, fl_pos), hs_s.t()[fl_pos].contiguous()),
                          "gluon vs tl.dot gate/up", TOL)
            run2 = lambda: gg.grouped_gemm_sorted(hq_l, hs_l, packed_gl.w2, packed_gl.s2, sid_l, bexp_l,  # noqa: E731
                                                  used_l, swiglu=False, num_valid=rows, align_m=galign, config=gc2,
                                                  impl="gluon")
            e2 = checked(run2()[fl_l], y_s[fl_pos], "gluon vs tl.dot down", TOL)
            l13, l2 = time_us(run13, [()]), time_us(run2, [()])
            record("experts", "fp8 gate/up+swiglu+q gluon", rows, 2 * INTER_E, D, l13, f13,
                   rows * D + E * 2 * INTER_E * D + rows * INTER_E, t13, "_grouped_mm", e13)
            record("experts", "fp8 down gluon", rows, D, INTER_E, l2, f2, rows * INTER_E + E * D * INTER_E + 2 * rows * D,
                   t2, "_grouped_mm", e2)
            if t13:
                record("experts", "fp8 both GEMMs tl.dot", m, 0, 0, k13 + k2, f13 + f2, 0, t13 + t2, "_grouped_mm")
                record("experts", "fp8 both GEMMs gluon", m, 0, 0, l13 + l2, f13 + f2, 0, t13 + t2, "_grouped_mm")
            k13, k2 = l13, l2  # the serving path (grouped_gemm.expert_layout): both GEMMs in Gluon
        g13 = time_us(lambda: gg.grouped_gemm_block_fp8(xq, xs, packed_g.w13, packed_g.s13, sid, bexp, topk=TOPK,
                                                        swiglu=True, align_m=align, config=c1), [()])
        g2 = time_us(lambda: gg.grouped_gemm_block_fp8(hq, hs, packed_g.w2, packed_g.s2, sid, bexp, topk=TOPK,
                                                       swiglu=False, align_m=align, num_valid=rows,
                                                       config=c2), [()])
        record("experts", "fp8 g/u gather layout", rows, 2 * INTER_E, D, g13, f13, 0, t13, "_grouped_mm")
        record("experts", "fp8 down gather layout", rows, D, INTER_E, g2, f2, 0, t2, "_grouped_mm")
        if t13:
            record("experts", "fp8 both GEMMs", m, 0, 0, k13 + k2, f13 + f2, 0, t13 + t2, "_grouped_mm",
                   None, {"goal": "grouped", "rows": rows})
        # whole layer: ours (quant, align, 2 GEMMs, combine) vs a bf16 torch pipeline
        serve = packed_gl if use_gluon else packed  # the serving layout's packing (expert_layout)
        full = lambda a: gg.fused_experts(a, ids, tw, serve)  # noqa: E731
        if m <= 4096:
            from fp8conv.runtime.ops import Experts, ReferenceBackend
            ex = Experts(gq, uq, dq, gs, us_, ds, "bench")
            err = checked(full(x), ReferenceBackend().experts(x, ids, tw, ex), "fused_experts", TOL_CHAINED)
        else:
            err = None
        tf = time_us(full, [(x,)])

        def bf16_layer(a):
            fl = ids.reshape(-1)
            o = torch.argsort(fl, stable=True)
            cnt = torch.zeros(E, dtype=torch.int64, device=a.device).index_add_(0, fl, torch.ones_like(fl))
            of = torch.cumsum(cnt, 0).to(torch.int32)  # no host sync: capturable
            gu_ = torch._grouped_mm(a[o // TOPK], w13t, offs=of).view(rows, -1, 2, 128)
            h_ = (torch.nn.functional.silu(gu_[:, :, 0]) * gu_[:, :, 1]).reshape(rows, INTER_E)
            y_ = torch._grouped_mm(h_, w2t, offs=of)
            out = torch.zeros(a.shape[0], D, device=a.device, dtype=torch.float32)
            out.index_add_(0, o // TOPK, y_.float() * tw.reshape(-1)[o, None])
            return out.to(a.dtype)

        tb = time_us(bf16_layer, [(x,)]) if have_gmm else None
        if tb:
            record("experts", "bf16 layer (torch)", m, 0, 0, tb, f13 + f2, 0)
        record("experts", "fp8 layer (fused_experts)", m, 0, 0, tf, f13 + f2, 0, tb, "bf16 layer", err)
        if "grouped" in sweep and m == max(ms):
            # the sweep's operands at alignment 128 (every BLOCK_M swept divides it); its references are the
            # default configs' outputs on them
            sid8, bexp8, pos8, used8 = gg.moe_align(ids, E, 128, with_pos=True)
            xq8, xs8 = act_quant.per_group_quant_sorted(x, pos8, sid8.numel())
            gu8 = (xq8, xs8, packed.w13, packed.s13, sid8, bexp8, used8)
            hq8, hs8 = gg.grouped_gemm_sorted(*gu8, swiglu=True, num_valid=rows, align_m=128, config=c1)
            dn8 = (hq8, hs8, packed.w2, packed.s2, sid8, bexp8, used8)
            y8 = gg.grouped_gemm_sorted(*dn8, swiglu=False, num_valid=rows, align_m=128, config=c2)
            fl8 = pos8.reshape(-1).long()

            def err_of(out, swiglu):
                if swiglu:
                    return checked(fp8.dequantize(rows_of(out[0], fl8), out[1].t()[fl8].contiguous()),
                                   fp8.dequantize(rows_of(hq8, fl8), hs8.t()[fl8].contiguous()), "sweep gate/up", TOL)
                return checked(out[fl8], y8[fl8], "sweep down", TOL)

            sweep_grouped(m, gu8, dn8, t13, t2, f13, f2, err_of)
        if "gluon" in sweep and use_gluon and m >= 4096:
            # per row alignment (128; 192 for three consumer warpgroups): operands on those rows, the
            # references from the one-warpgroup Gluon kernel (BLOCK_M 64 divides both)
            for al in (128, 192):
                sid8, bexp8, pos8, used8 = gg.moe_align(ids, E, al, with_pos=True)
                xq8, xs8 = act_quant.per_group_quant_sorted(x, pos8, sid8.numel())
                gu8 = (xq8, xs8, packed_gl.w13, packed_gl.s13, sid8, bexp8, used8)
                gd1 = default_config(gg.GLUON_KERNEL, 64, 2 * INTER_E, D, gate_up=True)
                gd2 = default_config(gg.GLUON_KERNEL, 64, D, INTER_E, gate_up=False)
                hq8, hs8 = gg.grouped_gemm_sorted(*gu8, swiglu=True, num_valid=rows, align_m=al, config=gd1,
                                                  impl="gluon")
                dn8 = (hq8, hs8, packed_gl.w2, packed_gl.s2, sid8, bexp8, used8)
                y8 = gg.grouped_gemm_sorted(*dn8, swiglu=False, num_valid=rows, align_m=al, config=gd2, impl="gluon")
                fl8 = pos8.reshape(-1).long()

                def err_gl(out, swiglu, fl8=fl8, hq8=hq8, hs8=hs8, y8=y8):
                    if swiglu:
                        return checked(fp8.dequantize(rows_of(out[0], fl8), out[1].t()[fl8].contiguous()),
                                       fp8.dequantize(rows_of(hq8, fl8), hs8.t()[fl8].contiguous()), "sweep gate/up",
                                       TOL)
                    return checked(out[fl8], y8[fl8], "sweep down", TOL)

                sweep_gluon(m, al, gu8, dn8, t13, t2, f13, f2, err_gl)
                # the serving gate/up (tl.dot, w13 interleaved by 64) on these rows
                gut = (xq8, xs8, packed.w13, packed.s13, sid8, bexp8, used8)
                _sweep_one(m, f"tl.dot g/u default align{al}", gut, True, c1, t13, f13, None, err_gl, "triton",
                           align=al)


def sweep_grouped(m, gu_args, dn_args, t13, t2, f13, f2, err_of):
    """Configs of the persistent sorted-layout kernels (align 128 covers every BLOCK_M here), each
    checked against the default config's output before it is timed."""
    def one(name, args, swiglu, cfg, base, flops, ppsm):
        _sweep_one(m, name, args, swiglu, cfg, base, flops, ppsm, err_of, "triton")

    for (bm, w, st), ws, gm, ppsm in itertools.product([(64, 8, 3), (64, 4, 3), (64, 4, 4), (128, 8, 3), (128, 8, 4),
                                                        (128, 8, 2)], (0, 1), (8,), (1, None)):
        cfg = KernelConfig(BLOCK_M=bm, BLOCK_N=256, BLOCK_K=128, GROUP_M=gm, num_warps=w, num_stages=st, WARP_SPEC=ws)
        one(f"g/u {bm}x256 w{w}s{st} g{gm} ws{ws} p{ppsm or 'auto'}", gu_args, True, cfg, t13, f13, ppsm)
    for (bm, bn, w, st), ws, ppsm in itertools.product([(64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 4, 2),
                                                        (128, 128, 8, 3), (128, 128, 8, 4), (64, 256, 8, 3),
                                                        (128, 128, 4, 3), (64, 128, 8, 3)], (0, 1), (1, None)):
        cfg = KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=w, num_stages=st, WARP_SPEC=ws)
        one(f"down {bm}x{bn} w{w}s{st} ws{ws} p{ppsm or 'auto'}", dn_args, False, cfg, t2, f2, ppsm)


def _sweep_one(m, name, args, swiglu, cfg, base, flops, ppsm, err_of, impl, align=128):
    """Check one grouped config against the reference outputs (on poisoned buffers), time it, record it."""
    rows = m * TOPK
    run = lambda out=None: gg.grouped_gemm_sorted(*args, swiglu=swiglu, num_valid=rows,  # noqa: E731
                                                  align_m=align, config=cfg, programs_per_sm=ppsm, out=out, impl=impl)
    try:
        # the check run writes into poisoned buffers (a fresh one could hold an earlier config's answer)
        first = run()
        outs = first if swiglu else (first,)
        for t in outs:
            poison(t)
        err = err_of(run(outs if swiglu else outs[0]), swiglu)
        us = time_us(run, [()])
    except Exception as exc:
        print(f"  skip {name}: {type(exc).__name__}: {str(exc)[:120]}")
        return
    record("experts", f"sweep {name}", rows, 0, 0, us, flops, 0, base, "_grouped_mm", err,
           {"config": cfg.to_dict(), "sweep": True, "programs_per_sm": ppsm, "impl": impl})


def sweep_gluon(m, align, gu_args, dn_args, t13, t2, f13, f2, err_of):
    """Configs of the Gluon kernels (gg.gluon_config_ok: a warpgroup per 64 rows) whose BLOCK_M divides
    the rows' alignment: one warpgroup (64), two consumer warpgroups (128) or three (192)."""
    forms = {128: [(64, 3), (128, 5), (128, 6)], 192: [(192, 3), (192, 4)]}[align]
    for bm, st in forms:
        cfg = KernelConfig(BLOCK_M=bm, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=bm // 16, num_stages=st)
        _sweep_one(m, f"gluon g/u {bm}x256 s{st} align{align}", gu_args, True, cfg, t13, f13, None, err_of, "gluon",
                   align)
    for bm, st in forms:
        cfg = KernelConfig(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=bm // 16, num_stages=st)
        _sweep_one(m, f"gluon down {bm}x128 s{st} align{align}", dn_args, False, cfg, t2, f2, None, err_of, "gluon",
                   align)


# -- summary -------------------------------------------------------------------------------------------

def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(m):
    def ratios(variant, key="x_vs_baseline"):
        return [r[key] for r in RESULTS if r["variant"] == variant and r["M"] == m and not r.get("sweep")]

    def best_sweep_ratio():
        out = []
        for name, _, _ in DENSE:
            rs = [r["x_vs_baseline"] for r in RESULTS if r["case"] == name and r["M"] == m and r.get("sweep")
                  and r.get("kernel_variant") and r["x_vs_baseline"] and r["mean_rel_err"] is not None
                  and r["mean_rel_err"] == r["mean_rel_err"]]
            if rs:
                out.append(max(rs))
        return out

    def served_ratios():  # per shape: the tuning cache's config where it has one, else the default
        out = []
        for name, _, _ in DENSE:
            mine = {r["variant"]: r["x_vs_baseline"] for r in RESULTS if r["case"] == name and r["M"] == m
                    and not r.get("sweep")}
            out.append(mine.get("fp8_gemm tuned") or mine.get("fp8_gemm auto"))
        return out

    rows = [
        ("FP8 Linear incl. quant vs cuBLAS bf16", geomean(ratios("fp8 linear (quant+gemm)")), 1.5),
        ("FP8 Linear incl. quant vs torch quant+_scaled_mm", geomean(ratios("fp8 linear (quant+gemm)",
                                                                            "x_vs_torch_fp8")), 1.3),
        ("RMSNorm-fused FP8 Linear vs rms_norm+cuBLAS bf16", geomean(ratios("fp8 rmsnorm_quant+gemm")), None),
        ("producer-fused FP8 Linear vs producer+cuBLAS bf16", geomean(
            [r["x_vs_baseline"] for r in RESULTS if r.get("goal") == "producer" and r["M"] == m]), 1.5),
        ("FP8 GEMM alone (default cfg) vs _scaled_mm", geomean(ratios("fp8_gemm auto")), 1.0),
        ("FP8 GEMM alone (best swept cfg) vs _scaled_mm", geomean(best_sweep_ratio()), 1.0),
        ("FP8 GEMM alone (tuned where cached, else default)", geomean(served_ratios()), 1.0),
        ("grouped FP8 expert GEMMs vs _grouped_mm bf16", geomean(ratios("fp8 both GEMMs")), 1.6),
        ("whole MoE layer FP8 vs bf16 torch pipeline", geomean(ratios("fp8 layer (fused_experts)")), None),
        ("dense SwiGLU MLP FP8 vs bf16 (norm, 2 GEMMs, SwiGLU)", geomean(ratios("fp8 SwiGLU epilogue")), None),
    ]
    print(f"\n== summary at M = {m} (geometric mean over the preset's shapes) ==")
    for label, val, goal in rows:
        verdict = "" if goal is None or val != val else ("  MET" if val >= goal else "  missed")
        print(f"{label:<52} {val:6.2f}x" + (f"  (goal {goal}x){verdict}" if goal else ""))
    return [{"goal": label, "value": None if val != val else round(val, 3), "target": goal} for label, val, goal in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="32,512,4096,16384")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", nargs="?", const="quant,gemm,promote,grouped,gluon", default="",
                    help="also time candidates at the largest M: comma list of quant,gemm,promote,grouped "
                         "(all if given without a value)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: dense,mlp,moe")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    ms = [int(v) for v in args.m.split(",")]
    args.sweep = set(filter(None, args.sweep.split(",")))
    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(env))
    torch.manual_seed(0)
    t0 = time.time()
    skip = set(args.skip.split(","))
    if "dense" not in skip:
        bench_dense(ms, args.sweep)
    if "mlp" not in skip:
        for m in ms:
            bench_mlp(m, sweep="mlp" in args.sweep and m >= 4096)
    if "moe" not in skip:
        bench_moe(ms, args.sweep)
    summaries = {m: summary(m) for m in ms if m >= 4096}
    env["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": RESULTS, "summary": summaries}, f, indent=1)
    print(f"done in {env['seconds']} s")


if __name__ == "__main__":
    main()
