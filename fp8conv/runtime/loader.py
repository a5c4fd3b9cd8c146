"""Checkpoint I/O for the runtime: read a OneRec-V2 folder (one safetensors file or shards with
``model.safetensors.index.json``; fp16 / bf16 / fp32, or FP8 ``X.weight`` float8_e4m3fn with a float32
``X.weight_scale`` beside it) and write small checkpoints (the bundled example, test fixtures).

Everything is validated from the safetensors headers before a byte of tensor data is read: each name of
``config.tensor_specs`` present with its shape, every scale with a shape that fits its weight, nothing
unexpected. Errors are UserErrors naming the file and the tensor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8conv.atomic import replace_dir, temp_sibling, umask_modes
from fp8conv.config import OneRecConfig, load_config, tensor_specs
from fp8conv.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale"  # X.weight -> X.weight_scale (compressed-tensors)
SOURCE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
FP8_DTYPE_TAG = "F8_E4M3"
BLOCK = 128


@dataclass(frozen=True)
class StoredTensor:
    """One checkpoint tensor: ``data`` in its stored dtype, ``scale`` float32 if FP8 else None."""

    data: torch.Tensor
    scale: torch.Tensor | None = None


def tensor_files(ckpt_dir: str | Path) -> dict[str, Path]:
    """name -> the safetensors file that holds it (from the index, else the single file)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise UserError(f"{index}: not a valid index (needs a 'weight_map' object): {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: 'weight_map' must map tensor names to file names")
        files = {name: ckpt_dir / fname for name, fname in weight_map.items()}
        for name, path in files.items():
            if not path.is_file():
                raise UserError(f"{index}: tensor '{name}' is mapped to {path.name}, which does not exist")
        return files
    single = ckpt_dir / SINGLE_FILE
    if not single.is_file():
        raise UserError(f"{ckpt_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    return {name: single for name in _header(single)}


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype tag, shape) from a safetensors header (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    try:
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    except (KeyError, TypeError):
        raise UserError(f"{path}: malformed safetensors header") from None


def _expected_scale_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    n, k = shape
    return [(n, 1), (-(-n // BLOCK), -(-k // BLOCK))]


def validate_checkpoint(ckpt_dir: str | Path, cfg: OneRecConfig) -> dict[str, Path]:
    """Check names, shapes and dtypes from the headers alone; return name -> file."""
    files = tensor_files(ckpt_dir)
    headers: dict[Path, dict] = {}
    meta = {}
    for name, path in files.items():
        if path not in headers:
            headers[path] = _header(path)
        if name not in headers[path]:
            raise UserError(f"{path}: tensor '{name}' is listed in the index but not in the file")
        meta[name] = (path, *headers[path][name])
    specs = tensor_specs(cfg)
    missing = [n for n in specs if n not in meta]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UserError(f"{ckpt_dir}: missing tensor(s) {', '.join(missing[:5])}{more}")
    for name, shape in specs.items():
        path, tag, got = meta[name]
        if got != shape:
            raise UserError(f"{path}: tensor '{name}' has shape {list(got)}, expected {list(shape)} "
                            f"from config.json")
        if tag == FP8_DTYPE_TAG:
            _check_scale(name, shape, meta)
        elif tag not in SOURCE_DTYPES:
            raise UserError(f"{path}: tensor '{name}' has dtype {tag}; supported: F16, BF16, F32, "
                            f"and F8_E4M3 with a float32 weight_scale")
    known = set(specs) | {n + SCALE_SUFFIX for n in specs if meta[n][1] == FP8_DTYPE_TAG}
    unexpected = sorted(set(meta) - known)
    if unexpected:
        raise UserError(f"{meta[unexpected[0]][0]}: unexpected tensor(s) {', '.join(unexpected[:5])} "
                        f"(not part of a OneRec-V2 checkpoint for this config.json)")
    return files


def _check_scale(name: str, shape: tuple[int, ...], meta: dict) -> None:
    path = meta[name][0]
    if len(shape) != 2 or not name.endswith(".weight"):
        raise UserError(f"{path}: tensor '{name}' is float8_e4m3fn but only 2-D '.weight' tensors can be")
    sname = name + SCALE_SUFFIX
    if sname not in meta:
        raise UserError(f"{path}: tensor '{name}' is float8_e4m3fn but '{sname}' is missing")
    spath, stag, sshape = meta[sname]
    if stag != "F32":
        raise UserError(f"{spath}: tensor '{sname}' must be float32 (F32), got {stag}")
    if sshape not in _expected_scale_shapes(shape):
        n, k = shape
        raise UserError(f"{spath}: tensor '{sname}' has shape {list(sshape)}; for a {list(shape)} weight "
                        f"expected [{n}, 1] (per channel) or [{-(-n // BLOCK)}, {-(-k // BLOCK)}] "
                        f"(128x128 blocks)")


def read_checkpoint(ckpt_dir: str | Path, cfg: OneRecConfig | None = None,
                    device: str | torch.device = "cpu") -> tuple[OneRecConfig, dict[str, StoredTensor]]:
    """Validate, then read every tensor: name -> StoredTensor (weight names only; scales attached)."""
    from safetensors import safe_open

    cfg = cfg or load_config(ckpt_dir)
    files = validate_checkpoint(ckpt_dir, cfg)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    raw: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in names:
                raw[name] = f.get_tensor(name)
    out = {}
    for name in tensor_specs(cfg):
        t = raw[name]
        scale = raw.get(name + SCALE_SUFFIX) if t.dtype == torch.float8_e4m3fn else None
        out[name] = StoredTensor(t, scale)
    return cfg, out


def is_quantized(cfg: OneRecConfig, tensors: dict[str, StoredTensor]) -> bool:
    return "quantization_config" in cfg.extra or any(t.scale is not None for t in tensors.values())


# writing --------------------------------------------------------------------------------------

def write_checkpoint(out_dir: str | Path, cfg: OneRecConfig, tensors: dict[str, torch.Tensor],
                     extra_files: dict[str, dict[str, torch.Tensor] | str] | None = None,
                     config_extra: dict | None = None, force: bool = False) -> Path:
    """Write config.json + model.safetensors (+ extra safetensors / text files) atomically: into a
    temporary sibling folder renamed at the end. ``tensors`` are written as given (no dtype change)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir}: already exists (use --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out_dir, "tmp")
    try:
        cfg_dict = cfg.to_dict() | (config_extra or {})
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / SINGLE_FILE),
                  metadata={"format": "pt"})
        for fname, content in (extra_files or {}).items():
            if isinstance(content, str):
                (tmp / fname).write_text(content)
            else:
                save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, str(tmp / fname))
        umask_modes(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
