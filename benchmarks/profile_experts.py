"""Run the served expert GEMMs once each (no CUDA graphs), for a profiler:

    ncu --kernel-name regex:grouped --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_experts.py [--m 16384]

The 4b preset's experts at M tokens (bench_kernels.py's shapes and operands), packed and aligned as
fused_experts serves them on this machine (grouped_gemm.expert_layout), default configs: a warm-up
launch of each GEMM, then the profiled one. Prints the layout and configs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402

from fp8conv.kernels import grouped_gemm as gg  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=16384)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_experts needs a CUDA GPU")
    D, I, E, TOPK = bk.D, bk.INTER_E, bk.E, bk.TOPK
    layout = gg.expert_layout(D, I, torch.device("cuda"))
    if layout == "gather":
        sys.exit("profile_experts profiles the sorted layouts (d and I multiples of 16)")
    g = torch.Generator(device="cuda").manual_seed(0)
    _, packed = bk.preset_experts(g, interleave=gg.INTERLEAVE[layout])
    rows = args.m * TOPK
    x = torch.randn(args.m, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(args.m, E, device="cuda", generator=g).topk(TOPK, dim=1).indices
    c1, c2, align, (sid, bexp, pos, used), xq, xs = bk.sorted_operands(x, ids, gg.layout_kernels(layout))
    impl = "gluon" if layout == "gluon" else "triton"
    print(f"layout {layout}, align {align}, gate/up {c1}, down {c2}", flush=True)
    for _ in range(2):  # warm-up (compiles, sizes the grids), then the profiled launch
        hq, hs = gg.grouped_gemm_sorted(xq, xs, packed.w13, packed.s13, sid, bexp, used, swiglu=True,
                                        num_valid=rows, align_m=align, config=c1, impl=impl)
        gg.grouped_gemm_sorted(hq, hs, packed.w2, packed.s2, sid, bexp, used, swiglu=False, num_valid=rows,
                               align_m=align, config=c2, impl=impl)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
