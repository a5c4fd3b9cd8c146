"""RMSNorm on its own: ops.rms_norm in one pass (x read once in its dtype, y written once), for the
norms that no quantization follows inside the same operator (before each layer's MLP / MoE, before the
heads, the context's key/value norms).

It is kernels/act_quant.py's RMSNorm producer without the quantization: the same tiles (a row's groups
of 128 columns as a power-of-two head and a padded tail, config.group_tiles), the same rows per
program (act_quant's default config) and the same jitted helpers for the sum of squares, the inverse
RMS and the weighted row, so ``rms_norm(x)`` is the row that ``rmsnorm_quant(x)`` quantizes.

Numerics are ops.rms_norm's: float32 math, y = (x * (1 / sqrt(sum(x^2) / K + eps))) * weight with IEEE
division and square root, rounded to x's dtype (nearest even). Only the order of the float32 sum of
squares differs from torch's, which can move the inverse RMS by an ulp of float32 and so, rarely, a
bf16/fp16 output by one ulp (float32 outputs by a few float32 ulps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8conv.kernels.act_quant import GROUP, _load_tile, _norm_tile, _norm_weight, _rms_inv, _sum_squares
from fp8conv.kernels.config import KernelConfig, default_config, group_tiles

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rms_norm_kernel(
    # x (M, K): a row stride, unit column stride; weight (K,) contiguous, any float dtype
    x_ptr, w_ptr, stride_x, eps,
    # y (M, K) contiguous, x's dtype
    y_ptr, M, K,
    ROWS: tl.constexpr, NH: tl.constexpr, NT: tl.constexpr, GS: tl.constexpr,
):
    # ROWS rows per program; a row's ceil(K / GS) groups as a head of NH groups and a tail of NT
    # (act_quant's layout, so the sum of squares is reduced in the same order as rmsnorm_quant's)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    cols_h = tl.arange(0, NH)[:, None] * GS + tl.arange(0, GS)[None, :]  # (NH, GS)
    xh, mask_h = _load_tile(x_ptr, rows, stride_x, cols_h, rmask, K, "")
    ss = _sum_squares(xh)
    if NT > 0:
        cols_t = NH * GS + tl.arange(0, NT)[:, None] * GS + tl.arange(0, GS)[None, :]
        xt, mask_t = _load_tile(x_ptr, rows, stride_x, cols_t, rmask, K, "")
        ss += _sum_squares(xt)
    inv = _rms_inv(ss, K, eps)  # (ROWS,)
    y_dt = y_ptr.dtype.element_ty
    # _norm_tile rounds to x's dtype (in software under the interpreter): the casts here are exact
    yh = _norm_tile(xh, _norm_weight(w_ptr, cols_h, K, xh.shape, False), inv).to(y_dt)
    tl.store(y_ptr + rows[:, None, None] * K + cols_h[None, :, :], yh, mask=mask_h)
    if NT > 0:
        yt = _norm_tile(xt, _norm_weight(w_ptr, cols_t, K, xt.shape, False), inv).to(y_dt)
        tl.store(y_ptr + rows[:, None, None] * K + cols_t[None, :, :], yt, mask=mask_t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, config: KernelConfig | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """ops.rms_norm(x, weight, eps) on the GPU (or under TRITON_INTERPRET).

    x (..., K) bfloat16, float16 or float32, any leading dims; rows are read in place when x's rows
    reshape to (M, K) with one row stride and a unit last-dim stride, else from a contiguous copy.
    weight (K,) any float dtype. Returns y of x's shape and dtype, contiguous (``out``: a preallocated
    contiguous tensor of that shape and dtype, written in full; the tests poison it first).
    config: rows per program (BLOCK_M) and num_warps; default: act_quant's for (M, K) (1 row, 1 warp at
    K = 1408: 33.8 us at 16384 x 1408 bf16 on an H100 (2.73 TB/s), 4 rows on 4 warps 34.2 us).
    """
    if x.dtype not in DTYPES:
        raise ValueError(f"Expected x to be bfloat16, float16 or float32, got {x.dtype} instead.")
    if x.dim() == 0:
        raise ValueError("Expected x to have a feature dimension, got a 0-d tensor")
    k = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != k:
        raise ValueError(f"Expected the norm weight to have shape ({k},), got {tuple(weight.shape)}")
    if not weight.is_floating_point() or weight.device != x.device:
        raise ValueError(f"Expected the norm weight to be a float tensor on {x.device}, got {weight.dtype} "
                         f"on {weight.device}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif (out.shape, out.dtype, out.device) != (x.shape, x.dtype, x.device) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if x.numel() == 0:
        return out
    x2 = x.reshape(-1, k)  # a view where the leading dims merge into one row stride, else a copy
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    nh, nt = group_tiles(k, GROUP)
    cfg = config or default_config("act_quant", m, 0, k)
    _rms_norm_kernel[(triton.cdiv(m, cfg.BLOCK_M),)](
        x2, weight.contiguous(), x2.stride(0), float(eps),
        out, m, k,
        ROWS=cfg.BLOCK_M, NH=nh, NT=nt, GS=GROUP, num_warps=cfg.num_warps,
    )
    return out
