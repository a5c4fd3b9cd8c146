"""A/B of the Gluon grouped GEMMs: this tree's kernels/grouped_gemm_gluon.py ("new") against other copies
of the file (an earlier commit's, variants), on the same operands, timed in alternation with
torch._grouped_mm bf16.

    git show REV:kernels/grouped_gemm_gluon.py > /tmp/old_gluon.py
    python benchmarks/bench_gluon_ab.py --side old=/tmp/old_gluon.py [--side NAME=PATH ...] [--m 4096,16384]
        [--rounds 3] [--json OUT]

The experts of the 4b preset (bench_kernels.py's shapes and operands), served as grouped_gemm.expert_layout
serves them on Hopper (both GEMMs in Gluon at the default configs, rows aligned to the lcm of their
BLOCK_Ms as fused_experts aligns them). Each side's outputs are checked against the first side's (mean
relative error < 1e-3 after dequantization) before anything is timed; then every round times each side
and the bf16 baseline once, and the table gives each one's median over the rounds and its ratio to the
first side. The order of the sides (bf16 included) rotates from round to round, so that the GPU's drift
within a round (an H100 at its 700 W cap moves its SM clock between ~1200 and 1980 MHz) falls on every
side alike; MHz and W are the medians over the rounds of the SM clock and board power (NVML) that
bench_timing.time_us saw while each side was timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from bench_timing import time_us  # noqa: E402

from fp8conv import numerics as fp8  # noqa: E402
from fp8conv.kernels import grouped_gemm as gg  # noqa: E402
from fp8conv.kernels.testing import TOL  # noqa: E402
from fp8conv.tuning.cache import atomic_write_text  # noqa: E402


def load_module(path):
    spec = importlib.util.spec_from_file_location(f"side_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _clocks(timed):
    """The medians over the rounds of the SM clock and power each timing carried (bench_timing.Timed), or None."""
    cs = [t.clock for t in timed if getattr(t, "clock", None)]
    if not cs:
        return None
    return {"mhz": statistics.median(c["mhz"] for c in cs), "w": round(statistics.median(c["w"] for c in cs), 1),
            "samples": sum(c["samples"] for c in cs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", action="append", required=True, metavar="NAME=PATH",
                    help="another grouped_gemm_gluon.py (repeatable; the first is the reference side)")
    ap.add_argument("--m", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not gg.gluon_ok("cuda"):
        sys.exit("bench_gluon_ab needs a Hopper GPU and Triton with Gluon (grouped_gemm.gluon_ok)")
    sides = {name: load_module(path) for name, path in (v.split("=", 1) for v in args.side)}
    sides["new"] = gg._gluon()
    first = next(iter(sides))
    D, I, E, TOPK = bk.D, bk.INTER_E, bk.E, bk.TOPK
    g = torch.Generator(device="cuda").manual_seed(0)
    bf16_weights, packed = bk.preset_experts(g)
    # older kernel files expect w13's gate and up rows plainly alternating (no W13_ORDER): their own copy
    plain_w13 = packed.w13[:, torch.argsort(gg.gluon_w13_order(packed.w13.shape[1])).to(packed.w13.device)]
    w13t, w2t = bk.bf16_expert_views(*bf16_weights)
    out = []
    print(f"{'tokens':>6} {'GEMM':<8} {'side':<24} {'us':>8} {'vs ' + first:>12} {'x bf16':>7} {'MHz':>6} {'W':>6}")
    for m in [int(v) for v in args.m.split(",")]:
        rows = m * TOPK
        x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(m, E, device="cuda", generator=g).topk(TOPK, dim=1).indices
        c1, c2, align, (sid, bexp, pos, used), xq, xs = bk.sorted_operands(x, ids)
        fl = pos.reshape(-1).long()

        def gate_up():  # with the w13 order of the side in use (gg._GLUON)
            w13 = packed.w13 if getattr(gg._GLUON, "W13_ORDER", 0) == 1 else plain_w13
            return gg.grouped_gemm_sorted(xq, xs, w13, packed.s13, sid, bexp, used, swiglu=True,
                                          num_valid=rows, align_m=align, config=c1, impl="gluon")

        def down(hq, hs):
            return gg.grouped_gemm_sorted(hq, hs, packed.w2, packed.s2, sid, bexp, used, swiglu=False,
                                          num_valid=rows, align_m=align, config=c2, impl="gluon")

        def use(side):
            gg._GLUON = sides[side]
            gg._OCCUPANCY.clear()  # each side's registers and shared memory size its own grid

        res = {}
        for side in sides:
            use(side)
            hq, hs = gate_up()
            rows_q = hq.view(torch.uint8)[fl].view(torch.float8_e4m3fn)  # FP8 rows by bytes
            res[side] = (fp8.dequantize(rows_q, hs.t()[fl].contiguous()), down(hq, hs)[fl].float(), hq, hs)
        errs = {(gemm, side): bk.checked(res[side][i], res[first][i], f"{side} vs {first} {gemm}", TOL)
                for side in sides for i, gemm in enumerate(("gate/up", "down"))}
        hq, hs = res[first][2], res[first][3]  # every side's down GEMM reads the same input
        runs = {"gate/up": gate_up, "down": lambda: down(hq, hs)}
        _, xs_sorted, offs = bk.bf16_sorted_rows(x, ids)
        h_b = torch.randn(rows, I, device="cuda", dtype=torch.bfloat16)
        base = {"gate/up": lambda: torch._grouped_mm(xs_sorted, w13t, offs=offs),
                "down": lambda: torch._grouped_mm(h_b, w2t, offs=offs)}
        names = list(sides) + ["bf16"]
        times = {(gemm, side): [] for gemm in runs for side in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # each side in every position in turn
            for gemm in runs:
                for side in order:
                    if side != "bf16":
                        use(side)
                    times[gemm, side].append(time_us(runs[gemm] if side != "bf16" else base[gemm], [()]))
        use("new")
        med = {k: statistics.median(v) for k, v in times.items()}
        for side in names:
            med["both", side] = med["gate/up", side] + med["down", side]
        for gemm in ("gate/up", "down", "both"):
            for side in names:
                t, t0, tb = med[gemm, side], med[gemm, first], med[gemm, "bf16"]
                ck = _clocks(times[gemm, side]) if gemm != "both" else None
                cks = f"{ck['mhz']:6.0f} {ck['w']:6.1f}" if ck else ""
                print(f"{m:6d} {gemm:<8} {side:<24} {t:8.1f} {t / t0:12.3f} {tb / t:7.2f} {cks}", flush=True)
                out.append({"tokens": m, "gemm": gemm, "side": side, "us": round(t, 2), "x_bf16": round(tb / t, 3),
                            "sm_mhz_w": ck,
                            "err_vs_first": errs.get((gemm, side)),
                            "rounds": times.get((gemm, side)), "align_m": align,
                            "config": {"gate/up": c1, "down": c2}[gemm].to_dict() if gemm != "both" else None})
    if args.json:
        atomic_write_text(args.json, json.dumps({"env": {"gpu": torch.cuda.get_device_name(),
                                                         "torch": torch.__version__,
                                                         "triton": triton.__version__},
                                                 "results": out}, indent=1))
    bad = [e for e in (r["err_vs_first"] for r in out) if e is not None and not e < TOL]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
