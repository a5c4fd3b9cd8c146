"""Every kernel shape a OneRec-V2 checkpoint serves at a given load (batch, beam, context).

The shapes follow what the runtime (fp8conv.runtime.model, beam.py) and the Triton backend
(fp8conv.kernels.backend) actually launch:

- Beam search runs ``levels`` steps. Step t decodes N_t rows (N_0 = batch, then batch x beam, capped by
  the candidates that exist). Decoding is incremental (model.decode_step keeps each beam's
  self-attention K/V): each step computes only the new position, so every decoder Linear sees
  M_t = N_t tokens. The heads see N_t rows; the context projection sees batch x context tokens once.
- ``channel`` Linears -> "fp8_gemm" with the [N, K] weight; a SwiGLU whose gate, up and down are all
  ``channel`` runs gate and up as one GEMM with N = 2 x width and SwiGLU in its epilogue,
  "fp8_gemm_swiglu" (the backend interleaves them).
- ``block`` routed experts -> "fp8_grouped_gemm": gate/up packed as [E, 2 x Ip, d] (Ip = width rounded up
  to 128) and down [E, d, I] (both "fp8_grouped_gemm_gluon" where the backend runs them in Gluon: a
  Hopper GPU here and rows 16-byte aligned, grouped_gemm.expert_layout); the config is looked up by
  M = max(1, tokens x top_k // E), rows per expert on average, as the backend does.
- top-k over (batch, N_t / batch x K) candidates per step -> "topk" (kernels/topk.py), keyed by N = the
  row length, K = k kept and M = the rows (batch), as the backend looks it up.
- ``keep`` tensors run in the source precision and need no FP8 kernel.

Which scheme each Linear has comes from the checkpoint's safetensors headers (an FP8 weight with a
[N, 1] weight_scale is ``channel``, with block scales ``block``); a folder with only config.json (or a
preset) is taken to use the built-in OneRec-V2 recipe, and the result says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from fp8conv.config import OneRecConfig, tensor_specs
from fp8conv.errors import UserError
from fp8conv.tuning.cache import bucket

BLOCK = 128
TUNABLE = ("fp8_gemm", "fp8_gemm_swiglu", "fp8_grouped_gemm", "fp8_grouped_gemm_gluon", "topk")
GEMMS = ("fp8_gemm", "fp8_gemm_swiglu")  # the dense FP8 GEMM, plain and with the SwiGLU epilogue
GROUPED = ("fp8_grouped_gemm", "fp8_grouped_gemm_gluon")

# the built-in OneRec-V2 recipe's schemes (DESIGN, "FP8 numerics"), for checkpoints without FP8 weights
_DEFAULT_RULES = (
    (re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$"), "block"),
    (re.compile(r"^model\.layers\.\d+\.(self|cross)_attn\.[qkvo]_proj\.weight$"), "channel"),
    (re.compile(r"^model\.layers\.\d+\.mlp\.(shared_experts\.)?(gate|up|down)_proj\.weight$"), "channel"),
)


@dataclass(frozen=True)
class Problem:
    """One kernel launch shape. ``m``: tokens (fp8_gemm), rows per expert (fp8_grouped_gemm; total rows
    in ``rows``), rows (topk: ``n`` candidates per row, ``k`` kept)."""

    kernel: str
    n: int
    k: int
    m: int
    rows: int = 0  # grouped: tokens x top_k; others: = m
    experts: int = 0
    top_k: int = 0
    swiglu: bool = False  # grouped gate/up with the fused SwiGLU epilogue
    uses: tuple[str, ...] = field(default=(), compare=False)

    @property
    def swiglu_gemm(self) -> bool:
        """The dense gate/up GEMM with SwiGLU in its epilogue (N = 2I rows in, I columns out)."""
        return self.kernel == "fp8_gemm_swiglu"

    @property
    def tunable(self) -> bool:
        return self.kernel in TUNABLE

    @property
    def work_s(self) -> float:
        """A rough lower bound of one launch's time on an H100 (seconds), to order the tuning: FP8
        tensor-core FLOPs for the GEMMs, the bytes of the float32 scores read once for top-k."""
        if self.kernel == "topk":
            return (self.rows or self.m) * self.n * 4 / 3.35e12
        return 2.0 * (self.rows or self.m) * self.n * self.k / 1.979e15

    @property
    def bucket(self) -> int:
        return bucket(self.m)

    @property
    def key(self) -> tuple:
        """What one cache entry serves: (kernel, N, K, bucket)."""
        return (self.kernel, self.n, self.k, self.bucket)

    def label(self) -> str:
        if self.kernel in GROUPED:
            return (f"{self.kernel} {'gate_up' if self.swiglu else 'down'} E={self.experts} N={self.n} "
                    f"K={self.k} rows={self.rows} (M/expert {self.m})")
        if self.kernel == "topk":
            return f"topk {self.m} x {self.n} -> {self.k}"
        return f"{self.kernel} M={self.m} N={self.n} K={self.k}"

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "N": self.n, "K": self.k, "M": self.m, "bucket": self.bucket,
                "rows": self.rows, "experts": self.experts, "top_k": self.top_k, "swiglu": self.swiglu,
                "tunable": self.tunable, "uses": list(self.uses)}


@dataclass(frozen=True)
class Load:
    batch: int = 32
    beam: int = 512
    context: int = 3000
    top_n: int = 10

    def __post_init__(self):
        for name in ("batch", "beam", "context", "top_n"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")


# -- schemes ----------------------------------------------------------------------------------------

def default_scheme(name: str) -> str:
    for pat, scheme in _DEFAULT_RULES:
        if pat.match(name):
            return scheme
    return "keep"


def read_schemes(ckpt: Path | str) -> dict[str, str] | None:
    """weight name -> scheme from the safetensors headers of ``ckpt`` (headers only, no data), or None
    if the folder has no model weights file. The weights are the index's shards, else model.safetensors,
    as the runtime loader reads them: other safetensors beside them (contexts, catalogue) are data."""
    ckpt = Path(ckpt)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({ckpt / f for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise UserError(f"{index}: not a valid index (needs a 'weight_map' object): {e}") from None
    else:
        files = [ckpt / "model.safetensors"] if (ckpt / "model.safetensors").is_file() else []
    if not files:
        return None
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        shapes.update(_header(f))
    out = {}
    for name, (dtype, shape) in shapes.items():
        if not name.endswith(".weight"):
            continue
        sc = shapes.get(name[: -len("weight")] + "weight_scale")
        if dtype != "F8_E4M3" or sc is None or len(shape) != 2:
            out[name] = "keep"
        elif tuple(sc[1]) == (shape[0], 1):
            out[name] = "channel"
        else:
            out[name] = "block"
    return out


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= path.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


# -- derivation -------------------------------------------------------------------------------------

def step_rows(cfg: OneRecConfig, load: Load) -> list[int]:
    """N_t, the decoder rows of each beam-search step (beam.py: keep = min(beam, rows x K))."""
    rows, nb = [], 1
    for _ in range(cfg.num_semantic_levels):
        rows.append(load.batch * nb)
        nb = min(load.beam, nb * cfg.codebook_size)
    return rows


def expert_layout(d: int, inter: int, device=None) -> str:
    """The experts' layout the Triton backend serves for hidden size d and expert width inter on
    ``device`` (default: the current CUDA device if any, else the CPU): grouped_gemm.expert_layout."""
    import torch

    from fp8conv.kernels import grouped_gemm as gg

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return gg.expert_layout(d, inter, torch.device(device))


# GPU names of compute capability 9.x (Hopper), for naming another machine's experts layout
_HOPPER_NAMES = ("H100", "H200", "H800", "H20", "GH200")


def expert_layout_on(device_name: str, d: int, inter: int) -> str:
    """The experts' layout the backend serves on a GPU known only by name (``tune --show --device``, the
    shipped caches' devices): the Gluon layout on a Hopper GPU (with Triton GLUON_TRITON there, the
    version the shipped caches were tuned with), where rows are 16-byte aligned; else as on this machine
    without Gluon."""
    from fp8conv.kernels import grouped_gemm as gg

    if not gg.sorted_rows_aligned(d, inter):
        return "gather"
    return "gluon" if any(h in device_name for h in _HOPPER_NAMES) else "sorted"


def derive(cfg: OneRecConfig, load: Load, schemes: dict[str, str] | None = None,
           layout: str | None = None) -> list[Problem]:
    """Every distinct kernel problem, tunable ones first, merged by (kernel, N, K, M). layout: the
    experts' layout, which names their kernels (default: expert_layout on this machine)."""
    scheme = (lambda n: schemes.get(n, "keep")) if schemes is not None else default_scheme
    specs = tensor_specs(cfg)
    found: dict[tuple, Problem] = {}
    from fp8conv.kernels.grouped_gemm import layout_kernels

    grouped = layout_kernels(layout or expert_layout(cfg.hidden_size, cfg.moe_intermediate_size))

    def add(p: Problem, use: str) -> None:
        key = (p.kernel, p.n, p.k, p.m, p.swiglu)
        old = found.get(key)
        uses = old.uses if old else ()
        found[key] = replace(p, uses=uses if use in uses else uses + (use,))

    def gemm(name: str, m: int, use: str, swiglu: bool = False) -> None:
        n, k = specs[name]
        add(Problem("fp8_gemm_swiglu", 2 * n, k, m, rows=m) if swiglu else Problem("fp8_gemm", n, k, m, rows=m), use)

    levels = cfg.num_semantic_levels
    for t, n_rows in enumerate(step_rows(cfg, load)):
        m, step = n_rows, f"step {t}"  # one new decoder position per row (decode_step)
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}"
            for a in ("cross_attn.q_proj", "cross_attn.o_proj", "self_attn.q_proj", "self_attn.k_proj",
                      "self_attn.v_proj", "self_attn.o_proj"):
                if scheme(f"{p}.{a}.weight") == "channel":
                    gemm(f"{p}.{a}.weight", m, f"{_generic(f'{p}.{a}')} @ {step}")
            mlps = [f"{p}.mlp"] if not cfg.is_moe_layer(layer) else (
                [f"{p}.mlp.shared_experts"] if cfg.n_shared_experts else [])
            for mp in mlps:
                names = [f"{mp}.{x}_proj.weight" for x in ("gate", "up", "down")]
                kinds = [scheme(x) for x in names]
                if kinds == ["channel"] * 3:  # backend.swiglu_mlp: gate and up in one GEMM, SwiGLU in its epilogue
                    gemm(names[0], m, f"{_generic(mp)}.gate_up_proj @ {step}", swiglu=True)
                    gemm(names[2], m, f"{_generic(mp)}.down_proj @ {step}")
                else:
                    for x, kind in zip(names, kinds):
                        if kind == "channel":
                            gemm(x, m, f"{_generic(x[:-7])} @ {step}")
            if cfg.is_moe_layer(layer):
                _experts(cfg, layer, m, step, scheme, add, grouped)
        for i in range(levels):  # heads: only the position being predicted (quantized only by a recipe)
            if i == t and scheme(f"lm_heads.{i}.proj.weight") == "channel":
                gemm(f"lm_heads.{i}.proj.weight", n_rows, f"lm_heads.{i}.proj @ {step}")
        keep = load.top_n if t == levels - 1 else load.beam
        cands = (n_rows // load.batch) * cfg.codebook_size
        add(Problem("topk", cands, min(keep, cands), load.batch, rows=load.batch), f"beam search @ {step}")
    if scheme("context.proj.weight") == "channel":
        gemm("context.proj.weight", load.batch * min(load.context, cfg.max_context_length),
             "context.proj (once per user)")
    probs = list(found.values())
    probs.sort(key=lambda p: (not p.tunable, p.kernel, p.n, p.k, p.m, not p.swiglu))
    return probs


def _experts(cfg, layer, tokens, step, scheme, add, grouped) -> None:
    p = f"model.layers.{layer}.mlp.experts"
    kinds = {scheme(f"{p}.{e}.{x}_proj.weight") for e in range(cfg.n_routed_experts)
             for x in ("gate", "up", "down")}
    if kinds != {"block"}:
        return  # mixed or unquantized experts run on the reference path (backend.experts)
    e, d, inter, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    ip = -(-inter // BLOCK) * BLOCK
    rows = tokens * k
    m = max(1, rows // e)
    use = f"model.layers.*.mlp.experts @ {step}"
    add(Problem(grouped[0], 2 * ip, d, m, rows=rows, experts=e, top_k=k, swiglu=True),
        use.replace("experts", "experts.gate_up"))
    add(Problem(grouped[1], d, inter, m, rows=rows, experts=e, top_k=k, swiglu=False),
        use.replace("experts", "experts.down"))


def _generic(name: str) -> str:
    return re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", name)


def tuning_targets(problems: list[Problem]) -> list[Problem]:
    """The problems to tune: one per cache entry (kernel, N, K, bucket), the largest M of each bucket
    (its uses merged), most work first (``Problem.work_s``) so an interrupted or budget-cut run has done
    the heaviest."""
    best: dict[tuple, Problem] = {}
    for p in problems:
        if not p.tunable:
            continue
        old = best.get(p.key)
        if old is None or p.m > old.m:
            best[p.key] = replace(p, uses=(old.uses if old else ()) + p.uses)
        else:
            best[p.key] = replace(old, uses=old.uses + p.uses)
    uses_dedup = [replace(p, uses=tuple(dict.fromkeys(p.uses))) for p in best.values()]
    return sorted(uses_dedup, key=lambda p: -p.work_s)
