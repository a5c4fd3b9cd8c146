"""`fp8conv quantize SRC DST`: stream a checkpoint into compressed-tensors FP8 (fp8conv.quantize)."""

from __future__ import annotations

import click


@click.command("quantize")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--recipe", default=None, envvar="FP8CONV_RECIPE", metavar="NAME|FILE",
              help="Built-in recipe name or a TOML file [default: onerec_v2] [env FP8CONV_RECIPE]. "
                   "See `fp8conv recipe list`.")
@click.option("--device", default="cpu", show_default=True, envvar="FP8CONV_DEVICE",
              help="cpu or cuda; the output bytes are the same [env FP8CONV_DEVICE].")
@click.option("--threads", type=int, default=None, envvar="FP8CONV_THREADS",
              help="Quantization worker threads [default: all CPU cores] [env FP8CONV_THREADS].")
@click.option("--force", is_flag=True, help="Replace DST if it exists (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def quantize(src: str, dst: str, recipe: str | None, device: str, threads: int | None, force: bool,
             as_json: bool) -> None:
    """Convert the FP16/BF16/FP32 checkpoint folder SRC into an FP8 one at DST.

    Quantized weights become float8_e4m3fn with a float32 `weight_scale`; every other tensor and file
    is copied unchanged; config.json gains a compressed-tensors `quantization_config`; DST/fp8conv.json
    records the recipe, source hashes and per-tensor errors. Exit 2 on bad input (nothing written).
    """
    from fp8conv.quantize import quantize_checkpoint
    from fp8conv.ui import emit_json

    report = quantize_checkpoint(src, dst, recipe=recipe, device=device, force=force,
                                 progress=not as_json, threads=threads)
    if as_json:
        emit_json(report)
    else:
        print_summary(report)


def print_summary(r: dict) -> None:
    from fp8conv.ui import log

    t = r["tensors"]
    log(f"wrote {r['dst']} with recipe {r['recipe']} on {r['device']} in {r['seconds']:.1f} s "
        f"({r['gb_per_s']:.2f} GB/s)")
    log(f"  tensors: {t['channel']} channel, {t['block']} block, {t['keep']} kept")
    log(f"  bytes:   {r['bytes_in'] / 1e9:.3f} GB in, {r['bytes_out'] / 1e9:.3f} GB out "
        f"({len(r['files'])} safetensors file(s), {len(r['copied'])} other file(s) copied)")
    if r["skipped"]:
        log(f"  not converted (pickle or unlisted weight files): {', '.join(r['skipped'])}")
    if r["worst"]:
        log("  worst relative errors:")
        for w in r["worst"]:
            sq = "exact" if w["sqnr_db"] is None else f"{w['sqnr_db']:.2f} dB"
            log(f"    {w['rel_error']:.4e}  {sq:>10}  {w['scheme']:7}  {w['tensor']}")
