"""Repeated, poisoned launches of the warp-specialised FP8 GEMM (KernelConfig.WARP_SPEC = 1) on the GPU.

An earlier warp-specialised two-loop promotion showed one NaN row once on an H200 and never again; this
runs the configs that now use warp specialisation many times, with the output poisoned (NaN) before every
launch and fresh activations every few launches, and fails if any launch leaves a NaN or misses the 1e-3
gate. Prints one line per case and a summary; exit status 1 on any failure.

    python benchmarks/check_ws_stress.py [--repeats 60]
"""

from __future__ import annotations

import argparse
import sys

import torch

from fp8conv import numerics as fp8
from fp8conv.kernels.config import KernelConfig, default_config
from fp8conv.kernels.fp8_gemm import fp8_gemm_nt
from fp8conv.kernels.testing import TOL, ref_gemm_nt

CASES = [  # (M, N, K, config or None for the default)
    (16384, 1408, 3840, None),
    (4096, 1408, 3840, None),
    (83, 1408, 3840, KernelConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=5,
                                  WARP_SPEC=1)),
    (7, 1408, 4160, KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4,
                                 WARP_SPEC=1)),
    (16384, 1408, 1408, KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4,
                                     WARP_SPEC=1)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("check_ws_stress needs a CUDA GPU")
    bad = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n, k, cfg in CASES:
        cfg = cfg or default_config("fp8_gemm", m, n, k)
        assert cfg.WARP_SPEC == 1, cfg
        b, sb = fp8.quantize_channel(torch.randn(n, k, device="cuda", generator=g) * 0.05)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        worst, nans = 0.0, 0
        for r in range(args.repeats):
            if r % 10 == 0:
                a, sa = fp8.quantize_per_token(torch.randn(m, k, device="cuda", generator=g).bfloat16())
                ref = ref_gemm_nt(a, sa, b, sb, torch.bfloat16).float()
                den = ref.abs().mean()
            out.fill_(float("nan"))
            fp8_gemm_nt(a, sa, b, sb, torch.bfloat16, config=cfg, out=out)
            o = out.float()
            nan_rows = int(torch.isnan(o).any(dim=1).sum())
            err = float((o - ref).abs().nan_to_num(float("inf")).mean() / den)
            nans += nan_rows
            worst = max(worst, err)
        ok = nans == 0 and worst < TOL
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {m}x{n}x{k} {cfg.to_dict()}: {args.repeats} launches, NaN rows {nans}, "
              f"worst mean rel. error {worst:.2e}")
    print(f"warp-specialised stress: {len(CASES) - bad}/{len(CASES)} cases clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
