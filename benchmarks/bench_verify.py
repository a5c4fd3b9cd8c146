"""The figures of issue 3 §4, measured on the bundled example: FP8 vs FP16 beam top-1 agreement,
Recall@10 / NDCG@10 of both, per-layer SQNR, and the wall time of `fp8conv verify` on the CPU.

    python benchmarks/bench_verify.py [--workdir DIR] [--beam 32] [--repeat 3] [--json OUT] [--analyse]

Writes the example (`fp8conv example`), quantizes it (`fp8conv quantize`), then times the whole
command `fp8conv verify EXAMPLE EXAMPLE-FP8 --json` in a fresh process (imports included, as a CI job
sees it), `--repeat` times, and prints one line per run and the figures of the last.

--analyse: where the top-1 disagreements come from. The same beam comparison for (a) REF in fp16 vs
REF in fp32 activations (no FP8 at all: the floor of rounding noise), (b) FP8 with fp32 activations,
and (c) hybrids with FP8 in one layer or one kind of weight only (the rest FP16), one line each.
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
    run_or_exit("fp8conv", "example", str(ref))
    run_or_exit("fp8conv", "quantize", str(ref), str(cand))
    return ref, cand


def run_or_exit(*cmd: str) -> None:
    r = sh(*cmd)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")


def analyse(ref: Path, cand: Path, beam: int) -> list[str]:
    """One line per comparison: top-1 agreement (literal and within the tie margin), regret, Recall@10."""
    import re

    import torch

    from fp8conv.runtime.beam import beam_search, load_catalogue, recall_at_k
    from fp8conv.runtime.inputs import sample_contexts
    from fp8conv.runtime.loader import read_checkpoint
    from fp8conv.runtime.model import OneRecModel
    from fp8conv.verify_behaviour import beam_agreement, cand_scores_by_ref

    cfg, t_ref = read_checkpoint(ref)
    _, t_fp8 = read_checkpoint(cand)
    ctx = sample_contexts(ref, cfg)
    cat = load_catalogue(ref, cfg.codebook_size)

    def model(tensors, dtype):
        return OneRecModel(cfg, tensors, dtype=dtype)

    def hybrid(pick):  # FP8 tensors where pick(name), FP16 elsewhere
        return {n: (t_fp8[n] if pick(n) else t_ref[n]) for n in t_ref}

    def line(label, ref_model, cand_model):
        with torch.inference_mode():
            r = beam_search(ref_model, ctx, beam, 10, cat)
            c = beam_search(cand_model, ctx, beam, 10, cat)
            sc = cand_scores_by_ref(ref_model, ctx, r.items, r.scores.double().cpu(), c.items)
        b = beam_agreement(r.items, c.items, r.scores.double().cpu(), sc, beam, 0.1)
        return (f"{label:<44} | top-1 {100 * b.top1_agreement:6.2f}% | within tie {100 * b.top1_agreement_within_tie:6.2f}% "
                f"| regret {b.regret:.4f} | Recall@10 {recall_at_k(r.items, ctx.labels, 10):.4f} -> "
                f"{recall_at_k(c.items, ctx.labels, 10):.4f}")

    out = ["comparison (REF -> CAND, 400 held-out users) | top-1 identical | within 0.1 nat | regret nats | Recall@10"]
    fp16, fp32 = torch.float16, torch.float32
    ref16, ref32 = model(t_ref, fp16), model(t_ref, fp32)
    out.append(line("FP16 fp32-act -> FP16 fp16-act (no FP8)", ref32, ref16))
    out.append(line("FP16 fp16-act -> FP8 fp16-act (verify)", ref16, model(t_fp8, fp16)))
    out.append(line("FP16 fp32-act -> FP8 fp32-act", ref32, model(t_fp8, fp32)))
    kinds = {"attention": r"\.(self_attn|cross_attn)\.", "routed experts": r"\.experts\.",
             "dense FFN + shared expert": r"\.mlp\.(shared_experts\.)?(gate|up|down)_proj"}
    for label, pat in kinds.items():
        out.append(line(f"FP8 {label} only, fp16-act", ref16, model(hybrid(lambda n: re.search(pat, n)), fp16)))
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        out.append(line(f"FP8 layer {layer} only, fp16-act", ref16, model(hybrid(lambda n: n.startswith(prefix)), fp16)))
    return out


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
             f"{100 * beam['topk_overlap']:.2f}% | Kendall tau {beam['rank_correlation']:.3f} | regret {beam['regret']:.4f}"]
    if rec:
        def rel(a, b):
            return f"{100 * (b - a) / a:+.2f}%" if a else "n/a"
        lines.append(f"Recall@{rec['k']} {rec['recall_ref']:.4f} -> {rec['recall_cand']:.4f} "
                     f"({rel(rec['recall_ref'], rec['recall_cand'])}) | NDCG@{rec['k']} {rec['ndcg_ref']:.4f} -> "
                     f"{rec['ndcg_cand']:.4f} ({rel(rec['ndcg_ref'], rec['ndcg_cand'])})")
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
    ap.add_argument("--beam", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the last report here")
    ap.add_argument("--analyse", action="store_true", help="also run the top-1 disagreement analysis")
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
    if args.analyse:
        for line in analyse(ref, cand, args.beam):
            print(line)


if __name__ == "__main__":
    main()
