"""FP8 GEMM, per-token activation scales x per-channel weight scales, ``_nt`` layout.

    out[m, n] = (sum_k A[m, k] * B[n, k]) * a_scale[m] * b_scale[n]     (FP32 accumulate)

Two kernels compute the same thing:

- ``_fp8_gemm_nt_tma_kernel``: persistent (one program per SM walks the output tiles in GROUP_M-swizzled
  order), A/B tiles through TMA tensor descriptors (host-built ``TensorDescriptor``; out-of-bounds reads
  are zero-filled, out-of-bounds writes dropped, so M, N and K tails need no masks), ``tl.dot`` on FP8
  operands (wgmma on Hopper), scales applied once in the epilogue. Needs 16-byte aligned row strides:
  K % 16 == 0 and N % 8 == 0 (for a 2-byte output).
- ``_fp8_gemm_nt_kernel``: plain pointer loads with masks; any shape, any (unit-column) stride. Used
  when the TMA alignment does not hold, when the Triton build lacks tensor descriptors, or on request.

A third, ``kernels/fp8_gemm_gluon.py`` (Gluon, Hopper only), runs the plain GEMM where K needs FP32
promotion (K >= PROMOTE_MIN_K): each 64-row part of a tile is its own warpgroup with its own wgmma
chain, so one warpgroup's promotion overlaps the other's MMAs (``variant="gluon"``; "auto" takes it
there when ``gluon_dense_ok`` and the config is one of its forms, ``gluon_form``).

The first two take SWIGLU (``fp8_gemm_nt(..., swiglu=True)``): B holds a SwiGLU MLP's gate and up projections
pair-interleaved (row 2p = gate c, row 2p + 1 = up c, c = ``swiglu_order(I)[p]``: ``interleave_gate_up``),
and the epilogue writes silu(gate) * up, N / 2 columns. A wgmma accumulator thread holds output columns
in adjacent pairs, so the split into gate and up is a register rename, and the (M, 2I) gate/up output
never reaches memory: the MLP's down projection quantizes the (M, I) product directly.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from fp8conv.kernels.act_quant import round_to, swiglu_values
from fp8conv.kernels.config import HOPPER_MAX_SHARED, PROMOTE_DEFAULT, PROMOTE_MIN_K, KernelConfig, default_config

KERNEL_NAME = "fp8_gemm"


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # GROUP_M swizzle: consecutive tiles share a band of GROUP_M row blocks, so B tiles are reused from L2
    width = GROUP_M * num_pid_n
    group = tile // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % size_m
    pid_n = (tile % width) // size_m
    return pid_m, pid_n


@triton.jit
def _finish(acc, DTYPE: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The scaled float32 tile as stored, in DTYPE: rounded to nearest even (also under the
    interpreter); with SWIGLU, columns (2j, 2j + 1) are gate j and up j, and the tile becomes
    swiglu_values of the rounded pair, BLOCK_N // 2 columns: the unfused GEMM's output then act_quant's
    SwiGLU, bit for bit."""
    acc = round_to(acc, DTYPE)
    if SWIGLU:
        g, u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        acc = swiglu_values(g, u, DTYPE)
        if SWIGLU == 2:
            # quad order: pair p = 4 * c8 + q of each 64-column chunk holds output column 8 * q + c8
            acc = tl.reshape(tl.permute(tl.reshape(acc, (BLOCK_M, BLOCK_N // 64, 8, 4)), (0, 1, 3, 2)),
                             (BLOCK_M, BLOCK_N // 2))
    return acc.to(DTYPE)


@triton.jit
def _fp8_gemm_nt_kernel(
    # A (M, K) fp8, B (N, K) fp8, out (M, N)
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,
    M, N, K, CHUNKS,
    stride_am, stride_bn, stride_cm,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROMOTE: tl.constexpr, SWIGLU: tl.constexpr,
):
    # SWIGLU: N counts B's rows (2I); the output has N // 2 columns
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_chunk = tl.cdiv(k_tiles, CHUNKS)  # CHUNKS is 1 unless PROMOTE == 2
    for c in range(CHUNKS):
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(c * k_chunk, tl.minimum((c + 1) * k_chunk, k_tiles)):
            kmask = (offs_k + ki * BLOCK_K) < K
            a = tl.load(a_ptrs + ki * BLOCK_K, mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs + ki * BLOCK_K, mask=(offs_n[:, None] < N) & kmask[None, :], other=0.0)
            if PROMOTE == 1:  # see PROMOTE_MODES
                part += tl.dot(a, b.T)
            else:
                part = tl.dot(a, b.T, part)
        acc += part
    # epilogue: per-token x per-channel scales
    sa = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * sa[:, None] * sb[None, :]
    if SWIGLU:
        offs_c = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        n_c = N // 2
    else:
        offs_c = offs_n
        n_c = N
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_c[None, :]
    tl.store(c_ptrs, _finish(acc, c_ptr.dtype.element_ty, SWIGLU, BLOCK_M, BLOCK_N),
             mask=(offs_m[:, None] < M) & (offs_c[None, :] < n_c))


@triton.jit
def _tma_epilogue(acc, item, tile, off_m, off_n, c_desc, as_ptr, bs_ptr, ws_ptr, cnt_ptr, M, N,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SWIGLU: tl.constexpr):
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    sa = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * sa[:, None] * sb[None, :]
    off_c = off_n // 2 if SWIGLU else off_n
    if SPLIT_K == 1:
        c_desc.store([off_m, off_c], _finish(acc, c_desc.dtype, SWIGLU, BLOCK_M, BLOCK_N))
    else:
        # serial split-K fix-up: every split stores its scaled partial tile; the split that arrives
        # last sums all of them in split order (deterministic whichever arrives last), writes the
        # output and re-arms the counter
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        rows = offs_m[:, None].to(tl.int64)
        tl.store(ws_ptr + (rows + (item % SPLIT_K) * M) * N + offs_n[None, :], acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                tot += tl.load(ws_ptr + (rows + s * M) * N + offs_n[None, :], mask=mask, other=0.0,
                               cache_modifier=".cg")
            c_desc.store([off_m, off_c], _finish(tot, c_desc.dtype, SWIGLU, BLOCK_M, BLOCK_N))
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _fp8_gemm_nt_tma_kernel(
    # descriptors: A (M, K) fp8 [BLOCK_M, BLOCK_K], B (N, K) fp8 [BLOCK_N, BLOCK_K], C (M, N) [BLOCK_M, BLOCK_N]
    a_desc, b_desc, c_desc, as_ptr, bs_ptr,
    # split-K only: ws (SPLIT_K, M, N) float32 partial tiles, cnt (tiles,) int32 arrival counters (zero
    # on entry, left zero on exit)
    ws_ptr, cnt_ptr,
    M, N, K,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, PROMOTE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, SPLIT_K: tl.constexpr,
    CHUNKS: tl.constexpr, SWIGLU: tl.constexpr,
):
    # A work item is (output tile, K split); the splits of a tile are consecutive items, so they run at
    # the same time on different SMs. A program walks its items (every NUM_SMS-th) in CHUNKS chained
    # pieces of K each (PROMOTE 2), as one flattened loop, so the operand pipeline runs on across pieces
    # and tiles; a piece's end still waits for the tensor cores (~2 us per piece per SM measured at
    # 16384x1408x3840 on an H100: 167 us in two pieces against 145 us in one chain).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_split = tl.cdiv(k_tiles, SPLIT_K)
    k_chunk = tl.cdiv(k_split, CHUNKS)
    pid = tl.program_id(0)
    my_items = tl.cdiv(num_pid_m * num_pid_n * SPLIT_K - pid, NUM_SMS)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in tl.range(0, my_items * CHUNKS, flatten=SPLIT_K == 1, warp_specialize=WARP_SPECIALIZE):
        item = pid + (it // CHUNKS) * NUM_SMS
        c = it % CHUNKS
        tile = item // SPLIT_K
        if SPLIT_K == 1:
            # the same trip count for every piece, so Triton can flatten the loop nest (a trip count that
            # varies per piece kept it from doing so: a pipeline refill per piece); the last piece may run
            # past K, where the TMA loads read zeros
            k_lo = c * k_chunk
            n_k = k_chunk
        else:
            s_lo = (item % SPLIT_K) * k_split
            k_lo = s_lo + c * k_chunk
            n_k = tl.minimum(tl.minimum(k_lo + k_chunk, s_lo + k_split), k_tiles) - k_lo
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, n_k):
            ki = k_lo + kk
            a = a_desc.load([off_m, ki * BLOCK_K])
            b = b_desc.load([off_n, ki * BLOCK_K])
            if PROMOTE == 1:
                acc += tl.dot(a, b.T)
            else:
                acc = tl.dot(a, b.T, acc)
        if CHUNKS == 1:
            _tma_epilogue(acc, item, tile, off_m, off_n, c_desc, as_ptr, bs_ptr, ws_ptr, cnt_ptr, M, N,
                          BLOCK_M, BLOCK_N, SPLIT_K, SWIGLU)
        else:
            total = tl.where(c == 0, acc, total + acc)
            if c == CHUNKS - 1:
                _tma_epilogue(total, item, tile, off_m, off_n, c_desc, as_ptr, bs_ptr, ws_ptr, cnt_ptr, M, N,
                              BLOCK_M, BLOCK_N, SPLIT_K, SWIGLU)


# Hopper's FP8 tensor cores accumulate a wgmma chain in less than FP32 precision; over long K the
# error of one chained accumulator reaches the 1e-3 gate (measured on an H100: mean rel. error 5.5e-4
# at K = 1408, 1.05e-3 at K = 3840 against the float32 reference). Promotion modes:
# - PROMOTE 1 adds each BLOCK_K step's product into the FP32 accumulator with an ordinary add
#   (DeepSeek-V3's promotion): 2.1e-4 at K = 3840 with BLOCK_K 256, but each add waits for the tensor
#   cores (172 us against 146 us for one chain at 16384x1408x3840 on an H100, 0.86x `_scaled_mm`).
# - PROMOTE 2 runs K as CHUNKS chains of at most PROMOTE_MIN_K (at least two), each chain a piece of
#   the flattened persistent loop, summed in FP32 at the end of each piece (7.3e-4 at K = 3840 with
#   two chains): a promotion per piece, not per step; 167 us against 186 us for the best mode-1 config
#   in the same H100 run, the default (config.PROMOTE_DEFAULT). The pointer kernel runs the pieces as
#   nested loops. (Its first form, two K loops one after the other, cost 177 us, and with warp
#   specialisation showed one NaN row once on an H200.)
# Measured and dropped (H100, 2026-11-24): a chain added every P steps under an `if` in the K loop
# (stops Triton's software pipelining: 0.55-0.77x), two interleaved chains (even/odd steps: 0.82x),
# the compiler's own promotion (`tl.dot(..., max_num_imprecise_acc=BLOCK_K)`: the same time as
# PROMOTE 1 within 2%), two or three programs per SM to overlap one's adds with another's tensor-core
# work (0.45-0.75x `_scaled_mm`: the smaller tiles that fit twice lose more).
PROMOTE_MODES = {0: "one chain", 1: "every BLOCK_K step", 2: "chains of at most PROMOTE_MIN_K of K"}


def _chunks(promote: int, k_tiles: int, block_k: int) -> int:
    """Chained pieces per program for PROMOTE 2 (1 otherwise): at most PROMOTE_MIN_K of K each, at least 2."""
    if promote != 2:
        return 1
    return max(1, min(k_tiles, max(2, -(-k_tiles * block_k // PROMOTE_MIN_K))))


def _promote_default(k: int) -> int:
    """k: the length of one program's accumulation chain (K, or K / SPLIT_K with split-K)."""
    return PROMOTE_DEFAULT if k >= PROMOTE_MIN_K else 0


def _promote_mode(promote: bool | int | None, k: int) -> int:
    if promote is None:
        return _promote_default(k)
    if int(promote) not in PROMOTE_MODES:
        raise ValueError(f"promote must be None, a bool or one of {sorted(PROMOTE_MODES)} "
                         f"({', '.join(PROMOTE_MODES.values())}), got {promote!r}")
    return int(promote)


_COUNTERS: dict = {}


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """Zeroed int32 arrival counters for split-K, at least ``tiles`` of them, one buffer per device,
    kept between launches (each launch leaves its counters at zero). Allocated outside CUDA graph
    capture only (a zeroing captured into a graph would not run before the graph's first replay in
    the right order); returns None when one is needed during a capture."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 4  # interpreter: a few programs exercise the persistent loop
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tensor_descriptor():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton < 3.4
        return None
    return TensorDescriptor


def tma_ok(m: int, n: int, k: int, out_dtype: torch.dtype) -> bool:
    """Whether the TMA kernel can take this problem: 16-byte aligned row strides for A/B (fp8) and C."""
    return _tensor_descriptor() is not None and k % 16 == 0 and (n * torch.empty((), dtype=out_dtype).element_size()) % 16 == 0


KERNEL_NAME_SWIGLU = "fp8_gemm_swiglu"  # its configs (tuning cache, defaults) are its own
# The order of the (gate, up) pairs in the packed weight. 2, the quad order (the default): within each 32
# pairs, pair 4 * c8 + q computes output column 8 * q + c8, so that after the split a wgmma accumulator
# thread (which holds columns 8 * c8 + 2q and + 1 of each 64) holds 8 contiguous output columns: 16-byte
# shared-memory stores in the epilogue (16 STS.128 per thread at 128 x 256, against 64 STS.U16 and 8
# STS.128 in pair order; Triton 3.6, sm_90a; the same time within noise on an H100). Needs I % 32 == 0
# and BLOCK_N % 64 == 0 (the launcher narrows a config's BLOCK_N to 64 where it is not). 1: plain pairs
# (pair j computes column j), any I, any BLOCK_N: what swiglu_order_for picks where I % 32 != 0. Times:
# docs/benchmarks.md, eleventh run.
SWIGLU_ORDER = 2


def quad_pair_order(pairs: int, group: int) -> torch.Tensor:
    """The output column each of ``pairs`` (gate, up) pairs computes when, within every ``group`` pairs,
    pair 4c + q computes column q * group / 4 + c: thread q of a wgmma quad (accumulator columns 2q and
    2q + 1 of every 8) then holds group / 4 contiguous output columns after the gate/up split. group 32:
    fp8_gemm's quad order (8 columns a thread); 64: the Gluon grouped kernel's (16 a thread,
    grouped_gemm.gluon_w13_order)."""
    return torch.arange(pairs).view(-1, 4, group // 4).transpose(1, 2).reshape(-1)


def swiglu_order_for(inter: int) -> int:
    """The order the serving path packs a SwiGLU of width I in: SWIGLU_ORDER where I allows it, else pairs."""
    return SWIGLU_ORDER if inter % 32 == 0 else 1


def swiglu_order(inter: int, order: int | None = None) -> torch.Tensor:
    """Which output column each (gate, up) pair of the packed weight computes (see SWIGLU_ORDER)."""
    order = SWIGLU_ORDER if order is None else order
    if order not in (1, 2):
        raise ValueError(f"swiglu order must be 1 (pairs) or 2 (quad order), got {order!r}")
    if order == 1:
        return torch.arange(inter)
    if inter % 32:
        raise ValueError(f"the quad order needs I % 32 == 0, got {inter}")
    return quad_pair_order(inter, 32)


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor, order: int | None = None) -> torch.Tensor:
    """Rows of gate and up (I, ...) pair-interleaved, (2I, ...): row 2p = gate c, row 2p + 1 = up c for
    c = swiglu_order(I)[p]. The B operand (and its per-channel scale) of ``fp8_gemm_nt(..., swiglu=True)``.
    FP8 by its bytes."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: {tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}")
    fp8 = gate.dtype == torch.float8_e4m3fn
    g, u = (gate.view(torch.uint8), up.view(torch.uint8)) if fp8 else (gate, up)
    idx = swiglu_order(gate.shape[0], order).to(gate.device)
    w = torch.stack([g[idx], u[idx]], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:]).contiguous()
    return w.view(torch.float8_e4m3fn) if fp8 else w


def gluon_form(cfg: KernelConfig, out_elem: int = 2) -> bool:
    """Whether ``cfg`` is a form of the Gluon kernel (kernels/fp8_gemm_gluon.py): a consumer warpgroup per
    64 rows (BLOCK_M 128 at 8 warps or 192 at 12), BLOCK_N 64 or 128, BLOCK_K 128, no split-K, one program
    per SM, and its ring (STAGES x (BLOCK_M + BLOCK_N) x 128 bytes) and output tile within shared memory."""
    smem = cfg.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * 128 + cfg.BLOCK_M * cfg.BLOCK_N * out_elem
    return (cfg.BLOCK_M in (128, 192) and cfg.num_warps == cfg.BLOCK_M // 16 and cfg.BLOCK_N in (64, 128)
            and cfg.BLOCK_K == 128 and cfg.SPLIT_K == 1 and cfg.PROGRAMS_PER_SM == 1 and cfg.num_stages >= 2
            and smem + 1024 <= HOPPER_MAX_SHARED)


def gluon_dense_ok(device) -> bool:
    """Whether the Gluon kernel can run on ``device``: grouped_gemm.gluon_ok's conditions (CUDA, compute
    capability 9.x, Triton GLUON_TRITON with Gluon; FP8CONV_GLUON=0 turns it off)."""
    from fp8conv.kernels.grouped_gemm import gluon_ok

    return gluon_ok(device)


def _gluon_piece(promote: int, k_tiles: int) -> int:
    """K blocks (of 128) per wgmma chain of the Gluon kernel for a promotion mode: all of K (0), one (1),
    or _chunks' split of K into chains of at most PROMOTE_MIN_K (2)."""
    if promote == 0:
        return k_tiles
    if promote == 1:
        return 1
    return -(-k_tiles // _chunks(2, k_tiles, 128))


def _check(a, a_scale, b, b_scale, out_dtype):
    for t, name in ((a, "a"), (b, "b")):
        if t.dtype != torch.float8_e4m3fn:
            raise ValueError(f"Expected {name} to be torch.float8_e4m3fn, got {t.dtype} instead.")
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"Expected {name} to be 2-D with unit column stride, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")
    m, k = a.shape
    n, kb = b.shape
    if k != kb:
        raise ValueError(f"K mismatch: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if a_scale.numel() != m or a_scale.dtype != torch.float32:
        raise ValueError(f"Expected a_scale of {m} float32 values (shape ({m}, 1)), got "
                         f"{tuple(a_scale.shape)} {a_scale.dtype}")
    if b_scale.numel() != n or b_scale.dtype != torch.float32:
        raise ValueError(f"Expected b_scale of {n} float32 values (shape ({n}, 1)), got "
                         f"{tuple(b_scale.shape)} {b_scale.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    return m, n, k


VARIANTS = ("auto", "tma", "tma_ws", "ptr", "gluon")


def fp8_gemm_nt(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16, config: KernelConfig | None = None,
                variant: str = "auto", out: torch.Tensor | None = None,
                promote: bool | int | None = None, swiglu: bool = False,
                swiglu_order: int | None = None) -> torch.Tensor:
    """out (M, N) = (A @ B^T) * a_scale * b_scale^T, FP32 accumulation, written in ``out_dtype``.
    With swiglu=True, out (M, N / 2) = silu(G) * U where G and U are the even and odd columns of that
    product, each rounded to ``out_dtype`` first, pair p written to column swiglu_order(N / 2)[p] (B and
    b_scale from ``interleave_gate_up`` with the same ``swiglu_order``, default SWIGLU_ORDER). Its
    default config is "fp8_gemm_swiglu"'s.

    a:       (M, K) float8_e4m3fn, unit column stride (any row stride; TMA wants it contiguous).
    a_scale: (M, 1) float32, contiguous (per token).
    b:       (N, K) float8_e4m3fn, unit column stride (the weight as stored: out x in).
    b_scale: (N, 1) float32, contiguous (per output channel).
    out_dtype: bfloat16 (default), float16 or float32.
    Any M, N, K >= 1. variant: "auto" (TMA persistent when K % 16 == 0, N*elem % 16 == 0 and A/B are
    contiguous; else pointer), "tma" or "ptr". config: KernelConfig (None = the documented default).
    out: optional preallocated contiguous (M, N) ``out_dtype`` tensor.
    promote: FP32 promotion of the tensor cores' chained sums: False/0 none, True/1 every BLOCK_K step,
    2 chains of at most PROMOTE_MIN_K (at least two); None: PROMOTE_DEFAULT when one program's chain
    (K / SPLIT_K) is >= PROMOTE_MIN_K (see the comment at PROMOTE_MODES).
    variant "tma_ws": TMA + warp specialization (as config.WARP_SPEC = 1 does). variant "gluon": the Gluon
    kernel (Hopper; contiguous operands, the TMA alignment, no swiglu, a config that is one of its forms:
    gluon_form); "auto" takes it where promote resolves to 2 and those hold (gluon_dense_ok).
    config.SPLIT_K > 1 (TMA variants only; the pointer kernel ignores it): each output tile's K steps
    are split over that many programs, which write FP32 partial tiles to a workspace; the last to finish
    sums them in split order and writes the tile (deterministic). For small M, where the output tiles
    alone cannot fill the SMs. Not safe for two launches running at once on different streams (they
    share the arrival counters).
    """
    m, n, k = _check(a, a_scale, b, b_scale, out_dtype)
    if variant not in VARIANTS:
        raise ValueError(f"fp8_gemm_nt: variant must be one of {VARIANTS}, got {variant!r}")
    if swiglu and n % 2:
        raise ValueError(f"swiglu needs b with an even number of rows (gate and up interleaved), got {n}")
    sw = 0 if not swiglu else (SWIGLU_ORDER if swiglu_order is None else swiglu_order)
    if sw == 2 and n % 64:
        raise ValueError(f"swiglu's quad order needs b with a multiple of 64 rows, got {n}")
    n_out = n // 2 if swiglu else n
    if out is None:
        out = torch.empty(m, n_out, dtype=out_dtype, device=a.device)
    elif out.shape != (m, n_out) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({m}, {n_out}) {out_dtype} tensor")
    if m == 0 or n == 0:
        return out
    cfg = config or default_config(KERNEL_NAME_SWIGLU if swiglu else KERNEL_NAME, m, n, k)
    if sw == 2 and cfg.BLOCK_N % 64:  # the quad order is per 64 columns of B
        cfg = dataclasses.replace(cfg, BLOCK_N=64)
    a_scale = a_scale.reshape(-1).contiguous()
    b_scale = b_scale.reshape(-1).contiguous()
    use_tma = variant in ("tma", "tma_ws") or (variant == "auto" and tma_ok(m, n_out, k, out_dtype)
                                               and a.is_contiguous() and b.is_contiguous())
    warp_spec = variant == "tma_ws" or (use_tma and cfg.WARP_SPEC == 1)
    k_tiles = triton.cdiv(k, cfg.BLOCK_K)
    tiles = triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N)
    split = max(1, min(cfg.SPLIT_K, k_tiles)) if use_tma else 1
    cnt = _split_counters(a.device, tiles) if split > 1 else None
    if cnt is None:  # no split, or the first split launch inside a CUDA graph capture (no counters yet)
        split = 1
    promote = _promote_mode(promote, triton.cdiv(k_tiles, split) * cfg.BLOCK_K)
    chunks = _chunks(promote, triton.cdiv(k_tiles, split), cfg.BLOCK_K)
    if variant == "gluon" or (variant == "auto" and promote == 2 and split == 1):
        # what keeps the Gluon kernel from this call, cheapest check first ("" if nothing does)
        why = ("swiglu" if swiglu else "operands not contiguous" if not (a.is_contiguous() and b.is_contiguous())
               else "K % 16 or the output's row bytes % 16" if not tma_ok(m, n_out, k, out_dtype)
               else f"config {cfg} is not one of its forms (gluon_form)" if not gluon_form(cfg, out.element_size())
               else "not a Hopper GPU with Triton's Gluon" if not gluon_dense_ok(a.device) else "")
        if why and variant == "gluon":
            raise ValueError(f"fp8_gemm_nt variant 'gluon': {why}")
        if not why:
            from fp8conv.kernels import fp8_gemm_gluon

            fp8_gemm_gluon.launch(a, a_scale, b, b_scale, out, block_m=cfg.BLOCK_M, block_n=cfg.BLOCK_N,
                                  group_m=cfg.GROUP_M, stages=cfg.num_stages,
                                  piece=_gluon_piece(promote, triton.cdiv(k, 128)),
                                  programs=min(_num_sms(a.device.index or 0), tiles))
            return out
    if use_tma:
        TD = _tensor_descriptor()
        a_d = TD.from_tensor(a.contiguous(), [cfg.BLOCK_M, cfg.BLOCK_K])
        b_d = TD.from_tensor(b.contiguous(), [cfg.BLOCK_N, cfg.BLOCK_K])
        c_d = TD.from_tensor(out, [cfg.BLOCK_M, cfg.BLOCK_N // 2 if swiglu else cfg.BLOCK_N])
        sms = _num_sms(a.device.index or 0)
        ws = torch.empty(split, m, n, dtype=torch.float32, device=a.device) if split > 1 else None
        grid = (min(sms * cfg.PROGRAMS_PER_SM, tiles * split),)
        _fp8_gemm_nt_tma_kernel[grid](
            a_d, b_d, c_d, a_scale, b_scale, ws, cnt, m, n, k,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
            NUM_SMS=grid[0], PROMOTE=promote, WARP_SPECIALIZE=warp_spec and split == 1, SPLIT_K=split,
            CHUNKS=chunks, SWIGLU=sw,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N),)
    _fp8_gemm_nt_kernel[grid](
        a, b, out, a_scale, b_scale, m, n, k, chunks, a.stride(0), b.stride(0), out.stride(0),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        PROMOTE=promote, SWIGLU=sw, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
