"""Block-scaled FP8 grouped GEMM for the routed experts of one MoE layer, and the steps around it.

The pipeline (``fused_experts``), for T tokens routed to top-k of E experts, in one of two layouts.

Sorted layout (the serving path wherever d and I are multiples of 16; experts packed with
``interleave=64``):

1. ``moe_align(..., with_pos=True)``: sort the T*k (token, slot) pairs by expert and pad each expert's
   segment to a multiple of ALIGN_M rows, with torch ops and no host synchronisation (buffers are sized
   for the worst case); pos = the padded row of each pair, and the count of used blocks.
2. ``act_quant.per_group_quant_sorted(x, pos)``: 1x128-group FP8 activations, quantized once per token
   and stored at each of its padded rows, so the GEMMs read A through TMA.
3. ``grouped_gemm_sorted(..., swiglu=True)``: persistent, one launch for every expert's gate and up
   projection against the packed [E, 2*Ip, d] weight; the epilogue applies SwiGLU and quantizes the
   result in 1x128 groups, so the down projection's input is written once, as FP8.
4. ``grouped_gemm_sorted(..., swiglu=False)``: the down projections, rows written in padded order.
5. ``combine_topk(y, w, pos)``: out[t] = sum_j w[t, j] * y[pos[t, j]], summed in float32 (deterministic,
   no atomics).

Gather layout (the fallback; ``interleave=128``): ``per_group_quant(x)`` per token, then
``grouped_gemm_block_fp8`` (gate/up gathering the token rows with pointer loads; down scattering its
rows to (token, slot) order), then ``combine_topk(y, w)``.

Numerics follow the reference backend: gate/up outputs are rounded to the activation dtype before
SwiGLU, SwiGLU's output is rounded before its quantization, each expert's output is rounded before the
weighted float32 sum. Weight scales are per 128x128 block, activation scales per 1x128 group; both are
applied to each K block's partial product (BLOCK_K must be 128).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fp8conv.kernels.act_quant import (fp8_scale, per_group_quant, per_group_quant_sorted, quantize_values,
                                       round_to, sw_round)
from fp8conv.kernels.config import KernelConfig, default_config, sorted_rows_aligned
# the persistent-loop helpers are fp8_gemm's (tile swizzle, SM count, tensor-descriptor import)
from fp8conv.kernels.fp8_gemm import _num_sms, _tensor_descriptor, _tile_coords, quad_pair_order

KERNEL_NAME = "fp8_grouped_gemm"
GLUON_KERNEL = "fp8_grouped_gemm_gluon"  # its own defaults and tuning cache entries
BLOCK = 128
# w13's gate/up row interleave for each layout of fused_experts (pack_experts)
INTERLEAVE = {"gluon": 1, "sorted": 64, "gather": 128}
_ACT_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


# -- packing (load time) -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedExperts:
    """w13: [E, 2*Ip, d] fp8; with interleave 128 gate block j at rows [256j, 256j+128), up block j at
    [256j+128, 256j+256); with interleave 64 rows [256j, 256j+256) are gate rows 128j..128j+63, the
    same up rows, gate rows 128j+64..128j+127, the same up rows;
    s13: [E, 2*Ip/128, ceil(d/128)] float32 in the same order; w2: [E, d, I] fp8; s2: [E, ceil(d/128),
    ceil(I/128)]. Ip = I rounded up to 128: padded rows are zero, so no block straddles gate and up."""

    w13: torch.Tensor
    s13: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor
    inter: int
    # rows per gate/up run in w13: 128 (the gather-layout kernel's 256-row tiles: gate block, up block)
    # or 64 (the sorted-layout kernel: each 128-row load is 64 gate + 64 up rows of one block pair, so
    # one 128x128 dot computes both halves of 64 SwiGLU columns) or 1 (the Gluon sorted kernel: gate
    # and up rows alternate, so each thread of the wgmma holds a gate column next to its up column;
    # within each 128-row tile they are reordered by gluon_w13_order, so that the 16 SwiGLU columns a
    # thread holds per row are contiguous)
    interleave: int = 128

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]


def _interleave_blocks(g: torch.Tensor, u: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    e, r = g.shape[0], g.shape[1]
    nb = r // rows_per_block
    rest = g.shape[2:]
    g = g.reshape(e, nb, rows_per_block, *rest)
    u = u.reshape(e, nb, rows_per_block, *rest)
    return torch.stack([g, u], dim=2).reshape(e, 2 * r, *rest)


def gluon_w13_order(rows: int) -> torch.Tensor:
    """The Gluon kernel's order of w13 rows (interleave 1): row 8j + 2t + s of each 128-row tile is gate
    (s = 0) or up (s = 1) row 16t + j of the tile's 64 (j < 16, t < 4). In the wgmma accumulator thread t
    of a quad holds columns 2t, 2t + 1 of every 8, so after SwiGLU it holds columns 16t..16t+15 of each of
    its rows: 16 contiguous values, one 16-byte shared-memory store per row in FP8 and two for the bf16
    stash, where alternating rows alone left it every 4th column, stored a byte (a half) at a time.
    Returns the plain alternating order's row index (gate row c at 2c, up at 2c + 1) of each packed row."""
    if rows % 128:
        raise ValueError(f"w13 rows must be a multiple of 128, got {rows}")
    pair = quad_pair_order(rows // 2, 64)  # packed pair 4j + t computes SwiGLU column 16t + j of its tile
    return (2 * pair[:, None] + torch.arange(2)).reshape(rows)  # its gate (s 0) and up (s 1) rows


def pack_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gate_scale: torch.Tensor,
                 up_scale: torch.Tensor, down_scale: torch.Tensor, interleave: int = 128) -> PackedExperts:
    """Pack ops.Experts-style block-FP8 tensors (gate/up [E, I, d], down [E, d, I], block scales
    [E, ceil(rows/128), ceil(cols/128)]) for the grouped kernels: interleave 128 for the gather-layout
    kernel (grouped_gemm_block_fp8), 64 for the sorted-layout one (grouped_gemm_sorted), 1 for its
    Gluon form (kernels/grouped_gemm_gluon.py, the opt-in "gluon" layout). Serving packs with
    INTERLEAVE[expert_layout(d, I)]. See PackedExperts and fused_experts."""
    if interleave not in INTERLEAVE.values():
        raise ValueError(f"interleave must be 1, 64 or 128, got {interleave!r}")
    for t, name in ((gate, "gate"), (up, "up"), (down, "down")):
        if t.dtype != torch.float8_e4m3fn:
            raise ValueError(f"Expected experts.{name} to be torch.float8_e4m3fn, got {t.dtype} instead.")
    e, inter, d = gate.shape
    if up.shape != gate.shape or down.shape != (e, d, inter):
        raise ValueError(f"expert shapes disagree: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                         f"down {tuple(down.shape)}")
    ib, db = triton.cdiv(inter, BLOCK), triton.cdiv(d, BLOCK)
    for s, want, name in ((gate_scale, (e, ib, db), "gate"), (up_scale, (e, ib, db), "up"),
                          (down_scale, (e, db, ib), "down")):
        if s is None or tuple(s.shape) != want:
            raise ValueError(f"Expected experts.{name}_scale of shape {want} (128x128 blocks), got "
                             f"{None if s is None else tuple(s.shape)}")
    ip = ib * BLOCK
    pad = ip - inter
    g8 = gate.view(torch.uint8)  # plain bytes: padding and stacking need no FP8 kernels
    u8 = up.view(torch.uint8)
    if pad:
        g8 = torch.nn.functional.pad(g8, (0, 0, 0, pad))
        u8 = torch.nn.functional.pad(u8, (0, 0, 0, pad))
    w13 = _interleave_blocks(g8, u8, interleave)
    if interleave == 1:
        w13 = w13[:, gluon_w13_order(w13.shape[1]).to(w13.device)]
    w13 = w13.contiguous().view(torch.float8_e4m3fn)
    s13 = _interleave_blocks(gate_scale.float(), up_scale.float(), 1).contiguous()  # by 128-row block pair
    return PackedExperts(w13, s13, down.contiguous(), down_scale.float().contiguous(), inter, interleave)


# -- align / permute -----------------------------------------------------------------------------------

def moe_align(topk_ids: torch.Tensor, num_experts: int, align_m: int, with_pos: bool = False):
    """Group the T*k routed rows by expert, each expert's segment padded to a multiple of align_m.

    Returns (sorted_ids int32 [P], block_expert int32 [P // align_m]) with P = T*k + E*(align_m-1)
    rounded up to align_m (the worst case, so nothing waits on the GPU): sorted_ids[p] is the flat
    (token*k + slot) index of padded row p, or T*k for padding; block_expert[b] is the expert of rows
    [b*align_m, (b+1)*align_m), or -1 past the last used block.
    with_pos: also (pos int32 (T, k): the padded row of each (token, slot), the inverse of sorted_ids;
    used_blocks int32 (1,): how many blocks of align_m rows are used), still without a host sync.
    """
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.index_add_(0, flat, torch.ones_like(flat))  # bincount without a host sync
    padded = (counts + align_m - 1) // align_m * align_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    exp_sorted = flat[order]
    pos = pad_start[exp_sorted] + torch.arange(n, device=dev) - cnt_start[exp_sorted]
    total = triton.cdiv(n + num_experts * (align_m - 1), align_m) * align_m
    sorted_ids = torch.full((total,), n, dtype=torch.int32, device=dev)
    sorted_ids[pos] = order.to(torch.int32)
    starts = torch.arange(0, total, align_m, device=dev)
    block_expert = torch.searchsorted(pad_end, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    if not with_pos:
        return sorted_ids, block_expert
    inv = torch.empty(n, dtype=torch.int32, device=dev)
    inv[order] = pos.to(torch.int32)
    used = (pad_end[-1:] // align_m).to(torch.int32) if num_experts else torch.zeros(1, dtype=torch.int32,
                                                                                       device=dev)
    return sorted_ids, block_expert, inv.view(topk_ids.shape), used


# -- the grouped GEMM ----------------------------------------------------------------------------------

@triton.jit
def _swiglu_quant(g, u, valid, ACT: tl.constexpr, SW_ROUND: tl.constexpr):
    """(q, scale) of silu(g) * u for a (rows, 128) tile: one 1x128 group per row; rows not ``valid``
    (padding) give zeros with scale 1, whatever their inputs held."""
    h = _swiglu(g, u, valid, ACT)
    scale = fp8_scale(tl.max(tl.abs(h), axis=1))
    q = quantize_values(h, scale[:, None], ACT != 2, SW_ROUND)  # FAST_DIV for bf16/fp16 values
    return q, scale


@triton.jit
def _swiglu(g, u, valid, ACT: tl.constexpr):
    """silu(g) * u, rows not ``valid`` (padding) zero whatever their inputs held. Rounded like the
    reference: the gate/up outputs, then SwiGLU's, in the activation dtype (ACT 0 bf16, 1 fp16, 2 fp32)."""
    if ACT == 0:
        g, u = round_to(g, tl.bfloat16), round_to(u, tl.bfloat16)
    elif ACT == 1:
        g, u = round_to(g, tl.float16), round_to(u, tl.float16)
    h = g * tl.sigmoid(g) * u
    if ACT == 0:
        h = round_to(h, tl.bfloat16)
    elif ACT == 1:
        h = round_to(h, tl.float16)
    return tl.where(valid[:, None], h, 0.0)


@triton.jit
def _grouped_gemm_block_fp8_kernel(
    # A (rows, K) fp8 + group scales (rows, ceil(K/128)); B [E, N, K] fp8 + block scales [E, N/128, K/128]
    a_ptr, as_ptr, b_ptr, bs_ptr,
    # routing: sorted_ids [P], block_expert [P / ALIGN_M]
    sid_ptr, bexp_ptr,
    # outputs: SWIGLU: q (P, N/2) fp8 + scales (P, N/256); else y (num_valid, N) at row sorted_ids[p]
    c_ptr, cs_ptr,
    N, K, num_valid,
    stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm, stride_csm,
    # meta
    TOPK: tl.constexpr, GATHER: tl.constexpr, SWIGLU: tl.constexpr, ACT: tl.constexpr,
    A_TMA: tl.constexpr, B_TMA: tl.constexpr, SPLIT_GU: tl.constexpr,
    ALIGN_M: tl.constexpr, SW_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.num_programs(0) // num_pid_n, num_pid_n, GROUP_M)

    expert = tl.load(bexp_ptr + (pid_m * BLOCK_M) // ALIGN_M).to(tl.int64)
    if expert < 0:
        return
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(sid_ptr + offs_p)
    valid = tok < num_valid
    if GATHER:
        a_row = tl.where(valid, tok // TOPK, 0).to(tl.int64)
    else:
        a_row = offs_p.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if not A_TMA:
        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
    if not B_TMA and not SPLIT_GU:
        b_ptrs = b_ptr + expert * stride_be + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
    as_ptrs = as_ptr + a_row * stride_asm
    bs_ptrs = bs_ptr + expert * stride_bse + (offs_n // BLOCK_K) * stride_bsn
    nmask = offs_n < N
    if SPLIT_GU:
        # gate and up as two (BLOCK_M, 128) accumulators, one 128x128 weight block each per K step:
        # scalar block scales and no reshuffle of a 256-wide accumulator in the epilogue
        HALF: tl.constexpr = BLOCK_N // 2
        row0 = expert * N + pid_n * BLOCK_N
        if not B_TMA:
            offs_h = tl.arange(0, HALF)
            bg_ptrs = b_ptr + row0 * stride_bn + offs_h[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
        bs_g = bs_ptr + expert * stride_bse + (2 * pid_n) * stride_bsn
        g = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            kmask = (offs_k + kb * BLOCK_K) < K
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=valid[:, None] & kmask[None, :], other=0.0)
            if B_TMA:
                bg = b_ptr.load([row0.to(tl.int32), kb * BLOCK_K])
                bu = b_ptr.load([(row0 + HALF).to(tl.int32), kb * BLOCK_K])
            else:
                bg = tl.load(bg_ptrs + kb * BLOCK_K, mask=kmask[None, :], other=0.0)
                bu = tl.load(bg_ptrs + HALF * stride_bn + kb * BLOCK_K, mask=kmask[None, :], other=0.0)
            sa = tl.load(as_ptrs + kb, mask=valid, other=0.0)
            sg = tl.load(bs_g + kb)
            su = tl.load(bs_g + stride_bsn + kb)
            g += tl.dot(a, bg.T) * (sa * sg)[:, None]
            u += tl.dot(a, bu.T) * (sa * su)[:, None]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            kmask = (offs_k + kb * BLOCK_K) < K
            if A_TMA:  # rows contiguous in padded order; zero-filled past K
                a = a_ptr.load([pid_m * BLOCK_M, kb * BLOCK_K])
            else:
                a = tl.load(a_ptrs + kb * BLOCK_K, mask=valid[:, None] & kmask[None, :], other=0.0)
            if B_TMA:  # [E*N, K] view; rows past this expert's N only feed masked-out columns
                b = b_ptr.load([(expert * N + pid_n * BLOCK_N).to(tl.int32), kb * BLOCK_K])
            else:
                b = tl.load(b_ptrs + kb * BLOCK_K, mask=nmask[:, None] & kmask[None, :], other=0.0)
            sa = tl.load(as_ptrs + kb, mask=valid, other=0.0)
            sb = tl.load(bs_ptrs + kb, mask=nmask, other=0.0)
            # block scales change every K block, so each block's product is scaled before accumulation
            acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])

    if SWIGLU:
        if not SPLIT_GU:
            # tile columns = [gate block, up block] of one 128-row block pair
            g, u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        q, scale = _swiglu_quant(g, u, valid, ACT, SW_ROUND)
        offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        rows = offs_p.to(tl.int64)
        tl.store(c_ptr + rows[:, None] * stride_cm + offs_h[None, :], q.to(c_ptr.dtype.element_ty))
        tl.store(cs_ptr + rows * stride_csm + pid_n, scale)
    else:
        rows = tl.where(valid, tok, 0).to(tl.int64)
        c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
        y = round_to(acc, c_ptr.dtype.element_ty)  # RNE also under the interpreter
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


def _check_common(a, b, sorted_ids, swiglu: bool, out_dtype, align_m, config, kernel: str = KERNEL_NAME):
    """The checks both grouped launchers share; returns (config, align_m) with their defaults filled in
    (``kernel``'s default: GLUON_KERNEL's for the Gluon kernels)."""
    cfg = config or default_config(kernel, 1 + sorted_ids.numel() // max(1, b.shape[0]),
                                   b.shape[1], b.shape[2], gate_up=swiglu)
    align_m = align_m or cfg.BLOCK_M
    if cfg.BLOCK_K != BLOCK:
        raise ValueError(f"the block-scaled grouped GEMM needs BLOCK_K == 128 (one scale block per K "
                         f"step), got {cfg.BLOCK_K}")
    if align_m % cfg.BLOCK_M:
        raise ValueError(f"BLOCK_M {cfg.BLOCK_M} must divide the alignment {align_m} of the sorted rows")
    for t, name in ((a, "a"), (b, "b")):
        if t.dtype != torch.float8_e4m3fn:
            raise ValueError(f"Expected {name} to be torch.float8_e4m3fn, got {t.dtype} instead.")
    if out_dtype not in _ACT_CODE:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    return cfg, align_m


def _outputs(want: list, out, swiglu: bool, device) -> tuple:
    """(c, cs): new tensors of ``want``'s (shape, dtype)s, or the caller's ``out`` after checking it
    (cs is c again for the down GEMM)."""
    if out is None:
        outs = [torch.empty(shape, dtype=dt, device=device) for shape, dt in want]
    else:
        outs = list(out) if swiglu else [out]
        if [(tuple(o.shape), o.dtype) for o in outs] != want or not all(o.is_contiguous() for o in outs):
            raise ValueError(f"out must be contiguous tensors of (shape, dtype) {want}")
    return (outs[0], outs[1]) if swiglu else (outs[0], outs[0])


def grouped_gemm_block_fp8(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                           sorted_ids: torch.Tensor, block_expert: torch.Tensor, *, topk: int,
                           swiglu: bool, out_dtype: torch.dtype = torch.bfloat16, align_m: int | None = None,
                           num_valid: int | None = None, config: KernelConfig | None = None, out=None,
                           use_tma: bool = True, split_gate_up: bool = True):
    """Block-scaled FP8 grouped GEMM over expert-sorted rows, one launch for all experts.

    Rows: ``sorted_ids``/``block_expert`` from ``moe_align(topk_ids, E, align_m)``; P = len(sorted_ids).
    b:       [E, N, K] float8_e4m3fn, contiguous (packed w13 with N = 2*Ip when swiglu, else w2).
    b_scale: [E, ceil(N/128), ceil(K/128)] float32, contiguous (128x128 blocks).
    swiglu=True (gate/up): a is (T, K) fp8 = the per-token activations (row of padded row p is
      sorted_ids[p] // topk), a_scale (T, ceil(K/128)) float32; N % 256 == 0; returns
      (h_q (P, N/2) fp8, h_scale (P, N/256) float32): SwiGLU of the gate/up halves rounded to
      ``out_dtype`` and quantized in 1x128 groups; padding rows hold zeros (scale 1).
    swiglu=False (down): a is (P, K') fp8 in padded order (h_q above; K' >= K, extra columns ignored),
      a_scale (P, ceil(K'/128)); returns y (T*topk, N) ``out_dtype``, row sorted_ids[p] = expert output.
    out: optional preallocated contiguous outputs of those shapes ((h_q, h_scale) or y).
    use_tma: load B (and the down GEMM's A) through TMA descriptors when K % 16 == 0 (default).
    split_gate_up: gate/up as two 128-wide accumulators (default) instead of one 256-wide one.
    Strides: a, a_scale unit column stride. Any K (masked); BLOCK_K must be 128; swiglu needs
    BLOCK_N == 256; BLOCK_M must divide align_m (default: config.BLOCK_M).
    """
    cfg, align_m = _check_common(a, b, sorted_ids, swiglu, out_dtype, align_m, config)
    e, n, k = b.shape
    b, b_scale = b.contiguous(), b_scale.contiguous()
    if tuple(b_scale.shape) != (e, triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)):
        raise ValueError(f"Expected b_scale of shape {(e, triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))}, "
                         f"got {tuple(b_scale.shape)}")
    if a.stride(1) != 1 or a_scale.stride(1) != 1 or a.shape[1] < k:
        raise ValueError(f"a must be (rows, >= {k}) with unit column stride; got {tuple(a.shape)} {a.stride()}")
    p = sorted_ids.numel()
    if p % align_m or block_expert.numel() != p // align_m:
        raise ValueError("sorted_ids / block_expert do not come from moe_align with this align_m")
    num_valid = topk * a.shape[0] if (swiglu and num_valid is None) else num_valid
    if num_valid is None:
        raise ValueError("num_valid (T * topk) is required for the down GEMM")
    if swiglu:
        if n % (2 * BLOCK) or cfg.BLOCK_N != 2 * BLOCK:
            raise ValueError(f"the fused gate/up GEMM needs N % 256 == 0 and BLOCK_N == 256, got N={n}, "
                             f"BLOCK_N={cfg.BLOCK_N}")
        want = [((p, n // 2), torch.float8_e4m3fn), ((p, n // (2 * BLOCK)), torch.float32)]
    else:
        want = [((num_valid, n), out_dtype)]
    c, cs = _outputs(want, out, swiglu, a.device)
    if p == 0:
        return (c, cs) if swiglu else c
    grid = ((p // cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N),)
    # TMA descriptors where the layout allows (16-byte aligned rows); pointer loads otherwise
    TD = _tensor_descriptor() if use_tma else None
    b_tma = TD is not None and k % 16 == 0
    a_tma = TD is not None and not swiglu and a.is_contiguous() and a.shape[1] % 16 == 0
    b_rows = cfg.BLOCK_N // 2 if (swiglu and split_gate_up) else cfg.BLOCK_N  # split: one block per load
    b_arg = TD.from_tensor(b.view(e * n, k), [b_rows, cfg.BLOCK_K]) if b_tma else b
    a_arg = TD.from_tensor(a, [cfg.BLOCK_M, cfg.BLOCK_K]) if a_tma else a
    _grouped_gemm_block_fp8_kernel[grid](
        a_arg, a_scale, b_arg, b_scale, sorted_ids, block_expert, c, cs,
        n, k, num_valid,
        a.stride(0), a_scale.stride(0), b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1),
        c.stride(0), cs.stride(0),
        TOPK=topk, GATHER=swiglu, SWIGLU=swiglu, ACT=_ACT_CODE[out_dtype], A_TMA=a_tma, B_TMA=b_tma,
        SPLIT_GU=swiglu and split_gate_up,
        ALIGN_M=align_m, SW_ROUND=sw_round(),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (c, cs) if swiglu else c


# -- the persistent grouped GEMM on expert-sorted rows ------------------------------------------------
#
# The serving path on Hopper (fused_experts, when TMA applies): the token activations are quantized
# straight into expert-sorted padded rows (act_quant.per_group_quant_sorted, each token stored once per
# routed slot), so both GEMMs read A through TMA; the down GEMM writes its rows in that order too and
# the combine gathers them (combine_topk(..., pos)). One program per SM walks the used tiles (the count
# of used blocks is read on the GPU: no host sync), its tile loop and K loop flattened into one software
# pipeline, so a tile's loads start while the previous tile's epilogue runs.

@triton.jit
def _grouped_sorted_kernel(
    # A descriptor over (P, K) fp8 expert-sorted rows, box [BLOCK_M, BLOCK_K]; scales K-major
    # (ceil(K/128), P) float32. B descriptor over [E*N, K] fp8, box [128 (SWIGLU) or BLOCK_N, BLOCK_K];
    # block scales [E, N/128, ceil(K/128)]
    a_desc, as_ptr, b_desc, bs_ptr,
    # sorted_ids [P] (padding rows hold num_valid), block_expert [P / ALIGN_M], used blocks (1,)
    sid_ptr, bexp_ptr, used_ptr,
    # SWIGLU: q descriptor over (P, N/2) fp8, box [BLOCK_M, 64], scales K-major (N/256, P);
    # else y descriptor over (P, N), box [BLOCK_M, BLOCK_N]
    c_desc, cs_ptr,
    P, N, K, num_valid, stride_bse, stride_bsn,
    SWIGLU: tl.constexpr, ACT: tl.constexpr, ALIGN_M: tl.constexpr, SW_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    # SWIGLU (w13 packed with interleave 64, BLOCK_N 256 = one 128-wide group of SwiGLU outputs): a
    # tile is two work items, its halves; half j is one 128x128 dot per K step over w13 rows
    # [256 pid_n + 128 j, +128) = 64 gate + 64 up rows, whose 64 SwiGLU columns wait in registers
    # (h_lo) until the second half's are there for the group's amax
    ITEMS: tl.constexpr = 2 if SWIGLU else 1
    num_pid_m = tl.load(used_ptr) * (ALIGN_M // BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid = tl.program_id(0)
    progs = tl.num_programs(0)  # SMs x programs per SM (grouped_gemm_sorted)
    my_tiles = tl.cdiv(tl.maximum(num_pid_m * num_pid_n - pid, 0), progs)
    HALF: tl.constexpr = 64
    h_lo = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    for it in tl.range(0, my_tiles * ITEMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(pid + (it // ITEMS) * progs, num_pid_m, num_pid_n, GROUP_M)
        part = it % ITEMS
        off_m = pid_m * BLOCK_M
        offs_m = off_m + tl.arange(0, BLOCK_M)
        expert = tl.load(bexp_ptr + off_m // ALIGN_M)
        bs_base = bs_ptr + expert.to(tl.int64) * stride_bse
        if SWIGLU:
            row0 = expert * N + pid_n * BLOCK_N + part * (BLOCK_N // 2)
            is_up = tl.arange(0, BLOCK_N // 2) >= HALF
            acc = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
            for kb in range(0, k_tiles):
                a = a_desc.load([off_m, kb * BLOCK_K])
                b = b_desc.load([row0, kb * BLOCK_K])
                sa = tl.load(as_ptr + kb * P + offs_m)
                sg = tl.load(bs_base + (2 * pid_n) * stride_bsn + kb)
                su = tl.load(bs_base + (2 * pid_n + 1) * stride_bsn + kb)
                acc += tl.dot(a, b.T) * (sa[:, None] * tl.where(is_up, su, sg)[None, :])
            g, u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
            valid = tl.load(sid_ptr + offs_m) < num_valid
            h = _swiglu(g, u, valid, ACT)
            # written at the second half (h_lo: the first half's columns, the previous item's h); the
            # first half's stores land past row P, where TMA drops them -- Triton 3.6's loop fusion
            # failed on stores under an `if` here (and on an h_lo assigned under one)
            scale = fp8_scale(tl.maximum(tl.max(tl.abs(h_lo), axis=1), tl.max(tl.abs(h), axis=1)))
            q_lo = quantize_values(h_lo, scale[:, None], ACT != 2, SW_ROUND)
            q_hi = quantize_values(h, scale[:, None], ACT != 2, SW_ROUND)
            row_out = off_m + (1 - part) * P
            c_desc.store([row_out, pid_n * (2 * HALF)], q_lo.to(c_desc.dtype))
            c_desc.store([row_out, pid_n * (2 * HALF) + HALF], q_hi.to(c_desc.dtype))
            tl.store(cs_ptr + pid_n * P + offs_m, scale, mask=offs_m < part * P)  # second half only
            h_lo = h
        else:
            row0 = expert * N + pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            for kb in range(0, k_tiles):
                a = a_desc.load([off_m, kb * BLOCK_K])
                b = b_desc.load([row0, kb * BLOCK_K])  # rows past this expert's N feed dropped columns
                sa = tl.load(as_ptr + kb * P + offs_m)
                if BLOCK_N <= BLOCK_K:  # the tile lies in one 128-row scale block: a scalar scale
                    sb = tl.load(bs_base + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn + kb)
                    acc += tl.dot(a, b.T) * (sa * sb)[:, None]
                else:
                    sb = tl.load(bs_base + (offs_n // BLOCK_K) * stride_bsn + kb, mask=offs_n < N, other=0.0)
                    acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
            y = round_to(acc, c_desc.dtype)  # RNE also under the interpreter
            c_desc.store([off_m, pid_n * BLOCK_N], y.to(c_desc.dtype))


_GLUON = None


# the Triton minor version whose Gluon API the kernels are written against (3.9 renamed the TMA copies
# to async_load / async_store and changed warp_specialize's arguments; Gluon is experimental): elsewhere
# the tl.dot kernels run
GLUON_TRITON = "3.6"


def _gluon():
    """kernels/grouped_gemm_gluon.py, or None where this Triton is not GLUON_TRITON or lacks Gluon."""
    global _GLUON
    if _GLUON is None:
        _GLUON = False
        if ".".join(triton.__version__.split(".")[:2]) == GLUON_TRITON:
            try:
                from fp8conv.kernels import grouped_gemm_gluon
                _GLUON = grouped_gemm_gluon
            except Exception:  # ImportError: a build without Gluon's Hopper modules
                pass
    return _GLUON or None


def gluon_ok(device) -> bool:
    """Whether the Gluon sorted-layout kernels can run on ``device``: CUDA, compute capability 9.x (wgmma),
    and Triton GLUON_TRITON with Gluon; FP8CONV_GLUON=0 turns them off (the tl.dot kernels run instead)."""
    device = torch.device(device)
    return (device.type == "cuda" and os.environ.get("FP8CONV_GLUON", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] == 9 and _gluon() is not None)


def gluon_config_ok(cfg: KernelConfig, swiglu: bool) -> bool:
    """Whether ``cfg`` suits the Gluon kernels: a warpgroup per 64 rows (BLOCK_M 64 at 4 warps: one
    warpgroup with asynchronous wgmma, whose three 64 x 128 float32 products take ~250 registers; 128 at
    8 or 192 at 12: two or three consumer warpgroups and a TMA warp), BLOCK_N 256 for gate/up (two
    128-row items) and 64 or 128 for down (one weight scale block per tile)."""
    return (cfg.BLOCK_M in (64, 128, 192) and cfg.num_warps == cfg.BLOCK_M // 16 and cfg.BLOCK_K == BLOCK
            and (cfg.BLOCK_N == 2 * BLOCK if swiglu else cfg.BLOCK_N in (64, BLOCK)) and cfg.num_stages >= 2)


def expert_layout(d: int, inter: int, device=None) -> str:
    """fused_experts' serving layout for hidden size d and expert width inter on ``device``: "gluon" (both
    GEMMs in Gluon) where rows are 16-byte aligned and gluon_ok(device), "sorted" (tl.dot) where rows are
    aligned, else "gather". Pack with INTERLEAVE[expert_layout(...)]. H100, the 4b experts' two GEMMs
    (docs/benchmarks.md, seventh run): Gluon 793-812 us at 16384 tokens against 976-995 on tl.dot, 271-274
    against 274-276 at 4096; 2-3% behind at 32 and 512 tokens."""
    if not sorted_path_ok(d, inter):
        return "gather"
    return "gluon" if device is not None and gluon_ok(device) else "sorted"


def layout_kernels(layout: str) -> tuple[str, str]:
    """The (gate/up, down) kernels (tuning cache names) fused_experts runs in ``layout``."""
    return (GLUON_KERNEL, GLUON_KERNEL) if layout == "gluon" else (KERNEL_NAME, KERNEL_NAME)


def sorted_path_ok(d: int, inter: int) -> bool:
    """Whether fused_experts can take the persistent sorted-layout kernels for hidden size d and expert
    width inter: TMA descriptors (Triton >= 3.4) and 16-byte aligned rows (config.sorted_rows_aligned).
    Pack the experts with interleave=64 where this holds."""
    return _tensor_descriptor() is not None and sorted_rows_aligned(d, inter)


def grouped_gemm_sorted(a: torch.Tensor, a_scale_t: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                        sorted_ids: torch.Tensor, block_expert: torch.Tensor, used_blocks: torch.Tensor, *,
                        swiglu: bool, num_valid: int, out_dtype: torch.dtype = torch.bfloat16,
                        align_m: int | None = None, config: KernelConfig | None = None, out=None,
                        programs_per_sm: int | None = None, impl: str = "triton"):
    """Block-scaled FP8 grouped GEMM on expert-sorted rows: persistent, TMA for A, B and the output.

    Rows: ``moe_align(topk_ids, E, align_m, with_pos=True)`` gives sorted_ids, block_expert and
    used_blocks; P = len(sorted_ids); row p of every operand here is padded row p.
    a: (P, K') fp8 contiguous, K' >= K (columns past K must be zero or meet zero weights: the packed h
      of the gate/up call); a_scale_t: (ceil(K'/128), P) float32 contiguous (K-major).
    b: [E, N, K] fp8 contiguous, K % 16 == 0; b_scale: [E, ceil(N/128), ceil(K/128)] float32.
    swiglu=True (gate/up, b = w13 of pack_experts(..., interleave=64), N % 256 == 0, BLOCK_N == 256): returns (h_q (P, N/2) fp8,
      h_scale_t (N/256, P) float32), SwiGLU of the gate/up halves rounded to ``out_dtype`` and quantized
      in 1x128 groups; padding rows (sorted_ids[p] >= num_valid) are zeros with scale 1.
    swiglu=False (down): returns y (P, N) ``out_dtype``, row p = the expert output of padded row p;
      padding rows hold the product of their inputs (zeros for a padded h from the gate/up call) and
      are never read by combine_topk(y, w, pos).
    Rows of unused blocks (past used_blocks) are not written.
    programs_per_sm: the persistent grid's programs per SM (None: as many as fit, _programs_per_sm).
    impl: "triton" (tl.dot; b = w13 packed with interleave 64 for swiglu) or "gluon" (the Hopper kernel
      of kernels/grouped_gemm_gluon.py, where gluon_ok(device); b = w13 packed with interleave 1 for
      swiglu; config must pass gluon_config_ok).
    """
    cfg, align_m = _check_common(a, b, sorted_ids, swiglu, out_dtype, align_m, config,
                                 GLUON_KERNEL if impl == "gluon" else KERNEL_NAME)
    TD = _tensor_descriptor()
    if TD is None:
        raise RuntimeError("grouped_gemm_sorted needs Triton tensor descriptors (Triton >= 3.4)")
    e, n, k = b.shape
    p = sorted_ids.numel()
    if not b.is_contiguous() or k % 16:
        raise ValueError(f"b must be a contiguous [E, N, K] tensor with K % 16 == 0, got {tuple(b.shape)}")
    if tuple(b_scale.shape) != (e, triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)) or not b_scale.is_contiguous():
        raise ValueError(f"Expected a contiguous b_scale of shape {(e, triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))}, "
                         f"got {tuple(b_scale.shape)}")
    if a.dim() != 2 or a.shape[0] != p or a.shape[1] < k or not a.is_contiguous() or a.shape[1] % 16:
        raise ValueError(f"a must be a contiguous ({p}, >= {k}) tensor in sorted rows with a row of a multiple "
                         f"of 16 bytes, got {tuple(a.shape)}")
    if tuple(a_scale_t.shape) != (triton.cdiv(a.shape[1], BLOCK), p) or not a_scale_t.is_contiguous():
        raise ValueError(f"Expected a contiguous K-major a_scale_t of shape {(triton.cdiv(a.shape[1], BLOCK), p)}, "
                         f"got {tuple(a_scale_t.shape)}")
    if p % align_m or block_expert.numel() != p // align_m or used_blocks.numel() != 1:
        raise ValueError("sorted_ids / block_expert / used_blocks do not come from moe_align with this align_m")
    if swiglu:
        if n % (2 * BLOCK) or cfg.BLOCK_N != 2 * BLOCK:
            raise ValueError(f"the fused gate/up GEMM needs N % 256 == 0 and BLOCK_N == 256, got N={n}, "
                             f"BLOCK_N={cfg.BLOCK_N}")
        want = [((p, n // 2), torch.float8_e4m3fn), ((n // (2 * BLOCK), p), torch.float32)]
    else:
        if (n * torch.empty((), dtype=out_dtype).element_size()) % 16:
            raise ValueError(f"the down GEMM's output rows must be a multiple of 16 bytes, got N={n} {out_dtype}")
        want = [((p, n), out_dtype)]
    c, cs = _outputs(want, out, swiglu, a.device)
    if p == 0:
        return (c, cs) if swiglu else c
    tiles = (p // cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N)  # an upper bound: the used ones are fewer
    if impl == "gluon":
        if not gluon_ok(a.device):
            raise RuntimeError("the Gluon grouped GEMM needs a CUDA device of compute capability 9.x and Triton "
                               "with Gluon's Hopper API")
        if not gluon_config_ok(cfg, swiglu):
            raise ValueError(f"config {cfg} does not suit the Gluon grouped GEMM (gluon_config_ok)")
        gk = _gluon()
        launch = lambda progs, warmup=False: gk.launch_sorted(  # noqa: E731
            a, a_scale_t, b, b_scale, sorted_ids, block_expert, used_blocks, c, cs, swiglu=swiglu,
            num_valid=num_valid, out_dtype=out_dtype, align_m=align_m, block_m=cfg.BLOCK_M,
            block_n=BLOCK if swiglu else cfg.BLOCK_N, group_m=cfg.GROUP_M, stages=cfg.num_stages, programs=progs,
            warmup=warmup)
        if programs_per_sm is None:
            key = ("gluon", a.device.index, swiglu, out_dtype, cfg)
            programs_per_sm = _OCCUPANCY.get(key)
            if programs_per_sm is None:  # compiled, not run, for its registers and shared memory
                programs_per_sm = _OCCUPANCY[key] = _fit_per_sm(launch(1, warmup=True), cfg.num_warps, a.device)
        launch(min(programs_per_sm * _num_sms(a.device.index or 0), tiles))
        return (c, cs) if swiglu else c
    if impl != "triton":
        raise ValueError(f"impl must be 'triton' or 'gluon', got {impl!r}")
    b_rows = cfg.BLOCK_N // 2 if swiglu else cfg.BLOCK_N  # swiglu: one half (64 gate + 64 up rows) per load
    a_d = TD.from_tensor(a, [cfg.BLOCK_M, cfg.BLOCK_K])
    b_d = TD.from_tensor(b.view(e * n, k), [b_rows, cfg.BLOCK_K])
    c_d = TD.from_tensor(c, [cfg.BLOCK_M, BLOCK // 2 if swiglu else cfg.BLOCK_N])
    args = (a_d, a_scale_t, b_d, b_scale, sorted_ids, block_expert, used_blocks, c_d, cs,
            p, n, k, num_valid, b_scale.stride(0), b_scale.stride(1))
    meta = dict(SWIGLU=swiglu, ACT=_ACT_CODE[out_dtype], ALIGN_M=align_m, SW_ROUND=sw_round(),
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
                WARP_SPECIALIZE=bool(cfg.WARP_SPEC), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if programs_per_sm is None:
        programs_per_sm = _programs_per_sm(_grouped_sorted_kernel, args, meta, a.device)
    grid = (min(programs_per_sm * _num_sms(a.device.index or 0), tiles),)
    _grouped_sorted_kernel[grid](*args, **meta)
    return (c, cs) if swiglu else c


_OCCUPANCY: dict = {}


def _programs_per_sm(kernel, args, meta: dict, device: torch.device) -> int:
    """How many programs of this compiled kernel fit on one SM at once (registers, shared memory; at
    most 4), cached per device and meta-parameters. Each K step's product is scaled before it is
    accumulated, so a program waits for the tensor cores every step; a second resident program fills
    those waits (the persistent grid then runs that many programs per SM). 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    key = (device.index, tuple(sorted(meta.items())))
    occ = _OCCUPANCY.get(key)
    if occ is None:
        occ = _OCCUPANCY[key] = _fit_per_sm(kernel.warmup(*args, grid=(1,), **meta), meta["num_warps"], device)
    return occ


def _fit_per_sm(compiled, num_warps: int, device: torch.device) -> int:
    """How many blocks of a compiled kernel fit on one SM by registers and shared memory (1 to 4)."""
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    by_regs = regs // max(1, compiled.n_regs * 32 * num_warps)
    by_smem = smem // (compiled.metadata.shared + 1024)  # + the 1 KiB each block reserves
    return max(1, min(4, by_regs, by_smem))


# -- combine ---------------------------------------------------------------------------------------------

@triton.jit
def _combine_kernel(y_ptr, w_ptr, pos_ptr, out_ptr, D, TOPK: tl.constexpr, GATHER: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        if GATHER:
            row = tl.load(pos_ptr + t * TOPK + j).to(tl.int64)
        else:
            row = t * TOPK + j
        y = tl.load(y_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        acc += y * tl.load(w_ptr + t * TOPK + j)
    acc = round_to(acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_topk(y: torch.Tensor, topk_weights: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * y[row(t, j)] in y.dtype, float32 sum in slot order. y (rows, d)
    contiguous; topk_weights (T, k); row(t, j) = t*k + j, or pos[t, j] (int32 (T, k), moe_align's pos)
    when y holds the down GEMM's rows in expert-sorted order."""
    t, k = topk_weights.shape
    d = y.shape[1]
    if pos is not None and (tuple(pos.shape) != (t, k) or pos.dtype != torch.int32):
        raise ValueError(f"Expected pos to be a ({t}, {k}) int32 tensor, got {tuple(pos.shape)} {pos.dtype}")
    out = torch.empty(t, d, dtype=y.dtype, device=y.device)
    if t:
        _combine_kernel[(t,)](y.contiguous(), topk_weights.float().contiguous(),
                              pos.contiguous() if pos is not None else y, out, d, TOPK=k,
                              GATHER=pos is not None, BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    return out


def fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, packed: PackedExperts,
                  config_gate_up: KernelConfig | None = None, config_down: KernelConfig | None = None,
                  layout: str = "auto"):
    """Routed experts, block FP8: x (T, d) bf16/fp16; topk_ids (T, k) int; topk_weights (T, k) float32
    -> (T, d) in x.dtype. Same result as ReferenceBackend.experts within the kernels' tolerance.
    layout: "sorted" (quantize x into expert-sorted rows, persistent TMA GEMMs, gather in the combine;
    needs sorted_path_ok and packed.interleave == 64), "gluon" (the same in Gluon; needs gluon_ok and
    interleave 1), "gather" (the GEMM gathers token rows, the down GEMM scatters its output; needs
    interleave 128), or "auto" (the one the packing was made for). Configs default to default_config of
    each GEMM's kernel (layout_kernels); one given to a Gluon GEMM must pass gluon_config_ok. The rows
    are aligned to the least common multiple of the two BLOCK_Ms (their defaults and the tuner keep one
    a multiple of the other)."""
    t, d = x.shape
    k = topk_ids.shape[1]
    e = packed.num_experts
    rows_per_expert = max(1, t * k // e)
    if layout == "auto":  # the layout the experts were packed for, where it applies
        layout = {v: k for k, v in INTERLEAVE.items()}[packed.interleave]
        if layout != "gather" and not sorted_path_ok(d, packed.inter):
            raise ValueError(f"experts packed with interleave={packed.interleave} need d and I multiples of 16 "
                             f"(d={d}, I={packed.inter}); pack with interleave=128")
    if layout not in INTERLEAVE:
        raise ValueError(f"layout must be 'auto', 'gluon', 'sorted' or 'gather', got {layout!r}")
    if packed.interleave != INTERLEAVE[layout]:
        raise ValueError(f"the {layout} layout needs experts packed with interleave={INTERLEAVE[layout]}")
    name1, name2 = layout_kernels(layout)
    cfg1 = config_gate_up or default_config(name1, rows_per_expert, packed.w13.shape[1], d, gate_up=True)
    cfg2 = config_down or default_config(name2, rows_per_expert, d, packed.inter, gate_up=False)
    align_m = math.lcm(cfg1.BLOCK_M, cfg2.BLOCK_M)
    if layout in ("sorted", "gluon"):
        sorted_ids, block_expert, pos, used = moe_align(topk_ids, e, align_m, with_pos=True)
        p = sorted_ids.numel()
        xq, xs = per_group_quant_sorted(x, pos, p)
        run = dict(sorted_ids=sorted_ids, block_expert=block_expert, used_blocks=used, num_valid=t * k,
                   out_dtype=x.dtype, align_m=align_m)
        impl = {GLUON_KERNEL: "gluon", KERNEL_NAME: "triton"}
        hq, hs = grouped_gemm_sorted(xq, xs, packed.w13, packed.s13, swiglu=True, config=cfg1, impl=impl[name1],
                                     **run)
        y = grouped_gemm_sorted(hq, hs, packed.w2, packed.s2, swiglu=False, config=cfg2, impl=impl[name2], **run)
        return combine_topk(y, topk_weights, pos)
    xq, xs = per_group_quant(x)
    sorted_ids, block_expert = moe_align(topk_ids, e, align_m)
    hq, hs = grouped_gemm_block_fp8(xq, xs, packed.w13, packed.s13, sorted_ids, block_expert, topk=k,
                                    swiglu=True, out_dtype=x.dtype, align_m=align_m, config=cfg1)
    y = grouped_gemm_block_fp8(hq, hs, packed.w2, packed.s2, sorted_ids, block_expert, topk=k,
                               swiglu=False, out_dtype=x.dtype, align_m=align_m, num_valid=t * k,
                               config=cfg2)
    return combine_topk(y, topk_weights)
