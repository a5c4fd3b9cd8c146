"""`fp8conv inspect CKPT`: per-tensor weight statistics (variance, AbsMax, AbsP99), their means over
tensors (the paper's Figure 1), FP8 risk flags; `--activations` adds Linear input statistics."""

from __future__ import annotations

import math

import click


@click.command("inspect")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--activations", is_flag=True,
              help="Also record the input of every Linear over sample inputs (OneRec-V2 checkpoints).")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, envvar="FP8CONV_INSPECT_TOP",
              help="Rows of the table: the riskiest tensors first [env FP8CONV_INSPECT_TOP].")
@click.option("--recipe", default=None, envvar="FP8CONV_RECIPE",
              help="Recipe (built-in name or TOML file) deciding the schemes of an unquantized checkpoint; "
                   "default: the built-in named like config.json's model_type [env FP8CONV_RECIPE].")
@click.option("--device", default="cpu", show_default=True, envvar="FP8CONV_DEVICE",
              help="Device for --activations [env FP8CONV_DEVICE].")
def inspect_cmd(ckpt: str, as_json: bool, activations: bool, top: int, recipe: str | None, device: str) -> None:
    """Weight statistics of CKPT (FP16/BF16/FP32 or FP8; FP8 weights are dequantized with their
    weight_scale first) and the tensors whose range is risky for their FP8 scheme."""
    from fp8conv import inspect_stats as ins
    from fp8conv.ui import emit_json, progress

    rec = ins.recipe_for(ckpt, recipe)
    stats = []
    with progress("inspect", ins.tensor_count(ckpt), "tensors", quiet=as_json) as p:
        for s in ins.iter_checkpoint_stats(ckpt, rec):
            stats.append(s)
            p.advance(1, info=s.name)
    summary = ins.summarize(stats)
    acts = None
    if activations:
        from fp8conv import inspect_activations as ia

        acts = ia.activation_stats(ckpt, device=device)
    if as_json:
        emit_json(_report(ckpt, stats, summary, acts, rec))
        return
    _print(stats, summary, acts, top, rec)


def _report(ckpt, stats, summary, acts, rec) -> dict:
    from dataclasses import asdict

    from fp8conv.inspect_stats import GROUP_SMALL_LIMIT, ZERO_FRAC_LIMIT

    out = {"checkpoint": str(ckpt), "recipe": rec.name if rec is not None else None,
           "summary": asdict(summary),
           "thresholds": {"zero_frac": ZERO_FRAC_LIMIT, "worst_group_small": GROUP_SMALL_LIMIT},
           "tensors": [s.to_json() for s in stats]}
    if acts is not None:
        from fp8conv.inspect_activations import mean_over

        out["activations"] = {"summary": mean_over(acts), "linears": [a.to_json() for a in acts]}
    return _finite_json(out)


def _finite_json(obj):
    """NaN / inf (an all-zero weight has SQNR inf) as strings: strict JSON parsers reject the bare
    NaN / Infinity tokens Python's json writes."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def _fmt(x, spec=".3g", pct=False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.2%}" if pct else format(x, spec)


def _print(stats, summary, acts, top, rec) -> None:
    from rich.table import Table

    from fp8conv.inspect_stats import risk_order
    from fp8conv.ui import console

    con = console()
    if not con.is_terminal:  # CI logs: 80 columns would fold every tensor name
        con.width = 180
    rows = sorted(stats, key=risk_order)[:top]
    t = Table(title=f"{len(rows)} of {len(stats)} tensors, riskiest first")
    t.add_column("tensor", no_wrap=True)
    for col in ("scheme", "dtype", "shape", "variance", "AbsMax", "AbsP99", "FP8 zero",
                "worst group sub.", "SQNR dB", "risk"):
        t.add_column(col, overflow="fold")
    for s in rows:
        t.add_row(s.name, s.scheme, s.dtype, "x".join(map(str, s.shape)), _fmt(s.variance), _fmt(s.absmax),
                  _fmt(s.absp99), _fmt(s.zero_frac, pct=True), _fmt(s.worst_group_small, pct=True),
                  _fmt(s.sqnr_db, ".1f"), "; ".join(s.risks) or "ok")
    con.print(t)
    con.print("schemes of unquantized tensors: " + (f"recipe {rec.name!r}" if rec is not None else
                                                     "DESIGN's name-based default (no recipe fits)"))
    con.print(f"all {summary.tensors} tensors: mean variance {summary.mean_variance:.4g}, mean AbsMax "
              f"{summary.mean_absmax:.4g}, mean AbsP99 {summary.mean_absp99:.4g}")
    con.print(f"{summary.quantized_tensors} FP8 (or to-be-FP8) weights: mean variance "
              f"{summary.quantized_mean_variance:.4g}, mean AbsMax {summary.quantized_mean_absmax:.4g}, "
              f"mean AbsP99 {summary.quantized_mean_absp99:.4g}")
    con.print(f"risky tensors: {summary.risky}" + ("" if summary.risky else " (none)"))
    if acts is not None:
        _print_acts(con, acts, top)


def _print_acts(con, acts, top) -> None:
    from rich.table import Table

    from fp8conv.inspect_activations import mean_over

    rows = sorted(acts, key=lambda a: -a.absmax)[:top]
    t = Table(title=f"Linear inputs: {len(rows)} of {len(acts)}, largest AbsMax first")
    t.add_column("linear", no_wrap=True)
    for col in ("scheme", "tokens", "variance", "AbsMax", "AbsP99", "token amax/median"):
        t.add_column(col, overflow="fold")
    for a in rows:
        t.add_row(a.name, a.scheme, str(a.tokens), _fmt(a.variance), _fmt(a.absmax),
                  _fmt(a.absp99) + ("" if a.absp99_exact else " (sampled)"), _fmt(a.worst_token_range))
    con.print(t)
    m = mean_over(acts)
    con.print(f"inputs of {m['linears']} FP8 Linears: mean variance {m['mean_variance']:.4g}, mean AbsMax "
              f"{m['mean_absmax']:.4g}, mean AbsP99 {m['mean_absp99']:.4g}")
