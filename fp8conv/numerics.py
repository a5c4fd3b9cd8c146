"""The FP8 contract (DESIGN, "FP8 numerics"), in plain PyTorch. Every other path is tested against this.

- float8_e4m3fn, largest finite 448.
- In float32: scale = amax / 448; an all-zero row or block gets scale 1.
- q = cast(clamp(x / scale, -448, 448)): true division, round-to-nearest-even (torch's cast),
  clamp first because torch turns |values| >= 480 into NaN.
- dequantize: q.float() * scale.

Weights: per output channel (scale [N, 1]) or 128x128 blocks (scale [ceil(N/128), ceil(K/128)], edge
blocks zero-padded for the amax). Activations: per token (scale [M, 1]) or 1x128 groups
(scale [M, ceil(K/128)]), dynamic.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.float()
    # Divide by a tensor, not the Python number: on CUDA torch turns division by a scalar into a
    # multiplication by its inexact reciprocal, which moves some scales by one ulp.
    scale = amax / torch.full_like(amax, FP8_MAX)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel: w [N, K] -> (q [N, K] fp8, scale [N, 1] float32)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    scale = _scale_from_amax(w.float().abs().amax(dim=1, keepdim=True))
    return _cast(w, scale), scale


def quantize_block(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks: w [N, K] -> (q [N, K] fp8, scale [ceil(N/b), ceil(K/b)] float32)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()  # zero padding cannot raise an amax
    amax = padded.abs().view(nb, block, kb, block).amax(dim=(1, 3))
    scale = _scale_from_amax(amax)
    return _cast(w, expand_block_scale(scale, n, k, block)), scale


def expand_block_scale(scale: torch.Tensor, n: int, k: int, block: int = BLOCK) -> torch.Tensor:
    """[nb, kb] block scales -> [n, k] elementwise scales."""
    return scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """q.float() * scale for a channel ([N, 1]), token ([M, 1]) or block/group scale."""
    n, k = q.shape
    if scale.shape == (n, 1) or scale.dim() == 0 or scale.numel() == 1:
        return q.float() * scale.float()
    if scale.shape == (-(-n // block), -(-k // block)):
        return q.float() * expand_block_scale(scale.float(), n, k, block)
    if scale.shape == (n, -(-k // block)):  # 1 x block activation groups
        return q.float() * scale.float().repeat_interleave(block, 1)[:, :k]
    raise ValueError(f"scale shape {tuple(scale.shape)} does not fit a [{n}, {k}] tensor")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activations: x [M, K] -> (q fp8, scale [M, 1] float32)."""
    return quantize_channel(x)


def quantize_per_group(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 1 x group activations: x [M, K] -> (q fp8, scale [M, ceil(K/group)] float32)."""
    m, k = x.shape
    kb = -(-k // group)
    padded = torch.zeros(m, kb * group, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    scale = _scale_from_amax(padded.abs().view(m, kb, group).amax(dim=2))
    return _cast(x, scale.repeat_interleave(group, 1)[:, :k]), scale


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """What a per-token FP8 GEMM sees of x, in float32 (2-D or more; last dim is K)."""
    shape = x.shape
    q, s = quantize_per_token(x.reshape(-1, shape[-1]))
    return (q.float() * s).reshape(shape)


def fake_quant_per_group(x: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    shape = x.shape
    q, s = quantize_per_group(x.reshape(-1, shape[-1]), group)
    return dequantize(q, s, group).reshape(shape)
