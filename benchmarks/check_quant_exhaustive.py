"""Exhaustive check of the kernels' FP8 division (act_quant.quantize_values) on the GPU.

    python benchmarks/check_quant_exhaustive.py [--dtype bf16,fp16] [--json OUT.json]

For every finite positive value ``a`` of the dtype (the amax of a 1x128 group) and every value x of
the dtype with |x| <= a (both signs, and +-0.0), per_group_quant's FP8 byte for x in a group whose amax
is a must equal fp8conv.numerics' (IEEE division on the GPU, round to nearest even). Groups are
[a, x_1, .., x_127]; ~1.1e9 pairs per dtype, float32 subnormal scales included (bf16 values below
~1e-36). Exits 1 on any difference and prints the first few.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fp8conv import numerics as fp8
from fp8conv.kernels import act_quant

DTYPES = {"bf16": (torch.bfloat16, 0x7F80), "fp16": (torch.float16, 0x7C00)}


def groups_for(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Groups of 128 for amax = v[lo:hi]: each row [a, 127 values <= a], values of both signs."""
    amax = v[lo:hi]
    length = hi  # every x below the largest amax of the chunk
    xs = v[None, :length].expand(hi - lo, length)
    xs = torch.where(xs <= amax[:, None], xs, amax[:, None])  # fill with a itself (harmless repeats)
    zero = torch.zeros(hi - lo, 1, dtype=v.dtype, device=v.device)
    xs = torch.cat([xs, -xs, zero, -zero], dim=1)
    pad = (-xs.shape[1]) % 127
    xs = torch.cat([xs, xs[:, :pad]], dim=1).view(hi - lo, -1, 127)
    a = amax[:, None, None].expand(-1, xs.shape[1], 1)
    return torch.cat([a, xs], dim=2).reshape(-1, 128)


def check(name: str, chunk: int = 256) -> dict:
    dtype, top = DTYPES[name]
    v = torch.arange(1, top, dtype=torch.int32).to(torch.int16).view(dtype).cuda()  # ascending values
    pairs = bad = 0
    examples = []
    t0 = time.time()
    for lo in range(0, v.numel(), chunk):
        x = groups_for(v, lo, min(v.numel(), lo + chunk))
        q, s = act_quant.per_group_quant(x)
        rq, rs = fp8.quantize_per_group(x)
        if not torch.equal(s, rs):
            raise SystemExit(f"{name}: scales differ at amax chunk {lo}")
        diff = q.view(torch.uint8) != rq.view(torch.uint8)
        n = int(diff.sum())
        pairs += x.numel()
        if n:
            bad += n
            for r, c in diff.nonzero()[:3].tolist():
                examples.append({"x": x[r, c].item(), "amax": x[r, 0].item(), "scale": s[r, 0].item(),
                                 "kernel": q[r, c].float().item(), "reference": rq[r, c].float().item()})
    out = {"dtype": name, "values_checked": pairs, "mismatches": bad, "seconds": round(time.time() - t0, 1),
           "examples": examples[:10]}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16,fp16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("check_quant_exhaustive needs a CUDA GPU (the interpreter mishandles subnormals)")
    results = [check(d) for d in args.dtype.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)
    return 1 if any(r["mismatches"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
