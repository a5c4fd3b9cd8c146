"""`fp8conv synth DIR --preset tiny|4b`: write a random-initialised OneRec-V2 checkpoint."""

from __future__ import annotations

import math
import re

import click

from fp8conv.errors import UserError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB' -> 2e9, '500MiB' -> 500 * 2**20, '123' -> 123 (decimal units as Hugging Face uses)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"--shard-size: cannot read {text!r} (examples: 2GB, 500MB, 1GiB)")
    number = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(number):  # '1e400': int(inf) would raise OverflowError (a traceback)
        raise UserError(f"--shard-size: {text!r} is too large")
    value = int(number)
    if value <= 0:
        raise UserError(f"--shard-size must be positive, got {text!r}")
    return value


@click.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["tiny", "4b"]), default="tiny", show_default=True,
              envvar="FP8CONV_SYNTH_PRESET", help="Model size [env FP8CONV_SYNTH_PRESET].")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              envvar="FP8CONV_SYNTH_DTYPE", help="Storage dtype [env FP8CONV_SYNTH_DTYPE].")
@click.option("--seed", type=int, default=0, show_default=True, envvar="FP8CONV_SYNTH_SEED",
              help="Random seed; the same seed gives the same bytes [env FP8CONV_SYNTH_SEED].")
@click.option("--shard-size", default="2GB", show_default=True, envvar="FP8CONV_SYNTH_SHARD_SIZE",
              help="Largest shard, e.g. 2GB, 500MB [env FP8CONV_SYNTH_SHARD_SIZE].")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def synth(out_dir: str, preset: str, dtype: str, seed: int, shard_size: str, force: bool, as_json: bool) -> None:
    """Write a random-initialised OneRec-V2 checkpoint to OUT_DIR (realistic init scales, sharded
    safetensors with an index when larger than --shard-size)."""
    from fp8conv.config import count_params, preset as get_preset
    from fp8conv.synth import write_synthetic_checkpoint
    from fp8conv.ui import emit_json, log

    size = parse_size(shard_size)
    cfg = get_preset(preset)
    path = write_synthetic_checkpoint(out_dir, cfg, dtype=dtype, seed=seed, shard_size=size, force=force,
                                      progress=not as_json)
    total, active = count_params(cfg)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    nbytes = sum((path / f).stat().st_size for f in files)
    summary = {"path": str(path), "preset": preset, "dtype": dtype, "seed": seed, "params_total": total,
               "params_active": active, "files": files, "bytes": nbytes}
    if as_json:
        emit_json(summary)
    else:
        log(f"wrote {path}: preset {preset}, {total / 1e9:.3f}B params ({active / 1e9:.3f}B active), "
            f"{dtype}, {len(files)} file(s), {nbytes / 1e9:.2f} GB")
