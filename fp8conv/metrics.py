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
