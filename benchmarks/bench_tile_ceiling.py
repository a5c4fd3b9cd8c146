"""What bounds the grouped expert GEMMs: the per-K-block scaling, or the tile's operand traffic?

    python benchmarks/bench_tile_ceiling.py [--json OUT.json]

Times the dense FP8 GEMM (kernels/fp8_gemm.py: per-token x per-channel scales, applied once in the
epilogue, so nothing waits on a K block's product) at the expert GEMMs' sizes (49152 rows = 16384 tokens
x top-3; N, K = 1408 and 2816 x 1408) with the grouped kernels' tiles (128 x 128, 64 x 128) and with its
own default (128 x 256), against torch._scaled_mm rowwise. If the 128 x 128 dense GEMM, which has no
block scaling at all, runs near the grouped kernels' 700 TFLOP/s while 128 x 256 runs far faster, the
grouped kernels are bound by their tile (its bytes per FLOP through L2), not by the scaling.
Outputs are checked against torch._scaled_mm's (mean relative error < 1e-3) before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import rotating, time_us  # noqa: E402

from fp8conv import metrics  # noqa: E402
from fp8conv.kernels.config import KernelConfig, default_config  # noqa: E402
from fp8conv.kernels.fp8_gemm import fp8_gemm_nt  # noqa: E402
from fp8conv.tuning.cache import atomic_write_text  # noqa: E402

ROWS = 49152
SHAPES = [("down-like", 1408, 1408), ("gate/up-like", 2816, 1408)]
TILES = {"128x256 w8 s3": KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
         "128x128 w8 s4": KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
         "64x128 w4 s4": KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_tile_ceiling.py needs a CUDA GPU")
    rows = []
    for name, n, k in SHAPES:
        def make():
            a = torch.randn(ROWS, k, device="cuda").to(torch.float8_e4m3fn)
            return a, torch.rand(ROWS, 1, device="cuda") + 0.5
        sets = rotating(make, ROWS * k)
        b = (torch.randn(n, k, device="cuda") * 0.5).to(torch.float8_e4m3fn)
        sb = torch.rand(n, 1, device="cuda") + 0.5
        smm = lambda a, sa: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(),  # noqa: E731
                                             out_dtype=torch.bfloat16)
        ref = smm(*sets[0])
        flops = 2.0 * ROWS * n * k
        t_ref = time_us(smm, sets)
        rows.append({"shape": name, "tile": "torch._scaled_mm", "us": t_ref, "tflops": flops / t_ref / 1e6})
        print(f"{name:13s} {ROWS}x{n}x{k}  torch._scaled_mm      {t_ref:8.1f} us  {flops / t_ref / 1e6:7.1f} TFLOP/s")
        tiles = dict(TILES, **{"default": default_config("fp8_gemm", ROWS, n, k)})
        for tag, cfg in tiles.items():
            run = lambda a, sa: fp8_gemm_nt(a, sa, b, sb, torch.bfloat16, config=cfg)  # noqa: E731
            err = metrics.mean_rel_error(run(*sets[0]), ref)
            if not err < 1e-3:
                print(f"  {tag}: mean rel. error {err:.2e} against torch._scaled_mm -- not timed")
                continue
            us = time_us(run, sets)
            rows.append({"shape": name, "tile": tag, "config": cfg.to_dict(), "us": us,
                         "tflops": flops / us / 1e6, "mean_rel_err": err})
            print(f"{name:13s} {ROWS}x{n}x{k}  fp8_gemm {tag:13s} {us:8.1f} us  {flops / us / 1e6:7.1f} TFLOP/s"
                  f"  ({t_ref / us:.2f}x _scaled_mm, err {err:.1e})")
    if args.json:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": __import__("triton").__version__}
        atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
