"""RMSNorm on the GPU: the runtime's eager ops.rms_norm vs torch's F.rms_norm vs the Triton kernel.

At the 4b preset's width (d = 1408), bf16 activations and weight, three ways:

- eager: ops.rms_norm, float32 in eager torch (what both backends ran before TritonBackend.rms_norm);
- F.rms_norm: torch's own RMSNorm (it rounds the normalized row to bf16 before the weight, so its
  numbers differ from ops.rms_norm's by about an ulp);
- triton: kernels/norm.py, what TritonBackend.rms_norm runs now.

    python benchmarks/bench_norm.py [--m 32,4096,16384] [--d 1408] [--json OUT.json]

Outputs are checked before anything is timed: triton against eager within one bf16 ulp and at least
99% bit-equal (kernels/testing.check_ulps), F.rms_norm against eager by mean relative error (1e-2).
Times are CUDA-graph replays, the median (bench_timing.time_us). One line per M:
``M d | us per variant | GB/s of triton (x read + y written) | x vs eager, x vs F.rms_norm``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

import torch
import triton

from fp8conv.kernels import norm
from fp8conv.kernels.testing import check, check_ulps
from fp8conv.runtime.ops import rms_norm
from fp8conv.tuning.cache import atomic_write_text

from bench_timing import rotating, time_us  # benchmarks/ is on sys.path when run as a script

EPS = 1e-6


def variants(d: int, weight: torch.Tensor) -> dict:
    return {
        "eager": lambda x: rms_norm(x, weight, EPS),
        "F.rms_norm": lambda x: torch.nn.functional.rms_norm(x, (d,), weight, EPS),
        "triton": lambda x: norm.rms_norm(x, weight, EPS),
    }


def check_outputs(fns: dict, x: torch.Tensor, what: str) -> None:
    ref = fns["eager"](x)
    worst, equal = check_ulps(fns["triton"](x), ref, max_ulps=1, min_equal=0.99, what=f"triton {what}")
    check(fns["F.rms_norm"](x), ref, tol=1e-2, what=f"F.rms_norm {what}")
    print(f"  checked {what}: triton within {worst} ulp of eager, {equal:.5f} bit-equal", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="32,4096,16384", help="rows (tokens), comma-separated")
    ap.add_argument("--d", type=int, default=1408, help="row length (the model width)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = ap.parse_args(argv)
    try:
        args.m = [int(v) for v in args.m.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--m takes comma-separated integers, got {args.m!r}")
    if not args.m or min(args.m) < 1 or args.d < 1:
        ap.error("--m and --d must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_norm needs a CUDA GPU")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(env))
    d = args.d
    g = torch.Generator().manual_seed(0)
    weight = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16).cuda()
    fns = variants(d, weight)
    rows = []
    for m in args.m:
        check_outputs(fns, torch.randn(m, d, device="cuda").to(torch.bfloat16), f"M={m}")
        sets = rotating(lambda: (torch.randn(m, d, device="cuda").to(torch.bfloat16),), m * d * 2)
        t = {name: time_us(fn, sets) for name, fn in fns.items()}
        gbs = (2 * m * d * 2 + d * 2) / (t["triton"] * 1e-6) / 1e9
        row = {"M": m, "d": d, **{f"{k}_us": round(v, 2) for k, v in t.items()},
               "triton_GBps": round(gbs, 1),
               "x_vs_eager": round(t["eager"] / t["triton"], 3),
               "x_vs_F_rms_norm": round(t["F.rms_norm"] / t["triton"], 3)}
        rows.append(row)
        print(f"{m:6d} {d:5d} | eager {t['eager']:8.1f} us | F.rms_norm {t['F.rms_norm']:8.1f} us | "
              f"triton {t['triton']:8.1f} us | {gbs:7.1f} GB/s | {row['x_vs_eager']:.2f}x vs eager, "
              f"{row['x_vs_F_rms_norm']:.2f}x vs F.rms_norm", flush=True)
    if args.json:  # never a half-written result
        atomic_write_text(args.json, json.dumps({"env": env, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
