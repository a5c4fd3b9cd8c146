"""Activation statistics for ``fp8conv inspect --activations`` (the paper's Figure 1(b)).

Runs the reference runtime over sample inputs with a backend that records, for every Linear the model
calls, the input it was given (before any FP8 activation quantization): variance, AbsMax, AbsP99 of x
and the largest per-token amax / median ratio (how hard per-token FP8 scaling is). Inputs: the
checkpoint's ``contexts.safetensors`` when it ships one, else synthetic contexts from the config;
each user is scored on a few items by teacher forcing (``forward_levels``): its labels when present,
else random semantic IDs (fixed seed).

AbsP99 is exact while a Linear has seen at most ``SAMPLE_LIMIT`` input values; beyond that it is the
99th percentile of a fixed-seed uniform sample of that many values (variance and AbsMax stay exact).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fp8conv.inspect_stats import abs_p99, default_scheme
from fp8conv.runtime.ops import Linear, ReferenceBackend

SAMPLE_LIMIT = 1 << 22


@dataclass
class _Acc:
    """Running float64 moments, AbsMax and a bounded sample of |x| for one Linear's input."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    absmax: float = 0.0
    calls: int = 0
    tokens: int = 0
    worst_token_range: float = 0.0
    samples: list = field(default_factory=list)
    kept: int = 0

    def add(self, x: torch.Tensor, gen: torch.Generator) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        flat = x2.reshape(-1)
        xd = flat.double()
        self.count += flat.numel()
        self.total += xd.sum().item()
        self.total_sq += (xd * xd).sum().item()
        a = flat.abs()
        self.absmax = max(self.absmax, a.max().item() if a.numel() else 0.0)
        self.calls += 1
        self.tokens += x2.shape[0]
        if x2.numel():
            amax = x2.abs().amax(dim=1)
            med = x2.abs().median(dim=1).values
            ratio = torch.where(med > 0, amax / med.clamp_min(1e-30), torch.zeros_like(amax))
            self.worst_token_range = max(self.worst_token_range, ratio.max().item())
        room = SAMPLE_LIMIT - self.kept
        if a.numel() > room:  # keep a fixed-seed uniform subsample once the budget is spent
            a = a[torch.randint(0, a.numel(), (max(room, 0),), generator=gen)]
        if a.numel():
            self.samples.append(a.clone())
            self.kept += a.numel()


class RecordingBackend(ReferenceBackend):
    """The reference backend, recording the input of every ``linear`` call keyed by the Linear's name
    (the checkpoint name without ``.weight``; routed experts as ``...mlp.experts.{e}.gate_proj``)."""

    name = "reference+recording"

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, _Acc] = {}
        self._gen = torch.Generator().manual_seed(0)

    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        self.stats.setdefault(w.name, _Acc()).add(x, self._gen)
        return super().linear(x, w)


@dataclass(frozen=True)
class ActivationStats:
    name: str  # Linear name (checkpoint tensor name without .weight)
    scheme: str  # the weight's scheme (as stored for FP8 checkpoints, DESIGN's default otherwise)
    calls: int
    tokens: int
    variance: float
    absmax: float
    absp99: float
    absp99_exact: bool
    worst_token_range: float

    def to_json(self) -> dict:
        return asdict(self)


def activation_stats(ckpt: str | Path, users: int = 8, items_per_user: int = 4, seed: int = 0,
                     device: str = "cpu") -> list[ActivationStats]:
    """Input statistics of every Linear of a OneRec-V2 checkpoint over its sample inputs."""
    from fp8conv.runtime.inputs import sample_contexts, synthetic_contexts
    from fp8conv.runtime.model import load_model

    backend = RecordingBackend()
    model = load_model(ckpt, device=device, dtype="fp32", backend=backend)
    cfg = model.cfg
    ctx = sample_contexts(ckpt, cfg) or synthetic_contexts(cfg, n_users=users, seed=seed)
    g = torch.Generator().manual_seed(seed)
    u = ctx.num_users
    items = torch.randint(0, cfg.codebook_size, (u, items_per_user, cfg.num_semantic_levels), generator=g)
    if ctx.labels is not None:
        items[:, 0] = ctx.labels
    user_index = torch.arange(u).repeat_interleave(items_per_user)
    with torch.no_grad():
        kv = model.encode_context(ctx)
        model.forward_levels(None, items.reshape(-1, cfg.num_semantic_levels), user_index, kv=kv)
    schemes = {name: lin.scheme for name, lin in model.linears().items()}
    for prefix, ex in model.experts().items():
        for e in range(ex.num_experts):
            for lin in ex.expert(e):
                schemes[lin.name] = lin.scheme
    out = []
    for name, acc in backend.stats.items():
        scheme = schemes.get(name, "none")
        if scheme == "none":  # unquantized checkpoint: the scheme the default recipe would give
            scheme = default_scheme(name + ".weight", (1, 1))
        mean = acc.total / max(acc.count, 1)
        var = max(acc.total_sq / max(acc.count, 1) - mean * mean, 0.0)
        p99 = abs_p99(torch.cat(acc.samples)) if acc.samples else 0.0
        out.append(ActivationStats(name, scheme, acc.calls, acc.tokens, var, acc.absmax, p99,
                                   acc.kept == acc.count, acc.worst_token_range))
    return sorted(out, key=lambda s: _natural(s.name))


def _natural(name: str) -> tuple:
    """'layers.10' after 'layers.9'; (kind, value) pairs so ints and strings never compare."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def mean_over(stats: list[ActivationStats], quantized_only: bool = True) -> dict:
    xs = [s for s in stats if s.scheme != "keep"] if quantized_only else stats
    if not xs:
        return {"linears": 0, "mean_variance": 0.0, "mean_absmax": 0.0, "mean_absp99": 0.0}
    return {"linears": len(xs), "mean_variance": math.fsum(s.variance for s in xs) / len(xs),
            "mean_absmax": math.fsum(s.absmax for s in xs) / len(xs),
            "mean_absp99": math.fsum(s.absp99 for s in xs) / len(xs)}
