"""Error metrics, computed in float64. One module for `fp8conv verify`, `quantize`'s manifest and tests.

- rel_error: ||out - ref|| / ||ref|| (Frobenius).
- mean_rel_error: mean|out - ref| / mean|ref| (vLLM's block-FP8 test metric; the kernels' gate < 1e-3).
- sqnr_db: 10 log10(||ref||^2 / ||out - ref||^2) (torchao).
- gemm_diff: 1 - 2 sum(x y) / sum(x^2 + y^2) (DeepGEMM's calc_diff).
- cosine: cosine similarity of the flattened tensors.
Float64 because float32 sums over millions of elements lose the small differences we measure.
"""

from __future__ import annotations

import math

import torch


def _pair(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
    return out.detach().double().flatten(), ref.detach().double().flatten()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    den = r.norm().item()
    num = (o - r).norm().item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def mean_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    if torch.isnan(o).any():
        return math.nan
    den = r.abs().mean().item()
    num = (o - r).abs().mean().item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    noise = (o - r).pow(2).sum().item()
    signal = r.pow(2).sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if math.isinf(noise):
        return -math.inf
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def gemm_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    den = (o * o + r * r).sum().item()
    if den == 0:
        return 0.0
    return 1.0 - 2.0 * (o * r).sum().item() / den


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    den = o.norm().item() * r.norm().item()
    if den == 0:
        return 1.0 if o.norm().item() == r.norm().item() else 0.0
    return (o @ r).item() / den


# -- distribution and ranking agreement (fp8conv verify) -----------------------------------------

def kl_divergence(logits_out: torch.Tensor, logits_ref: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(out)) in nats; rows are the leading dims, classes
    the last. Float64 log-softmax: the FP8-vs-FP16 gaps we gate on are ~1e-4 nats, below float32's
    resolution of a sum over 8192 classes."""
    if logits_out.shape != logits_ref.shape:
        raise ValueError(f"shape mismatch: {tuple(logits_out.shape)} vs {tuple(logits_ref.shape)}")
    k = logits_ref.shape[-1]
    lo = torch.log_softmax(logits_out.detach().double().reshape(-1, k), dim=-1)
    lr = torch.log_softmax(logits_ref.detach().double().reshape(-1, k), dim=-1)
    if lr.shape[0] == 0:
        return 0.0
    return (lr.exp() * (lr - lo)).sum(-1).mean().item()


def kendall_tau(a: list | torch.Tensor, b: list | torch.Tensor) -> float:
    """Kendall's tau-a between two equally long sequences of scores or ranks (no ties expected: beam
    ranks are distinct). 1 = same order, -1 = reversed; nan for fewer than two items."""
    x = torch.as_tensor(a, dtype=torch.float64).flatten()
    y = torch.as_tensor(b, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"length mismatch: {x.numel()} vs {y.numel()}")
    n = x.numel()
    if n < 2:
        return math.nan
    sx = torch.sign(x[:, None] - x[None, :])
    sy = torch.sign(y[:, None] - y[None, :])
    return ((sx * sy).sum() / (n * (n - 1))).item()
