"""Step 1 of ``fp8conv verify``: the candidate's tensors, checked against the reference's, one at a time.

Two modes:

- ``bit-exact`` (CAND has an fp8conv manifest, ``fp8conv.json``): re-derive every expected FP8 weight and
  scale from REF with the manifest's recipe and fp8conv.numerics, and compare bytes. Cheap, exact, and it
  names the tensor. The manifest's source hashes must match REF's files.
- ``dequantized`` (a checkpoint from another tool): the SQNR of each dequantized CAND tensor against REF.

In both modes: the tensors DESIGN keeps in the source precision (embeddings, norms, router and its
bias, context processor, output heads) must not be quantized whatever CAND's recipe says, the tensor
names must match, and CAND's ``quantization_config`` must describe its tensors.

Tensors are streamed (safetensors ``safe_open``): at most one REF tensor and its CAND pair in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fp8conv import numerics as fp8
from fp8conv.errors import UserError
from fp8conv.metrics import sqnr_db
from fp8conv.verify_qconfig import check_quantization_config

MANIFEST = "fp8conv.json"
SCALE_SUFFIX = "_scale"

# DESIGN, "FP8 numerics": kept in the source precision whatever a recipe says.
_DESIGN_KEEP = [
    (re.compile(r"(^|\.)embed"), "embedding"),
    (re.compile(r"norm[s]?(\.\d+)?\.weight$"), "norm"),
    (re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$"), "router"),
    (re.compile(r"^context\."), "context processor"),
    (re.compile(r"^lm_heads\."), "output head"),
]


def design_keep_reason(name: str) -> str | None:
    """Why DESIGN keeps ``name`` in the source precision, or None if it may be quantized."""
    for pattern, why in _DESIGN_KEEP:
        if pattern.search(name):
            return why
    return None


@dataclass(frozen=True)
class WeightFinding:
    tensor: str
    problem: str
    structural: bool = False  # a shape/name/dtype problem the runtime could not even load


@dataclass(frozen=True)
class WeightReport:
    mode: str  # "bit-exact" | "dequantized"
    checked: int
    quantized: int
    findings: tuple[WeightFinding, ...]
    sqnr_db: dict = field(default_factory=dict)  # quantized tensor -> SQNR of dequantized vs REF
    recipe: str | None = None

    @property
    def structural(self) -> bool:
        return any(f.structural for f in self.findings)


class Checkpoint:
    """A checkpoint folder's tensors by name, read lazily (one safetensors file or shards + index)."""

    def __init__(self, path: str | Path, role: str):
        self.path, self.role = Path(path), role
        if not self.path.is_dir():
            raise UserError(f"{role} {self.path}: not a folder")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{index}: not a valid safetensors index ('weight_map' must map tensor "
                                f"names to file names)")
            files = sorted(set(weight_map.values()))
        else:  # other *.safetensors (contexts, catalogue) are not model tensors
            files = ["model.safetensors"] if (self.path / "model.safetensors").is_file() else []
            weight_map = None
        if not files:
            raise UserError(f"{role} {self.path}: neither model.safetensors nor "
                            f"model.safetensors.index.json found")
        self._handles, self.file_of = {}, {}
        for fname in files:
            for name in self._open(fname).keys():
                self.file_of[name] = fname
        if weight_map is not None and set(weight_map) != set(self.file_of):
            raise UserError(f"{index}: weight_map does not match the tensors in the shards")

    def _open(self, fname: str):
        if fname not in self._handles:
            from safetensors import safe_open

            p = self.path / fname
            if not p.is_file():
                raise UserError(f"{self.role} {p}: listed in the index but missing")
            try:
                self._handles[fname] = safe_open(str(p), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise UserError(f"{self.role} {p}: not a readable safetensors file ({e})") from None
        return self._handles[fname]

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        return self._open(self.file_of[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the header only (no tensor data read)."""
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def safetensors_files(self) -> list[str]:
        return sorted(set(self.file_of.values()))


def read_manifest(cand: Path) -> dict | None:
    path = cand / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        ok = isinstance(m["recipe"]["toml"], str) and isinstance(m["source"]["files"], dict)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{path}: not a valid fp8conv manifest ({e})") from None
    if not ok:
        raise UserError(f"{path}: not a valid fp8conv manifest (recipe.toml must be a string and "
                        f"source.files an object)")
    return m


def check_weights(ref: Checkpoint, cand: Checkpoint, cand_config: dict, manifest: dict | None,
                  min_sqnr_db: float, progress=None) -> WeightReport:
    """Step 1. ``progress`` is an object with ``advance(n, info)`` (fp8conv.ui.progress) or None."""
    findings: list[WeightFinding] = []
    recipe = None
    if manifest is not None:
        from fp8conv.recipe import Recipe

        recipe = Recipe.from_toml(manifest["recipe"]["toml"], source=f"{cand.path / MANIFEST} [recipe]")
        findings += _check_source_hashes(ref, manifest["source"]["files"])
    ref_names = ref.names()
    extra = set(cand.names()) - set(ref_names) - {n + SCALE_SUFFIX for n in ref_names}
    findings += [WeightFinding(n, "in CAND but not in REF", True) for n in sorted(extra)]
    sqnrs: dict[str, float] = {}
    quantized = 0
    for name in ref_names:
        if name not in cand:
            findings.append(WeightFinding(name, "missing from CAND", True))
            continue
        w_ref, w_cand = ref.get(name), cand.get(name)
        scale = cand.get(name + SCALE_SUFFIX) if name + SCALE_SUFFIX in cand else None
        is_q = scale is not None or w_cand.dtype == fp8.FP8_DTYPE
        quantized += is_q
        why = design_keep_reason(name)
        if is_q and why is not None:
            findings.append(WeightFinding(name, f"quantized, but DESIGN keeps the {why} in the source "
                                                f"precision (whatever the recipe says)"))
        if recipe is not None:
            findings += _check_exact(name, w_ref, w_cand, scale, _scheme(recipe, name, w_ref))
        if is_q:
            s = _dequantized_sqnr(name, w_ref, w_cand, scale, findings)
            if s is not None:
                sqnrs[name] = s
                if recipe is None and s < min_sqnr_db:
                    findings.append(WeightFinding(name, f"dequantized SQNR {s:.1f} dB < {min_sqnr_db:g} dB"))
        elif recipe is None:
            findings += _check_kept(name, w_ref, w_cand, exact=False)
        if progress is not None:
            progress.advance(1, info=name)
    findings += [WeightFinding(t, p) for t, p in check_quantization_config(cand_config, cand, ref_names)]
    return WeightReport("bit-exact" if recipe is not None else "dequantized", len(ref_names), quantized,
                        tuple(_dedupe(findings)), sqnrs, None if manifest is None
                        else str(manifest["recipe"].get("name", "?")))


def _scheme(recipe, name: str, w: torch.Tensor) -> str:
    try:
        return recipe.scheme_for(name, tuple(w.shape))
    except UserError as e:  # a tensor the manifest's recipe does not claim: CAND cannot be its output
        return f"error: {e}"


def _check_exact(name, w_ref, w_cand, scale, scheme: str) -> list[WeightFinding]:
    """CAND's tensor(s) for ``name`` against what the recipe's scheme makes of REF, byte for byte."""
    if scheme.startswith("error"):
        return [WeightFinding(name, f"the manifest's recipe does not claim it ({scheme[7:]})")]
    if scheme == "keep":
        if scale is not None or w_cand.dtype == fp8.FP8_DTYPE:
            return [WeightFinding(name, "the manifest's recipe keeps it, but CAND quantized it")]
        return _check_kept(name, w_ref, w_cand, exact=True)
    if w_cand.dtype != fp8.FP8_DTYPE or scale is None:
        return [WeightFinding(name, f"the manifest's recipe quantizes it ({scheme}), but CAND has "
                                    f"{w_cand.dtype} {'with' if scale is not None else 'without'} a scale", True)]
    if w_ref.dim() != 2:
        return [WeightFinding(name, f"the recipe quantizes a {w_ref.dim()}-D tensor")]
    q, s = fp8.quantize_channel(w_ref) if scheme == "channel" else fp8.quantize_block(w_ref)
    out = []
    if tuple(scale.shape) != tuple(s.shape):
        hint = " (a transposed block grid)" if tuple(scale.shape) == tuple(s.shape)[::-1] else ""
        out.append(WeightFinding(name + SCALE_SUFFIX, f"shape {list(scale.shape)}, expected "
                                                      f"{list(s.shape)} for '{scheme}'{hint}", True))
    elif scale.dtype != torch.float32:
        out.append(WeightFinding(name + SCALE_SUFFIX, f"dtype {scale.dtype}, expected torch.float32", True))
    elif not torch.equal(scale.view(torch.int32), s.view(torch.int32)):
        bad = scale != s
        ratio = (scale[bad].double() / s[bad].double())
        out.append(WeightFinding(name + SCALE_SUFFIX, f"{int(bad.sum())} of {s.numel()} scales differ from "
                                 f"the re-derived ones (ratio {ratio.min().item():.4g}..{ratio.max().item():.4g})"))
    if tuple(w_cand.shape) != tuple(q.shape):
        out.append(WeightFinding(name, f"shape {list(w_cand.shape)}, expected {list(q.shape)}", True))
    elif not torch.equal(w_cand.view(torch.uint8), q.view(torch.uint8)):
        n_bad = int((w_cand.view(torch.uint8) != q.view(torch.uint8)).sum())
        out.append(WeightFinding(name, f"{n_bad} of {q.numel()} FP8 values differ from the re-derived ones"))
    return out


def _check_kept(name, w_ref, w_cand, exact: bool) -> list[WeightFinding]:
    if tuple(w_cand.shape) != tuple(w_ref.shape):
        return [WeightFinding(name, f"shape {list(w_cand.shape)}, expected {list(w_ref.shape)}", True)]
    if exact:
        if w_cand.dtype != w_ref.dtype:
            return [WeightFinding(name, f"kept tensor has dtype {w_cand.dtype}, REF has {w_ref.dtype}")]
        if not torch.equal(w_cand.view(torch.uint8), w_ref.view(torch.uint8)):
            return [WeightFinding(name, "kept tensor differs from REF")]
        return []
    # Another tool may keep a tensor in a wider dtype; only its values must agree.
    if not torch.equal(w_cand.float(), w_ref.float()):
        return [WeightFinding(name, f"kept tensor differs from REF (SQNR {finite_sqnr_db(w_cand, w_ref):.1f} dB)")]
    return []


def finite_sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """metrics.sqnr_db, but -inf (no signal left) when ``out`` holds inf or NaN: sqnr_db raises on an
    infinite noise power and returns NaN, which compares False with every threshold, on a NaN one."""
    if not bool(torch.isfinite(out).all()):
        return -math.inf
    return sqnr_db(out, ref)


def _dequantized_sqnr(name, w_ref, w_cand, scale, findings) -> float | None:
    if scale is None:
        findings.append(WeightFinding(name, "FP8 weight without a weight_scale", True))
        return None
    try:
        deq = fp8.dequantize(w_cand, scale)
    except (ValueError, RuntimeError) as e:
        findings.append(WeightFinding(name + SCALE_SUFFIX, f"does not fit the weight: {e}", True))
        return None
    if deq.shape != w_ref.shape:
        findings.append(WeightFinding(name, f"shape {list(deq.shape)}, expected {list(w_ref.shape)}", True))
        return None
    bad = int((~torch.isfinite(deq)).sum())
    if bad:  # an inf or NaN scale (or FP8 NaN bytes): SQNR would be NaN or not computable
        findings.append(WeightFinding(name, f"{bad} of {deq.numel()} dequantized values are not finite "
                                            f"(inf/NaN weight_scale or FP8 NaN)"))
        return None
    return sqnr_db(deq, w_ref)


def _check_source_hashes(ref: Checkpoint, files: dict) -> list[WeightFinding]:
    out = []
    for fname in ref.safetensors_files():
        if fname not in files:
            out.append(WeightFinding(fname, "REF file not among the manifest's source files: CAND was "
                                            "quantized from another checkpoint"))
    for fname, digest in sorted(files.items()):
        p = ref.path / fname
        if not p.is_file():
            out.append(WeightFinding(fname, "manifest source file missing from REF"))
        elif _sha256(p) != digest:
            out.append(WeightFinding(fname, "sha256 differs from the manifest's source hash: CAND was "
                                            "quantized from another version of REF"))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dedupe(findings: list[WeightFinding]) -> list[WeightFinding]:
    seen, out = set(), []
    for f in findings:
        if (f.tensor, f.problem) not in seen:
            seen.add((f.tensor, f.problem))
            out.append(f)
    return out


def min_sqnr(report: WeightReport) -> tuple[str, float] | None:
    if not report.sqnr_db:
        return None
    name = min(report.sqnr_db, key=report.sqnr_db.get)
    v = report.sqnr_db[name]
    return name, (v if math.isfinite(v) else math.inf)
