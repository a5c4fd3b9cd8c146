#!/usr/bin/env python
"""Benchmark of `fp8conv tune` (issue 5): tune a preset's (or checkpoint's) kernels on this GPU, from an
empty cache, and report wall time, the speed-up of the tuned configs over the default configs and over the
library baselines (geometric mean over the shapes), and that every shape is then found by the run-time
look-up at the `exact` level.

    python benchmarks/bench_tune.py --preset 4b --batch 32 --beam 512 --cache /tmp/tc --json-out tune_4b.json

Prints one line per shape (kernel N K M | tuned us | default us | baseline us | x default | x baseline | config)
and a summary; the JSON holds the whole `fp8conv tune --json` report plus the machine and the look-up check.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?", type=Path)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beam", type=int, default=512)
    ap.add_argument("--budget-minutes", type=float, default=10.0)
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--cache", type=Path, required=True, help="an empty folder (the run must start cold)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch

    from fp8conv.tuning import lookup, shapes, tuner

    if not torch.cuda.is_available():
        print("bench_tune needs a CUDA GPU", file=sys.stderr)
        return 2
    src = tuner.load_source(a.ckpt, a.preset)
    load = shapes.Load(batch=a.batch, beam=a.beam)
    t0 = time.monotonic()
    rep = tuner.tune(src, load, a.cache, a.budget_minutes * 60 if a.budget_minutes > 0 else None,
                     force=a.force, keep=a.candidates)
    wall = time.monotonic() - t0
    tuner.print_tune(rep)
    # the run-time look-up must now find every shape exactly
    lookup.clear()
    levels = {}
    for p in shapes.tuning_targets(shapes.derive(src.cfg, load, src.schemes)):
        levels[p.label()] = lookup.lookup(p.kernel, p.n, p.k, p.m, dirs=[a.cache]).level
    not_exact = {k: v for k, v in levels.items() if v != "exact"}
    print(f"wall {wall:.1f} s (budget {a.budget_minutes} min); look-up: {len(levels) - len(not_exact)}/"
          f"{len(levels)} exact" + (f", not exact: {not_exact}" if not_exact else ""), file=sys.stderr)
    rep["bench"] = {"wall_s": round(wall, 2), "lookup_levels": levels, "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if a.json_out:
        a.json_out.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
