"""Validate a source checkpoint from its headers alone and plan the FP8 output (``fp8conv quantize``).

Everything that can be wrong with the input is found here, before the first output byte is written:
unreadable or truncated shards, headers whose offsets lie, index and shards that disagree, unsupported
dtypes, a checkpoint that is already quantized, empty tensors, pickle-only checkpoints (refused, never
unpickled) and tensors the recipe does not claim (all listed at once).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fp8conv.checkpoint import (FLOAT_DTYPES, FP8_DTYPES, INDEX_NAME, Header, OutEntry, check_index,
                                read_header, read_index)
from fp8conv.errors import UserError
from fp8conv.numerics import BLOCK
from fp8conv.recipe import Recipe, builtin_names

SCALE_SUFFIX = "_scale"  # X.weight -> X.weight_scale (compressed-tensors naming)
# Tensors that only a quantized checkpoint has (compressed-tensors, DeepSeek-V3 FP8, KV-cache scales);
# other names ending in "_scale" (CLIP-style logit_scale, layer_scale) are ordinary parameters.
_QUANT_SCALE = re.compile(r"(^|\.)(weight_scale(_inv)?|input_scale|[kv]_scale)$")
# Pickle-based weight formats: never opened (unpickling runs arbitrary code), never copied.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: str
    shape: tuple[int, ...]
    scheme: str  # "channel" | "block" | "keep"
    src_file: str

    def out_entries(self) -> list[OutEntry]:
        if self.scheme == "keep":
            return [OutEntry(self.name, self.dtype, self.shape)]
        return [OutEntry(self.name, "F8_E4M3", self.shape),
                OutEntry(self.name + SCALE_SUFFIX, "F32", scale_shape(self.scheme, self.shape))]


@dataclass(frozen=True)
class FilePlan:
    name: str  # same file name in SRC and DST: the source's sharding layout is kept
    header: Header
    tensors: tuple[TensorPlan, ...]  # in the source's data order

    def out_entries(self) -> list[OutEntry]:
        return [e for t in self.tensors for e in t.out_entries()]

    @property
    def bytes_out(self) -> int:
        return _header_estimate(self) + sum(e.nbytes for e in self.out_entries())


@dataclass(frozen=True)
class Plan:
    src: Path
    recipe: Recipe
    files: tuple[FilePlan, ...]
    sharded: bool  # True when SRC has an index (then DST gets a rewritten one)
    index_metadata: dict
    config: dict  # SRC's config.json
    copies: tuple[str, ...]  # other files, relative paths, copied byte for byte
    skipped: tuple[str, ...]  # pickle weight files left out of DST

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for f in self.files for t in f.tensors]

    @property
    def bytes_in(self) -> int:
        return sum(f.header.file_size for f in self.files)

    @property
    def bytes_out(self) -> int:
        return sum(f.bytes_out for f in self.files)


def scale_shape(scheme: str, shape: tuple[int, ...]) -> tuple[int, int]:
    n, k = shape
    return (n, 1) if scheme == "channel" else (-(-n // BLOCK), -(-k // BLOCK))


def _header_estimate(f: FilePlan) -> int:
    return 8 + sum(80 + len(e.name) for e in f.out_entries())


def make_plan(src: Path, recipe: Recipe) -> Plan:
    if not src.is_dir():
        raise UserError(f"{src}: not a folder (SRC is a Hugging Face style checkpoint folder)")
    config = _read_config(src)
    files, weight_map = _shard_files(src)
    headers = {f: read_header(src / f) for f in files}
    if weight_map is not None:
        check_index(src / INDEX_NAME, weight_map, headers)
    _check_unique(headers)
    if not any(h.tensors for h in headers.values()):
        where = src / (INDEX_NAME if weight_map is not None else files[0])
        raise UserError(f"{where}: the checkpoint holds no tensors; nothing to quantize")
    shapes = {t.name: t.shape for h in headers.values() for t in h.tensors}
    _check_not_quantized(src, config, headers)
    unclaimed = recipe.unclaimed(shapes)
    if unclaimed:
        raise UserError(f"recipe {recipe.name!r} ({recipe.source}) has no rule for {len(unclaimed)} "
                        f"weight(s) of {src}:\n  " + "\n  ".join(unclaimed)
                        + "\nadd rules for them, set default = \"keep\" in the recipe, or pick another recipe "
                        f"(built-in: {', '.join(builtin_names())}; see `fp8conv recipe show NAME`)")
    plans = []
    for fname, h in headers.items():
        tensors = []
        for t in h.tensors:
            scheme = recipe.scheme_for(t.name, t.shape)
            if scheme != "keep":
                _check_quantizable(h, t, scheme)
            tensors.append(TensorPlan(t.name, t.dtype, t.shape, scheme, fname))
        plans.append(FilePlan(fname, h, tuple(tensors)))
    copies, skipped = _other_files(src, set(files))
    index_meta = {}
    if weight_map is not None:
        index_meta = json.loads((src / INDEX_NAME).read_text()).get("metadata") or {}
        if not isinstance(index_meta, dict):  # DST's index spreads it into its own metadata
            raise UserError(f"{src / INDEX_NAME}: 'metadata' must be a JSON object, got "
                            f"{type(index_meta).__name__}")
    return Plan(src, recipe, tuple(plans), weight_map is not None, index_meta, config, copies, skipped)


def _read_config(src: Path) -> dict:
    from fp8conv.config import read_config_dict

    return read_config_dict(src, "the output's quantization_config goes into config.json")


def _shard_files(src: Path) -> tuple[list[str], dict[str, str] | None]:
    index = src / INDEX_NAME
    if index.is_file():
        weight_map = read_index(index)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise UserError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
        return files, weight_map
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"{src}: only pickle weights ({', '.join(pickles)}); fp8conv never unpickles "
                            f"(it can run arbitrary code). Convert them to safetensors first")
        raise UserError(f"{src}: no *.safetensors files and no {INDEX_NAME}")
    if "model.safetensors" in files:
        # Hugging Face's single-file name: the model's weights. Other safetensors files beside it (sample
        # contexts, an item catalogue) are data, copied byte for byte like any non-weight file.
        return ["model.safetensors"], None
    if len(files) > 1:
        raise UserError(f"{src}: {len(files)} safetensors files but no {INDEX_NAME} saying which holds what "
                        f"(and none is named model.safetensors)")
    return files, None


def _check_unique(headers: dict[str, Header]) -> None:
    seen: dict[str, str] = {}
    for fname, h in headers.items():
        for name in h.names():
            if name in seen:
                raise UserError(f"tensor {name!r} is in both {seen[name]} and {fname}")
            seen[name] = fname


def _check_not_quantized(src: Path, config: dict, headers: dict[str, Header]) -> None:
    for key in ("quantization_config", "compression_config"):
        if key in config:
            raise UserError(f"{src / 'config.json'}: has a {key}: the checkpoint is already quantized")
    for h in headers.values():
        for t in h.tensors:
            if t.dtype in FP8_DTYPES:
                raise UserError(f"{h.path}: tensor {t.name!r} is already {t.dtype}: the checkpoint is "
                                f"already quantized")
            if _QUANT_SCALE.search(t.name):
                raise UserError(f"{h.path}: tensor {t.name!r} is a quantization scale: the checkpoint is "
                                f"already quantized")


def _check_quantizable(h: Header, t, scheme: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UserError(f"{h.path}: tensor {t.name!r} has dtype {t.dtype}; the recipe says {scheme!r} but "
                        f"only {', '.join(FLOAT_DTYPES)} weights can be quantized")
    if math.prod(t.shape) == 0:
        raise UserError(f"{h.path}: tensor {t.name!r} is empty (shape {list(t.shape)}); nothing to quantize")


def _holds_weights(path: Path) -> bool:
    """A safetensors file outside the shard set is copied unless it looks like model weights (a tensor
    named like a parameter); an unreadable header counts as weights, so it is skipped, not copied."""
    try:
        names = read_header(path).names()
    except UserError:
        return True
    return any(n.endswith((".weight", ".bias", "_scale")) for n in names)


def _other_files(src: Path, shards: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every regular file except the shards, the index and config.json (rewritten). Skipped: pickle weight
    files (``pytorch_model*.bin``, ``*.pt`` ...) and safetensors files the index does not name; they
    would be unquantized weights again."""
    copies, skipped = [], []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if not p.is_file() or rel in shards or rel in (INDEX_NAME, "config.json"):
            continue
        if rel.startswith(".git/"):  # a git clone's history and LFS store: the source weights again
            if ".git/" not in skipped:
                skipped.append(".git/")
            continue
        if p.suffix == ".safetensors" and not _holds_weights(p):
            copies.append(rel)  # data beside the model (sample contexts, an item catalogue)
        elif p.suffix in (".pt", ".pth", ".ckpt", ".safetensors") or (p.suffix == ".bin" and "model" in p.name):
            skipped.append(rel)  # weights the index does not name (or pickles): not part of the output
        else:
            copies.append(rel)
    return tuple(copies), tuple(skipped)
