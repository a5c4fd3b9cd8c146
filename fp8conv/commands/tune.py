"""`fp8conv tune CKPT|--preset P [--batch 32] [--beam 512] [--context 3000] [--budget-minutes N]
[--cache DIR] [--json] [--show]`: autotune a checkpoint's Triton kernels on this GPU (issue 5)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("tune")
@click.argument("ckpt", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "4b"]), default=None,
              help="Derive the shapes from a preset config instead of CKPT (built-in recipe's schemes).")
@click.option("--batch", type=int, default=32, show_default=True, envvar="FP8CONV_TUNE_BATCH",
              help="Users per batch [env FP8CONV_TUNE_BATCH].")
@click.option("--beam", type=int, default=512, show_default=True, envvar="FP8CONV_TUNE_BEAM",
              help="Beam width [env FP8CONV_TUNE_BEAM].")
@click.option("--context", type=int, default=3000, show_default=True, envvar="FP8CONV_TUNE_CONTEXT",
              help="Context tokens per user (only a quantized context projection uses it) "
                   "[env FP8CONV_TUNE_CONTEXT].")
@click.option("--budget-minutes", type=float, default=10.0, show_default=True,
              envvar="FP8CONV_TUNE_BUDGET_MINUTES",
              help="Wall-clock budget, shared over the shapes; 0 = none [env FP8CONV_TUNE_BUDGET_MINUTES].")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write (and, with --show, to search first); default $FP8CONV_TUNING_CACHE, "
                   "else ~/.cache/fp8conv/tuning_cache [env FP8CONV_TUNING_CACHE].")
@click.option("--force", is_flag=True, help="Retune shapes already in the cache for this GPU/Triton/torch.")
@click.option("--candidates", "keep", type=int, default=24, show_default=True,
              help="At most this many candidate configs per shape (after the cost model).")
@click.option("--show", is_flag=True, help="List what the caches hold and, with CKPT/--preset, what each "
                                            "shape would use and at which fallback level. Needs no GPU.")
@click.option("--device", default=None, help="With --show: the GPU name to look up for (default: this "
                                             "GPU, else every device in the caches).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def tune(ckpt: Path | None, preset: str | None, batch: int, beam: int, context: int, budget_minutes: float,
         cache_dir: Path | None, force: bool, keep: int, show: bool, device: str | None, as_json: bool) -> None:
    """Tune the FP8 GEMM, grouped expert GEMM and beam-search top-k configs for every shape CKPT serves
    at this load, on this GPU, and write the winners (with their provenance) to the tuning cache. Each
    shape is written when done, so an interrupted run resumes. Exits 2 without a CUDA GPU (unless --show)."""
    import os

    from fp8conv.errors import UserError
    from fp8conv.tuning import cache, shapes, tuner
    from fp8conv.ui import emit_json

    load = shapes.Load(batch=batch, beam=beam, context=context)
    src = tuner.load_source(ckpt, preset)
    if show:
        rep = tuner.show(src, load, [cache_dir] if cache_dir else [], device)
        emit_json(rep) if as_json else tuner.print_show(rep)
        return
    if src is None:
        raise UserError("give a checkpoint folder (CKPT) or --preset to tune")
    if keep < 1:
        raise UserError(f"--candidates must be >= 1, got {keep}")
    env = os.environ.get(cache.ENV_VAR)
    out_dir = cache_dir or (Path(env.split(os.pathsep)[0]) if env else cache.user_dir())
    rep = tuner.tune(src, load, out_dir, budget_minutes * 60 if budget_minutes > 0 else None, force=force,
                     keep=keep, quiet=as_json)
    emit_json(rep) if as_json else tuner.print_tune(rep)
    if rep["summary"]["failed"]:
        from fp8conv.errors import Fp8convError

        raise Fp8convError(f"{rep['summary']['failed']} shape(s) had no candidate whose output matched "
                           f"the reference (see the report); their default configs are suspect")
