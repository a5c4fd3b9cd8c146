"""The figures of issue 3 §4, measured on the bundled example: FP8 vs FP16 beam top-1 agreement,
Recall@10 / NDCG@10 of both, per-layer SQNR, and the wall time of `fp8conv verify` on the CPU.

    python benchmarks/bench_verify.py [--workdir DIR] [--beam 64] [--repeat 3] [--json OUT]

Writes the example (`fp8conv example`), quantizes it (`fp8conv quantize`), then times the whole
command `fp8conv verify EXAMPLE EXAMPLE-FP8 --json` in a fresh process (imports included, as a CI job
sees it), `--repeat` times, and prints one line per run and the figures of the last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


def prepare(work: Path) -> tuple[Path, Path]:
    ref, cand = work / "onerec-fp16", work / "onerec-fp8"
    for p in (ref, cand):
        shutil.rmtree(p, ignore_errors=True)
    for cmd in (("fp8conv", "example", str(ref)), ("fp8conv", "quantize", str(ref), str(cand))):
        r = sh(*cmd)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return ref, cand


def timed_verify(ref: Path, cand: Path, beam: int) -> tuple[float, int, dict]:
    t0 = time.perf_counter()
    r = sh("fp8conv", "verify", str(ref), str(cand), "--beam", str(beam), "--json")
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        sys.exit(f"fp8conv verify failed ({r.returncode}):\n{r.stderr}")
    return wall, r.returncode, json.loads(r.stdout)


def figures(rep: dict) -> list[str]:
    b = rep["behaviour"]
    beam, rec = b["beam"], b["rec"]
    lines = [f"users {beam['users']} | beam {beam['beam_width']} | top-1 agreement {100 * beam['top1_agreement']:.2f}% "
             f"(within tie {100 * beam['top1_agreement_within_tie']:.2f}%) | top-{beam['top_n']} overlap "
             f"{100 * beam['topk_overlap']:.2f}% | Kendall tau {beam['rank_correlation']} | regret {beam['regret']:.4f}"]
    if rec:
        lines.append(f"Recall@{rec['k']} {rec['recall_ref']:.4f} -> {rec['recall_cand']:.4f} "
                     f"({-100 * rec['recall_drop']:+.2f}%) | NDCG@{rec['k']} {rec['ndcg_ref']:.4f} -> "
                     f"{rec['ndcg_cand']:.4f} ({-100 * rec['ndcg_drop']:+.2f}%)")
    for s in b["layers"]:
        lines.append(f"  {s['name']:<28} SQNR {s['sqnr_db'] if isinstance(s['sqnr_db'], str) else round(s['sqnr_db'], 2)} dB"
                     f" | rel error {s['rel_error']:.4f}")
    for h in b["heads"]:
        lines.append(f"  head {h['head']} | cosine {h['cosine']:.6f} | KL {h['kl']:.3g} | argmax {100 * h['top1_agreement']:.1f}%")
    w = rep["weights"]
    lines.append(f"weights {w['mode']} | {w['checked']} tensors, {w['quantized']} quantized, "
                 f"{len(w['findings'])} findings | passed {rep['passed']} | culprits {rep['culprits']}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--beam", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the last report here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_verify."))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.processor() or platform.machine()} "
          f"| {os.cpu_count()} CPUs | torch {torch.__version__} | python {platform.python_version()}")
    ref, cand = prepare(work)
    print(f"# example {ref} ({sum(f.stat().st_size for f in ref.iterdir()) / 1e6:.1f} MB), FP8 {cand}")
    print("run | wall s | exit | stages (s)")
    for i in range(args.repeat):
        wall, rc, rep = timed_verify(ref, cand, args.beam)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in rep["seconds"].items())
        print(f"{i} | {wall:.2f} | {rc} | {stages}")
    for line in figures(rep):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
