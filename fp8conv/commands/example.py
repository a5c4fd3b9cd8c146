"""`fp8conv example DIR`: write the bundled trained OneRec-V2 example (fp16 weights, sample contexts with
labels, item catalogue) to DIR. It ships as package data in fp8conv/data/onerec_example/; see its
README.md and docs/example.md for the data set, the training and the recorded metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from fp8conv.atomic import replace_dir, temp_sibling, umask_modes
from fp8conv.errors import UserError

EXAMPLE = "onerec_example"


def example_source() -> Path:
    from importlib.resources import files

    src = Path(str(files("fp8conv.data") / EXAMPLE))
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: the bundled example is missing from this installation")
    return src


def write_example(out_dir: str | Path, force: bool = False) -> tuple[Path, list[str]]:
    """Copy the example into a temporary sibling of ``out_dir``, then rename it into place: ``out_dir``
    is either absent, its old self (on any error) or the complete example."""
    src, out = example_source(), Path(out_dir)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(out, "tmp")
    except OSError as e:
        raise UserError(f"{out}: cannot write the example ({e})") from None
    try:
        names = sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
        for name in names:
            shutil.copyfile(src / name, tmp / name)
        umask_modes(tmp)
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: cannot write the example ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, names


@click.command("example")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, envvar="FP8CONV_FORCE",
              help="Replace OUT_DIR if it exists (only once the copy is complete) [env FP8CONV_FORCE].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def example(out_dir: str, force: bool, as_json: bool) -> None:
    """Write the bundled trained OneRec-V2 example checkpoint to OUT_DIR.

    A small model (fp16) trained on a seeded synthetic user-behaviour data set, with the held-out
    users' contexts and labels (contexts.safetensors) and the item catalogue (catalogue.safetensors).
    Next: fp8conv quantize OUT_DIR OUT_DIR-fp8 && fp8conv verify OUT_DIR OUT_DIR-fp8
    """
    from fp8conv.ui import emit_json, log

    path, names = write_example(out_dir, force=force)
    nbytes = sum((path / n).stat().st_size for n in names)
    if as_json:
        emit_json({"path": str(path), "files": names, "bytes": nbytes})
    else:
        log(f"wrote {path}: {', '.join(names)} ({nbytes / 1e6:.1f} MB)")
        log(f"next: fp8conv quantize {path} {path}-fp8 && fp8conv verify {path} {path}-fp8")
