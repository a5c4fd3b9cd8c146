"""Weight statistics of a checkpoint (``fp8conv inspect``): the paper's Figure 1 numbers and FP8 risk.

Per tensor: variance, AbsMax and AbsP99 of the weight values, and for tensors that are (or would be)
quantized, what FP8 E4M3 does to them under their scheme:

- ``zero_frac``: fraction of the nonzero weights that quantize to exactly 0 (|w / scale| <= 2^-10,
  half the smallest subnormal). For an FP8 checkpoint the source is gone, so it is the fraction of
  FP8 codes that are 0.
- ``subnormal_frac``: fraction whose quantized magnitude is below 2^-6, E4M3's smallest normal, where
  relative precision degrades (2^-9 steps).
- ``worst_group_small``: over the quantization groups (rows for ``channel``, 128x128 blocks for
  ``block``), the largest fraction of a group stored as FP8 zero or subnormal. Above one half the
  group's median |w| is below amax / 28672 (448 * 2^6): one scale cannot serve its range.
- ``sqnr_db`` of the dequantized weight (source checkpoints only).

The FP8 figures are read from the bit patterns of the quantized codes (computed with
fp8conv.numerics, the contract, for source checkpoints). Statistics are exact: variance in float64, AbsP99 the nearest-rank 99th percentile of |w| computed
with topk / kthvalue over the whole tensor (no sampling). FP8 tensors are dequantized with their
``weight_scale`` (``q.float() * scale``) first, so their statistics describe the weights the model
multiplies by. One tensor is in memory at a time.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from fp8conv import numerics as fp8
from fp8conv.errors import UserError
from fp8conv.metrics import sqnr_db

# Flag a tensor when more than 1% of its nonzero weights become FP8 zeros, or when one quantization
# group is mostly zero/subnormal: then that group's median |w| is below amax / (448 * 2^6) = amax / 28672
# and most of it is stored with 3 bits or fewer.
ZERO_FRAC_LIMIT = 0.01
GROUP_SMALL_LIMIT = 0.5
EXACT_KTH_LIMIT = 1 << 24  # above this many elements kthvalue beats topk on memory

# DESIGN's default by name, for unquantized checkpoints that no built-in recipe fits (recipe_for).
_BLOCK = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_CHANNEL = re.compile(r".*\.((q|k|v|o)_proj|(gate|up|down)_proj)\.weight$")


@dataclass(frozen=True)
class TensorStats:
    name: str
    shape: tuple[int, ...]
    dtype: str  # as stored
    scheme: str  # channel | block | keep
    numel: int
    variance: float
    absmax: float
    absp99: float
    absmean: float
    finite: bool
    zero_frac: float | None = None
    subnormal_frac: float | None = None
    worst_group_small: float | None = None
    sqnr_db: float | None = None
    risks: tuple[str, ...] = ()

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"], d["risks"] = list(self.shape), list(self.risks)
        return d


def default_scheme(name: str, shape: tuple[int, ...]) -> str:
    """DESIGN's scheme for a tensor of a source (unquantized) checkpoint."""
    if len(shape) != 2:
        return "keep"
    if _BLOCK.match(name):
        return "block"
    if _CHANNEL.match(name):
        return "channel"
    return "keep"


