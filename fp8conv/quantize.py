"""``fp8conv quantize SRC DST``: stream an FP16/BF16/FP32 checkpoint into compressed-tensors FP8.

Order of work: check DST, plan and validate everything from SRC's headers (quantize_plan), then write
into a temporary sibling of DST and rename it at the end. Per shard, three stages overlap:

    reader thread  --(source bytes)-->  main thread + worker pool  --(output bytes)-->  writer thread
    os.preadv, sha256 of the file       quantize_math, row chunks                       header first

Queues between the stages are bounded in bytes, so a few tensors are in memory at a time whatever the
model size. Safety (docs/output-format.md): nothing ever appears at DST but a complete output; on an
error, Ctrl-C or SIGTERM the temporary is removed; after SIGKILL it may remain as ``.DST.tmp-*``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

from fp8conv import __version__
from fp8conv.atomic import replace_dir, temp_sibling, umask_modes
from fp8conv.checkpoint import INDEX_NAME
from fp8conv.compressed_tensors import build_quantization_config, module_name
from fp8conv.errors import UserError
from fp8conv.quantize_plan import Plan, make_plan
from fp8conv.quantize_stream import convert_file, interrupt_on_sigterm
from fp8conv.recipe import Recipe, is_quantizable, load_recipe

MANIFEST = "fp8conv.json"


def quantize_checkpoint(src, dst, recipe: Recipe | str | None = None, device: str = "cpu",
                        force: bool = False, progress: bool = True, threads: int | None = None) -> dict:
    """Convert SRC into DST; returns the report (what ``--json`` prints). UserError on bad input."""
    src, dst = Path(src), Path(dst)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) or 1  # the cores we may use (taskset, cgroups)
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    device = _check_device(device)
    _check_destination(src, dst, force)
    plan = make_plan(src, recipe)
    _check_space(plan, dst)
    t0 = time.monotonic()
    tmp = _make_temp(dst)
    try:
        with interrupt_on_sigterm():
            stats = _write_all(plan, tmp, device, threads, progress)
            umask_modes(tmp)
            replace_dir(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{dst.parent}: no space left on device while writing the output "
                            f"(it needs about {plan.bytes_out / 1e9:.3g} GB); nothing was written to "
                            f"{dst}") from None
        # a shard removed or unreadable mid-run, an I/O error: name the file, no traceback
        raise UserError(f"{e.filename or dst}: {e.strerror or e} while writing {dst}; nothing was "
                        f"written there") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _report(plan, dst, stats, device, threads, time.monotonic() - t0)


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available")
    return device


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise UserError(f"{dst}: DST is SRC; fp8conv never writes into its input")
    if d.is_relative_to(s):
        raise UserError(f"{dst}: DST is inside SRC {src}; choose a folder outside the input")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise UserError(f"{dst}: already exists (use --force to replace it)")
        if not dst.is_dir() or dst.is_symlink():
            raise UserError(f"{dst}: exists and is not a folder; --force only replaces folders")
        if s.is_relative_to(d):
            raise UserError(f"{dst}: SRC {src} is inside it; --force would delete the input")


def _check_space(plan: Plan, dst: Path) -> None:
    parent = _existing_parent(dst)
    free = shutil.disk_usage(parent).free
    need = plan.bytes_out + sum((plan.src / f).stat().st_size for f in plan.copies)
    if free < need:
        # 3 significant digits: a small output on a nearly full disk read "0.00 GB free, needs 0.00 GB"
        raise UserError(f"{parent}: {free / 1e9:.3g} GB free, the output needs {need / 1e9:.3g} GB")


def _existing_parent(p: Path) -> Path:
    p = p.absolute().parent
    while not p.exists():
        p = p.parent
    return p


def _make_temp(dst: Path) -> Path:
    try:
        dst.absolute().parent.mkdir(parents=True, exist_ok=True)
        return temp_sibling(dst, "tmp")
    except PermissionError:
        raise UserError(f"{dst.absolute().parent}: not writable (cannot create the output there)") from None
    except OSError as e:  # a path component is a file, a read-only file system, ...
        raise UserError(f"{dst.absolute().parent}: cannot create the output there ({e.strerror})") from None


def _write_all(plan: Plan, tmp: Path, device: str, threads: int, progress: bool) -> dict:
    from fp8conv.ui import progress as bar

    hashes, stats = {}, {}
    with bar("quantize", plan.bytes_in, "B", quiet=not progress) as p:
        for f in plan.files:
            hashes[f.name] = convert_file(f, tmp / f.name, device, threads, stats, p)
    for rel in plan.copies:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(plan.src / rel, tmp / rel)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(f"{plan.src / rel}: cannot copy it ({e.strerror})") from None
    schemes = {module_name(t.name): t.scheme for t in plan.tensors if is_quantizable(t.name, t.shape)}
    config = dict(plan.config)
    qc = build_quantization_config(schemes)
    if qc is not None:
        config["quantization_config"] = qc
    _write_json(tmp / "config.json", config, copied=True)
    if plan.sharded:
        _write_json(tmp / INDEX_NAME, _index(plan, tmp), copied=True)
    _write_json(tmp / MANIFEST, manifest(plan, hashes, stats))
    return stats


def _index(plan: Plan, tmp: Path) -> dict:
    weight_map = {e.name: f.name for f in plan.files for e in f.out_entries()}
    total = sum(e.nbytes for f in plan.files for e in f.out_entries())
    return {"metadata": {**plan.index_metadata, "total_size": total},
            "weight_map": dict(sorted(weight_map.items()))}


def manifest(plan: Plan, hashes: dict, stats: dict) -> dict:
    """DST/fp8conv.json: everything `fp8conv verify` needs to re-derive the FP8 weights from SRC."""
    tensors = {}
    for t in plan.tensors:
        entry = {"scheme": t.scheme, "shape": list(t.shape), "dtype": t.dtype}
        entry.update(stats.get(t.name, {"amax": None, "rel_error": None, "sqnr_db": None}))
        tensors[t.name] = entry
    return {
        "tool": "fp8conv",
        "version": __version__,
        "format": {"weight_dtype": "float8_e4m3fn", "scale_dtype": "float32", "block": [128, 128],
                   "scale": "amax / 448; 1 for an all-zero row or block",
                   "cast": "clamp to [-448, 448], round to nearest even"},
        "recipe": {"name": plan.recipe.name, "toml": plan.recipe.text or plan.recipe.to_toml()},
        "source": {"files": dict(sorted(hashes.items()))},
        "tensors": tensors,
    }


def _write_json(path: Path, obj, copied: bool = False) -> None:
    # allow_nan=False: a NaN statistic would be invalid JSON; NaN weights are refused earlier. ``copied``
    # (config.json, the index): SRC's own values, which Python's json reads and writes as NaN/Infinity
    path.write_text(json.dumps(obj, indent=2, allow_nan=copied) + "\n")


def _report(plan: Plan, dst: Path, stats: dict, device: str, threads: int, seconds: float) -> dict:
    per_scheme: dict[str, int] = {"channel": 0, "block": 0, "keep": 0}
    for t in plan.tensors:
        per_scheme[t.scheme] += 1
    bytes_out = sum((dst / f.name).stat().st_size for f in plan.files)
    worst = sorted(((s["rel_error"], n) for n, s in stats.items()), reverse=True)[:5]
    return {
        "src": str(plan.src), "dst": str(dst), "recipe": plan.recipe.name, "device": device,
        "threads": threads, "tensors": per_scheme, "files": [f.name for f in plan.files],
        "copied": list(plan.copies), "skipped": list(plan.skipped),
        "bytes_in": plan.bytes_in, "bytes_out": bytes_out, "seconds": round(seconds, 3),
        "gb_per_s": round(plan.bytes_in / 1e9 / max(seconds, 1e-9), 3),
        "worst": [{"tensor": n, "scheme": next(t.scheme for t in plan.tensors if t.name == n),
                   "rel_error": e, "sqnr_db": stats[n]["sqnr_db"]} for e, n in worst],
    }
