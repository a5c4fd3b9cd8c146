"""`fp8conv verify REF CAND`: FP8 (CAND) against its source (REF) on the reference runtime.

Exit 0 pass, 1 regression (the failing checks and the layers that contribute most are named),
2 bad input. docs/verification.md describes every check and threshold.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("verify")
@click.argument("ref", type=click.Path(path_type=Path))
@click.argument("cand", type=click.Path(path_type=Path))
@click.option("--contexts", type=click.Path(path_type=Path), default=None, envvar="FP8CONV_VERIFY_CONTEXTS",
              help="Contexts file (safetensors: tokens, pathways, lengths[, labels]). Default: REF's "
                   "contexts.safetensors, else synthetic contexts [env FP8CONV_VERIFY_CONTEXTS].")
@click.option("--synthetic", type=int, default=None, metavar="N", envvar="FP8CONV_VERIFY_SYNTHETIC",
              help="Use N synthetic users drawn from the config instead of shipped contexts "
                   "[env FP8CONV_VERIFY_SYNTHETIC].")
@click.option("--beam", type=int, default=32, show_default=True, envvar="FP8CONV_VERIFY_BEAM",
              help="Beam width (32: the width the example's Recall is documented at) [env FP8CONV_VERIFY_BEAM].")
@click.option("--top-n", type=int, default=10, show_default=True, envvar="FP8CONV_VERIFY_TOP_N",
              help="Items per user compared, and K of Recall@K / NDCG@K [env FP8CONV_VERIFY_TOP_N].")
@click.option("--thresholds", type=click.Path(path_type=Path), default=None, envvar="FP8CONV_VERIFY_THRESHOLDS",
              help="TOML file overriding the default thresholds [env FP8CONV_VERIFY_THRESHOLDS].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              envvar="FP8CONV_DEVICE", help="Where both models run [env FP8CONV_DEVICE].")
@click.option("--backend", type=click.Choice(["reference", "triton"]), default="reference", show_default=True,
              envvar="FP8CONV_BACKEND", help="Operator backend; triton needs --device cuda [env FP8CONV_BACKEND].")
@click.option("--seed", type=int, default=0, show_default=True, envvar="FP8CONV_VERIFY_SEED",
              help="Seed of the synthetic contexts [env FP8CONV_VERIFY_SEED].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def verify(ref: Path, cand: Path, contexts: Path | None, synthetic: int | None, beam: int, top_n: int,
           thresholds: Path | None, device: str, backend: str, seed: int, as_json: bool) -> int:
    """Check CAND (e.g. the FP8 output of `fp8conv quantize`) against REF, its source checkpoint:
    weights bit for bit when CAND carries an fp8conv manifest, then behaviour on the same contexts
    (per-layer error, head logits, beam agreement, Recall/NDCG when labelled)."""
    from fp8conv import ui
    from fp8conv.thresholds import load_thresholds
    from fp8conv.verify import VerifyOptions, run_verify
    from fp8conv.verify_report import render_plain, render_rich, verdict

    opts = VerifyOptions(ref=ref, cand=cand, contexts=contexts, synthetic=synthetic, beam=beam, top_n=top_n,
                         thresholds=load_thresholds(thresholds), device=device, backend=backend, seed=seed,
                         progress=not as_json)
    report = run_verify(opts)
    if as_json:
        ui.emit_json(report.to_dict())
        ui.log(verdict(report))  # stderr: the CI log still says why the step failed
    elif ui.is_tty():
        render_rich(report, ui.console())
    else:
        render_plain(report, ui.log)
    return report.exit_code
