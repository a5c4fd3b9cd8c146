"""Dynamic FP8 activation quantization, alone or fused with its producer (RMSNorm, SwiGLU).

One kernel, a few rows per program (KernelConfig.BLOCK_M of the "act_quant" config; enough rows
that a program moves ~16 KiB, so the memory system has work in flight). Each row is viewed as a (NG, 128) tile (NG = groups of 128 columns,
padded to a power of two), so per-token (one scale per row) and 1x128-group (one scale per group)
quantization share the code; the producer is applied in registers first, so the activation crosses
memory once: read in its dtype, written as FP8 plus float32 scales.

Numerics follow fp8conv.numerics exactly: the producer's result is rounded to the activation dtype (as
the reference backend's unfused ops do), scale = amax / 448 with IEEE division (an all-zero row or
group gets 1), q = cast(clamp(y / scale, -448, 448)) with IEEE division (``tl.div_rn``: Triton's ``/`` on
float32 is an approximate division) and round-to-nearest-even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8conv.kernels.config import KernelConfig, default_config

FP8_MAX = 448.0
GROUP = 128

@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (bf16/fp16/fp32) and back, round-to-nearest-even. bf16 by integer
    arithmetic: bit-exact with torch's cast, also under TRITON_INTERPRET (whose bf16 cast truncates)."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def round_to_e4m3(x):
    """float32 x (already clamped to +-448) rounded to the nearest float8_e4m3fn value, ties to even,
    still as float32, so the cast that follows is exact whatever path the compiler takes to FP8 (and
    under TRITON_INTERPRET, whose cast rounds wrongly). Normal range: round the 23-bit mantissa to 3
    bits on the integer bits; below 2^-6 (subnormal FP8, spacing 2^-9): x + 1.5*2^14 - 1.5*2^14 rounds
    to a multiple of 2^-9 in float32 arithmetic."""
    u = x.to(tl.int32, bitcast=True)
    u = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) << 20
    normal = u.to(tl.float32, bitcast=True)
    sub = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


# producer codes (compile-time)
_NONE, _RMSNORM, _SWIGLU = 0, 1, 2


@triton.jit
def _act_quant_kernel(
    # inputs: x (or gate for SwiGLU) and up, row-major with a row stride; RMSNorm weight
    x_ptr, u_ptr, w_ptr, stride_x, stride_u, eps,
    # outputs: q (M, K) fp8 contiguous; scale (M, NS) float32 contiguous (NS = 1 or groups)
    q_ptr, s_ptr, M, K, NS,
    PRODUCER: tl.constexpr, PER_GROUP: tl.constexpr, ROWS: tl.constexpr, NG: tl.constexpr,
    GS: tl.constexpr,
):
    # ROWS rows per program, each viewed as (NG, GS) groups: a (ROWS, NG, GS) tile
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, NG)[:, None] * GS + tl.arange(0, GS)[None, :]  # (NG, GS)
    rmask = rows < M
    mask = rmask[:, None, None] & (cols < K)[None, :, :]
    x = tl.load(x_ptr + rows[:, None, None] * stride_x + cols[None, :, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if PRODUCER == 1:  # RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w
        ms = tl.sum(tl.sum(xf * xf, axis=2), axis=1) / K  # (ROWS,)
        w = tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        xf = round_to(xf * (1.0 / tl.sqrt_rn(ms + eps))[:, None, None] * w[None, :, :], x.dtype)
    elif PRODUCER == 2:  # SwiGLU: y = silu(gate) * up
        u = tl.load(u_ptr + rows[:, None, None] * stride_u + cols[None, :, :], mask=mask, other=0.0)
        u = u.to(tl.float32)
        xf = round_to(xf * tl.sigmoid(xf) * u, x.dtype)
    ax = tl.abs(xf)
    if PER_GROUP:
        amax = tl.max(ax, axis=2)  # (ROWS, NG)
        scale = tl.where(amax == 0.0, 1.0, tl.div_rn(amax, 448.0))
        q = tl.div_rn(xf, scale[:, :, None])
        gi = tl.arange(0, NG)
        tl.store(s_ptr + rows[:, None] * NS + gi[None, :], scale, mask=rmask[:, None] & (gi < NS)[None, :])
    else:
        amax = tl.max(tl.max(ax, axis=2), axis=1)  # (ROWS,)
        scale = tl.where(amax == 0.0, 1.0, tl.div_rn(amax, 448.0))
        q = tl.div_rn(xf, scale[:, None, None])
        tl.store(s_ptr + rows, scale, mask=rmask)
    q = round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
    tl.store(q_ptr + rows[:, None, None] * K + cols[None, :, :], q.to(q_ptr.dtype.element_ty), mask=mask)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"Expected {name} to be 2-D (tokens, features), got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"Expected {name} to have unit stride along features, got strides {x.stride()}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"Expected {name} to be bfloat16, float16 or float32, got {x.dtype} instead.")


def _launch(x, u, w, eps, producer: int, per_group: bool, config: KernelConfig | None, out=None):
    m, k = x.shape
    ng_real = triton.cdiv(k, GROUP)
    ns = ng_real if per_group else 1
    if out is None:
        q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty(m, ns, dtype=torch.float32, device=x.device)
    else:
        q, s = out
        if (q.shape, q.dtype, s.shape, s.dtype) != ((m, k), torch.float8_e4m3fn, (m, ns), torch.float32) \
                or not (q.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"out must be contiguous (q ({m}, {k}) float8_e4m3fn, scale ({m}, {ns}) float32)")
    if m == 0:
        return q, s
    ng = triton.next_power_of_2(ng_real)
    cfg = config or default_config("act_quant", m, 0, k)
    rows = cfg.BLOCK_M  # rows per program
    _act_quant_kernel[(triton.cdiv(m, rows),)](
        x, u if u is not None else x, w if w is not None else x,
        x.stride(0), u.stride(0) if u is not None else 0, float(eps),
        q, s, m, k, ns,
        PRODUCER=producer, PER_GROUP=per_group, ROWS=rows, NG=ng, GS=GROUP, num_warps=cfg.num_warps,
    )
    return q, s


def per_token_quant(x: torch.Tensor, config: KernelConfig | None = None, out=None):
    """x (M, K) bf16/fp16/fp32, unit column stride -> (q (M, K) float8_e4m3fn contiguous, scale (M, 1)
    float32). Bit-compatible with fp8conv.numerics.quantize_per_token. Every launcher here takes
    ``out=(q, scale)``: preallocated contiguous outputs (the tests poison them first)."""
    _check_rows(x, "x")
    return _launch(x, None, None, 0.0, _NONE, False, config, out)


def per_group_quant(x: torch.Tensor, config: KernelConfig | None = None, out=None):
    """x (M, K) -> (q (M, K) fp8, scale (M, ceil(K/128)) float32): 1x128 groups, a partial last group."""
    _check_rows(x, "x")
    return _launch(x, None, None, 0.0, _NONE, True, config, out)


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, per_group: bool = False,
                  config: KernelConfig | None = None, out=None):
    """quantize(rms_norm(x, weight, eps)) in one pass. x (M, K); weight (K,) any float dtype.
    The normalized row is rounded to x.dtype before quantization, as ops.rms_norm returns it."""
    _check_rows(x, "x")
    if weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"Expected the norm weight to have shape ({x.shape[1]},), got {tuple(weight.shape)}")
    return _launch(x, None, weight.contiguous(), eps, _RMSNORM, per_group, config, out)


def swiglu_quant(gate: torch.Tensor, up: torch.Tensor, per_group: bool = False,
                 config: KernelConfig | None = None, out=None):
    """quantize(silu(gate) * up) in one pass. gate, up (M, I) with unit column stride (views into one
    (M, 2I) GEMM output are fine). The product is rounded to gate.dtype before quantization."""
    _check_rows(gate, "gate")
    _check_rows(up, "up")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: {tuple(gate.shape)} {gate.dtype} vs "
                         f"{tuple(up.shape)} {up.dtype}")
    return _launch(gate, up, None, 0.0, _SWIGLU, per_group, config, out)