def abs_p99(a: torch.Tensor) -> float:
    """Nearest-rank 99th percentile of a flat non-negative float tensor (exact)."""
    n = a.numel()
    rank = -(-99 * n // 100)  # ceil(0.99 n), 1-based, ascending; integers: 0.99 * 100 > 99 in floats
    if n > EXACT_KTH_LIMIT:
        return a.kthvalue(rank).values.item()
    return a.topk(n - rank + 1, sorted=False).values.min().item()


def _basic(name, w, stored_dtype, scheme) -> dict:
    x = w.reshape(-1)
    if not x.numel():
        return dict(name=name, shape=tuple(w.shape), dtype=stored_dtype, scheme=scheme, numel=0,
                    variance=0.0, absmax=0.0, absp99=0.0, absmean=0.0, finite=True)
    a = x.abs()
    absmax = a.max().item()  # NaN propagates through max, so this also answers "all finite?"
    xd = x.double()  # float64: float32 sums over millions of elements drift
    var, _ = torch.var_mean(xd, unbiased=False)
    return dict(name=name, shape=tuple(w.shape), dtype=stored_dtype, scheme=scheme, numel=x.numel(),
                variance=var.item(), absmax=absmax, absp99=abs_p99(a), absmean=xd.abs().mean().item(),
                finite=math.isfinite(absmax))


def _exponent_bits(q: torch.Tensor) -> torch.Tensor:
    """The 4 exponent bits of FP8 E4M3 codes (uint8). 0 means zero or subnormal (|q| < 2^-6).
    Integer ops and count_nonzero: bool-mask arithmetic on the CPU is several times slower."""
    return (q.view(torch.uint8) & 0x7F) >> 3


def worst_group_small(exp: torch.Tensor, scheme: str) -> float:
    """Largest fraction of one quantization group (row or 128x128 block) stored as FP8 zero or
    subnormal; the padding of edge blocks is not counted. A nonzero group always has one normal code
    (its amax becomes 448), so a group without any is all zeros: nothing lost, it counts 0."""
    n, k = exp.shape
    if scheme == "channel":
        normal = torch.count_nonzero(exp, dim=1)
        real = torch.full_like(normal, k)
    else:
        b = fp8.BLOCK
        nb, kb = -(-n // b), -(-k // b)
        padded = torch.zeros(nb * b, kb * b, dtype=torch.uint8)  # padding is not normal ...
        padded[:n, :k] = exp
        normal = torch.count_nonzero(padded.view(nb, b, kb, b), dim=(1, 3))
        rows = torch.full((nb,), b)
        rows[-1] = n - (nb - 1) * b
        cols = torch.full((kb,), b)
        cols[-1] = k - (kb - 1) * b
        real = rows[:, None] * cols[None, :]  # ... and is not counted in a block's size either
    frac = torch.where(normal > 0, (real - normal) / real, torch.zeros(normal.shape))
    return frac.max().item()


def _fp8_effects(x: torch.Tensor, q: torch.Tensor, scheme: str, source: bool) -> dict:
    """x: the float32 weight (source) or its dequantized value (FP8 checkpoint); q: the FP8 codes."""
    numel = q.numel()
    exp = _exponent_bits(q)
    zero_codes = numel - torch.count_nonzero(q.view(torch.uint8) & 0x7F).item()
    small_codes = numel - torch.count_nonzero(exp).item()
    if source:  # a zero weight is a zero code; count only the nonzero weights that flushed
        nonzero = torch.count_nonzero(x).item()
        zero_frac = (zero_codes - (numel - nonzero)) / max(nonzero, 1)
    else:
        zero_frac = zero_codes / numel
    return {"zero_frac": zero_frac, "subnormal_frac": (small_codes - zero_codes) / numel,
            "worst_group_small": worst_group_small(exp, scheme)}


def _risks(s: dict) -> tuple[str, ...]:
    r = []
    if not s["finite"]:
        r.append("non-finite values")
    if s.get("zero_frac") is not None and s["zero_frac"] > ZERO_FRAC_LIMIT:
        r.append(f"{s['zero_frac']:.1%} of weights flush to zero in FP8")
    if s.get("worst_group_small") is not None and s["worst_group_small"] > GROUP_SMALL_LIMIT:
        r.append(f"a {s['scheme']} group is {s['worst_group_small']:.0%} FP8 zero/subnormal "
                 "(its range is too wide for one scale)")
    return tuple(r)


def source_stats(name: str, w: torch.Tensor, scheme: str | None = None,
                 notes: tuple[str, ...] = ()) -> TensorStats:
    """Statistics of an unquantized tensor, and what its scheme's FP8 quantization would do to it."""
    scheme = scheme or default_scheme(name, tuple(w.shape))
    x = w.float()
    s = _basic(name, x, str(w.dtype).replace("torch.", ""), scheme)
    s["notes"] = notes
    if scheme in ("channel", "block") and w.numel() and s["finite"]:
        q, scale = (fp8.quantize_channel if scheme == "channel" else fp8.quantize_block)(w)
        if bool((scale == 0).any()):  # amax / 448 underflowed: NaN codes, meaningless counts
            s["notes"] += ("a row or block's scale amax / 448 underflows float32 to 0: "
                           "fp8conv quantize refuses it",)
        else:
            s.update(_fp8_effects(x, q, scheme, source=True))
            s["sqnr_db"] = sqnr_db(fp8.dequantize(q, scale), x)
    notes = s.pop("notes")
    return TensorStats(**s, risks=notes + _risks(s))


def fp8_stats(name: str, q: torch.Tensor, scale: torch.Tensor) -> TensorStats:
    """Statistics of an FP8 weight, dequantized with its weight_scale first."""
    if q.dim() != 2:
        raise UserError(f"tensor '{name}': FP8 weights must be 2-D, got shape {list(q.shape)}")
    try:
        w = fp8.dequantize(q, scale)
    except ValueError as e:
        raise UserError(f"tensor '{name}_scale': {e}") from None
    scheme = "channel" if tuple(scale.shape) == (q.shape[0], 1) else "block"
    s = _basic(name, w, "float8_e4m3fn", scheme)
    s.update(_fp8_effects(w, q, scheme, source=False))
    return TensorStats(**s, risks=_risks(s))


def recipe_for(ckpt: str | Path, recipe: str | None = None):
    """The recipe that decides the schemes of an unquantized checkpoint: ``recipe`` (a built-in name or
    a TOML file) if given, else the built-in one named like config.json's model_type (onerec_v2,
    qwen3, qwen3_moe), else None (then DESIGN's name-based default, ``default_scheme``)."""
    import json

    from fp8conv.recipe import builtin_names, load_recipe

    if recipe is not None:
        return load_recipe(recipe)
    try:
        model_type = json.loads((Path(ckpt) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return load_recipe(model_type) if model_type in builtin_names() else None


def _recipe_scheme(recipe, name: str, shape: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    if recipe is None:
        return default_scheme(name, shape), ()
    try:
        return recipe.scheme_for(name, shape), ()
    except UserError:  # inspect reports what quantize would refuse instead of refusing itself
        return "keep", (f"no rule of recipe {recipe.name!r} claims it: fp8conv quantize would refuse",)


def iter_checkpoint_stats(ckpt: str | Path, recipe=None) -> Iterator[TensorStats]:
    """One TensorStats per tensor of the checkpoint, in file order (``X.weight_scale`` folds into its
    FP8 ``X.weight``). Works on any safetensors folder (OneRec-V2, Qwen3, ...); reads one tensor at a
    time (``_Reader``). ``recipe`` (fp8conv.recipe.Recipe or None) decides the schemes of unquantized
    tensors; FP8 tensors carry theirs in their scale's shape."""
    from fp8conv.runtime.loader import tensor_files

    files = tensor_files(ckpt)
    reader = _Reader()
    try:
        yield from _iter_stats(files, reader.get, recipe)
    finally:
        reader.close()


class _Reader:
    """Reads one tensor at a time with fp8conv.checkpoint (pread into a buffer we own, not a memory
    map, so RSS stays one tensor rather than growing with every page of the checkpoint touched)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._fd = -1
        self._infos: dict = {}
        self._header = None

    def _open(self, path: Path) -> None:
        from fp8conv.checkpoint import read_header

        self.close()
        self._header = read_header(path)  # validated: offsets tile the file, dtypes known
        self._infos = {t.name: t for t in self._header.tensors}
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise UserError(f"{path}: cannot open ({e.strerror})") from None
        self._path = path

    def get(self, name: str, path: Path) -> torch.Tensor:
        from fp8conv.checkpoint import read_into, torch_dtype

        if path != self._path:
            self._open(path)
        info = self._infos.get(name)
        if info is None:
            raise UserError(f"{path}: tensor '{name}' is listed in the index but not in the file")
        try:
            dtype = torch_dtype(info.dtype)
        except KeyError:
            raise UserError(f"{path}: tensor '{name}' has dtype {info.dtype}, which inspect cannot read") from None
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        read_into(self._fd, self._header, info, buf.numpy())
        return buf.view(dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._path = -1, None


def _iter_stats(files: dict, read, recipe) -> Iterator[TensorStats]:
    def get(name: str) -> torch.Tensor:
        return read(name, files[name])

    for name in sorted(files, key=lambda n: (str(files[n]), n)):  # one shard after the other
        if name.endswith("_scale") and name[: -len("_scale")] in files:
            continue
        t = get(name)
        if t.dtype == fp8.FP8_DTYPE:
            if name + "_scale" not in files:
                raise UserError(f"{files[name]}: FP8 tensor '{name}' has no '{name}_scale'")
            yield fp8_stats(name, t, get(name + "_scale"))
        elif t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            scheme, notes = _recipe_scheme(recipe, name, tuple(t.shape))
            yield source_stats(name, t, scheme, notes)
        # integer / bool buffers carry no weight statistics


def tensor_count(ckpt: str | Path) -> int:
    from fp8conv.runtime.loader import tensor_files

    files = tensor_files(ckpt)
    return sum(1 for n in files if not (n.endswith("_scale") and n[: -len("_scale")] in files))


@dataclass(frozen=True)
class Summary:
    """Means over tensors (the paper's Figure 1 statistics), for all tensors and for the quantized ones."""

    tensors: int
    mean_variance: float
    mean_absmax: float
    mean_absp99: float
    quantized_tensors: int
    quantized_mean_variance: float
    quantized_mean_absmax: float
    quantized_mean_absp99: float
    risky: int


def summarize(stats: list[TensorStats]) -> Summary:
    def means(xs):
        if not xs:
            return 0.0, 0.0, 0.0
        return (sum(s.variance for s in xs) / len(xs), sum(s.absmax for s in xs) / len(xs),
                sum(s.absp99 for s in xs) / len(xs))

    q = [s for s in stats if s.scheme != "keep"]
    return Summary(len(stats), *means(stats), len(q), *means(q), sum(bool(s.risks) for s in stats))


def risk_order(s: TensorStats) -> tuple:
    """Sort key: flagged first, then most zero-flushed, then widest group range."""
    return (-len(s.risks), -(s.zero_frac or 0.0), -(s.worst_group_small or 0.0), s.name)
