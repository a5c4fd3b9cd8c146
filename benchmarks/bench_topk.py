"""Time kernels/topk.py against torch.topk at beam search's shapes (GPU only).

    python benchmarks/bench_topk.py [--json OUT.json] [--shapes 32x8192x512,...] [--data randn,beam,masked]

Per case one line `R C k data | us | GB/s | x vs torch.topk` (GB/s: the R*C*4 bytes of the scores read
once), then how the multi-program path's stage 2 found the rows (kernels/topk.py: ready = one full
read; ties; low/high/nofilter = the fallback's extra passes). Every case is checked first: values
bit-identical to torch.topk's, indices pointing at them, equal values lowest index first; a failed
check is reported and the case is marked, never silently timed.

Data: randn (torch.randn), beam (beam search's scores: per row 512 beams of log_softmax over the
codebook plus the beam's score; one beam at C = 8192), masked (beam with 97% of the candidates
-inf, as catalogue masking leaves them).

Timing: CUDA-graph replays (triton.testing.do_bench_cudagraph, median), inputs rotating over enough
copies to exceed twice the L2 (one copy at C = 4M: 512 MB).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone

import torch
import triton
import triton.testing

from fp8conv.kernels import topk as topk_mod
from fp8conv.kernels.config import default_config

from bench_timing import rotating, time_us  # benchmarks/ is on sys.path when run as a script

SHAPES = [(32, 8192, 512), (32, 4194304, 512), (32, 4194304, 10), (1, 4194304, 512)]
CASES = {1: "ready", 2: "ties", 3: "low", 4: "high", 5: "nofilter"}
RESULTS: list[dict] = []


def make_scores(r, c, kind, g):
    if kind == "randn":
        return torch.randn(r, c, device="cuda", generator=g)
    beams = 512 if c >= 512 * 1024 else 1
    logits = torch.randn(r, beams, c // beams, device="cuda", generator=g) * 2
    logp = torch.log_softmax(logits, dim=-1)
    beam = torch.sort(-torch.rand(r, beams, 1, device="cuda", generator=g) * 8, dim=1, descending=True).values
    s = (beam + logp).view(r, c)
    if kind == "masked":
        s.masked_fill_(torch.rand(r, c, device="cuda", generator=g) < 0.97, -math.inf)
    return s.contiguous()


def check(x, k):
    """None if topk matches torch.topk (values bit-identical, indices valid, ties lowest index first)."""
    v, i = topk_mod.topk(x, k)
    tv, _ = torch.topk(x, k, dim=-1, sorted=True)
    if not torch.equal(v.view(torch.int32), tv.view(torch.int32)):
        bad = (v.view(torch.int32) != tv.view(torch.int32)).sum().item()
        return f"{bad} values differ from torch.topk"
    if not torch.equal(x.gather(1, i).view(torch.int32), v.view(torch.int32)):
        return "indices do not point at the values"
    same = v[:, 1:].view(torch.int32) == v[:, :-1].view(torch.int32)
    if (same & (i[:, 1:] <= i[:, :-1])).any():
        return "equal values not in index order"
    return None


def bench(r, c, k, kind, g):
    x0 = make_scores(r, c, kind, g)
    err = check(x0, k)
    trace = {}
    topk_mod.topk(x0, k, _trace=trace)
    cases = {}
    if trace:
        for v in trace["case"][0].tolist():
            cases[CASES.get(int(v), str(v))] = cases.get(CASES.get(int(v), str(v)), 0) + 1
    sets = rotating(lambda: (make_scores(r, c, kind, g),), r * c * 4)
    sets[0] = (x0,)
    ours = time_us(lambda x: topk_mod.topk(x, k), sets, rep=100)
    ref = time_us(lambda x: torch.topk(x, k, dim=-1, sorted=True), sets, rep=100)
    nbytes = r * c * 4
    row = {"R": r, "C": c, "k": k, "data": kind, "us": round(ours, 2), "torch_us": round(ref, 2),
           "gbs": round(nbytes / ours / 1e3, 1), "torch_gbs": round(nbytes / ref / 1e3, 1),
           "x_vs_torch": round(ref / ours, 3), "check": err or "ok", "stage2": cases,
           "config": default_config("topk", r, c, k).to_dict(),
           "path": "rows" if c <= topk_mod.SMALL_C else "multi"}
    RESULTS.append(row)
    mark = "" if err is None else f"  CHECK FAILED: {err}"
    st = "" if not cases else "  stage2 " + " ".join(f"{a}={b}" for a, b in sorted(cases.items()))
    print(f"{r:3d} {c:8d} {k:4d} {kind:>7} | {ours:9.1f} us | {row['gbs']:7.1f} GB/s | "
          f"{row['x_vs_torch']:5.2f}x vs torch.topk ({ref:.1f} us){st}{mark}", flush=True)
    del sets, x0
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default=None, help="comma list of RxCxk (default: the beam-search shapes)")
    ap.add_argument("--data", default="randn,beam,masked")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_topk needs a CUDA GPU")
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(env))
    g = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    print("  R        C    k    data |        us |    GB/s | vs torch")
    for r, c, k in shapes:
        for kind in args.data.split(","):
            bench(r, c, k, kind, g)
    env["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": RESULTS}, f, indent=1)
    bad = [r for r in RESULTS if r["check"] != "ok"]
    print(f"done in {env['seconds']} s" + (f"; {len(bad)} CHECK FAILURES" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
