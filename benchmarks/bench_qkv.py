"""The self-attention's q, k, v projections at the 4b preset's widths, three ways, on the GPU:

- bf16: torch's fused RMSNorm (``F.rms_norm``), then three cuBLAS bf16 GEMMs;
- fp8 per Linear: the runtime's RMSNorm (ops.rms_norm, float32 in eager torch), then per Linear a
  per-token quantization and an FP8 GEMM (the Triton backend before ``norm_linears``: three
  quantization passes over the same normalized rows);
- fp8 norm_linears: one fused RMSNorm + quantization and one FP8 GEMM over [q; k; v] (the backend now).

    python benchmarks/bench_qkv.py [--m 32,512,4096,16384] [--json OUT.json]

The two FP8 paths are checked against each other (the same numbers up to accumulation order, 1e-3 gate)
and against the reference backend before anything is timed. Prints the times and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

import torch
import triton

from fp8conv import numerics as fp8
from fp8conv.kernels.backend import TritonBackend
from fp8conv.kernels.testing import check
from fp8conv.runtime.ops import Linear, ReferenceBackend, rms_norm
from fp8conv.tuning.cache import atomic_write_text

from bench_timing import rotating, time_us  # benchmarks/ is on sys.path when run as a script

D, HQ, HKV, DH = 1408, 11, 1, 128  # 4b preset: d 1408, 11 query heads, 1 key/value head of 128


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="32,512,4096,16384")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_qkv needs a CUDA GPU")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(env))
    g = torch.Generator().manual_seed(0)
    ws, wb = [], []
    for n in (HQ * DH, HKV * DH, HKV * DH):
        w = torch.randn(n, D, generator=g) * D ** -0.5
        q, s = fp8.quantize_channel(w)
        ws.append(Linear(q.cuda(), s.cuda(), "w"))
        wb.append(w.to(torch.bfloat16).cuda())
    norm_w = (1 + 0.1 * torch.randn(D, generator=g)).to(torch.bfloat16).cuda()
    be, ref = TritonBackend(), ReferenceBackend()
    eps = 1e-6

    def per_linear(x):
        xn = rms_norm(x, norm_w, eps)
        return tuple(be.linear(xn, w) for w in ws)

    def fused(x):
        return be.norm_linears(x, norm_w, eps, tuple(ws))

    def bf16(x):
        xn = torch.nn.functional.rms_norm(x, (D,), norm_w, eps)
        return tuple(xn @ w.t() for w in wb)

    rows = []
    for m in [int(v) for v in args.m.split(",")]:
        x = torch.randn(m, D, device="cuda").to(torch.bfloat16)
        a, b = torch.cat(per_linear(x), -1), torch.cat(fused(x), -1)
        check(b, a, what=f"norm_linears vs per Linear, M={m}")
        check(b, torch.cat(ref.norm_linears(x, norm_w, eps, tuple(ws)), -1), what=f"vs reference, M={m}")
        sets = rotating(lambda: (torch.randn(m, D, device="cuda").to(torch.bfloat16),), m * D * 2)
        t = {name: time_us(fn, sets) for name, fn in (("bf16", bf16), ("fp8 per Linear", per_linear),
                                                     ("fp8 norm_linears", fused))}
        row = {"M": m, **{k: round(v, 2) for k, v in t.items()},
               "x_vs_bf16": round(t["bf16"] / t["fp8 norm_linears"], 3),
               "x_vs_per_linear": round(t["fp8 per Linear"] / t["fp8 norm_linears"], 3)}
        rows.append(row)
        print(f"M={m:6d} | bf16 {t['bf16']:8.1f} us | fp8 per Linear {t['fp8 per Linear']:8.1f} us | "
              f"fp8 norm_linears {t['fp8 norm_linears']:8.1f} us | {row['x_vs_bf16']:.2f}x bf16, "
              f"{row['x_vs_per_linear']:.2f}x per Linear", flush=True)
    if args.json:  # never a half-written result
        atomic_write_text(args.json, json.dumps({"env": env, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
