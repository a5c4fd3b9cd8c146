"""The sorted-layout grouped GEMMs of kernels/grouped_gemm.py written in Gluon, for Hopper (sm_90).

Why a second language: block-scaled FP8 needs each 128-deep K block's product scaled before it is
added to the accumulator (the weight's 128x128 block scale and the activation's 1x128 group scale
change every K block). With ``tl.dot`` Triton waits for every wgmma (``warp_group_dot_wait
{pendings = 0}``) before that scaling, so the tensor cores idle while the CUDA cores scale: the
Triton kernels reach 590-640 TFLOP/s at the 4b shapes where a plain FP8 GEMM reaches ~1000. Gluon
exposes the asynchronous wgmma: here K block kb's MMA is issued, then the wait retires only block
kb - 1's (``warpgroup_mma_wait(num_outstanding=1)``), whose product is scaled and accumulated on the
CUDA cores while block kb runs on the tensor cores. Three accumulators' worth of registers (the sum,
the retired product, the one in flight) bound the tile to 64 rows per warpgroup x 128 columns.

The rest is as in grouped_gemm_sorted: persistent programs over the used tiles (the used-block count
read on the GPU), TMA loads of A and B through a ring of STAGES buffers (a buffer is refilled as soon
as the MMA that read it has retired, loads running ahead across tile boundaries), TMA stores.

Gate/up (``swiglu=True``) needs w13 packed with ``interleave=1`` (pack_experts): gate and up rows
alternate, so in the wgmma accumulator layout each thread holds gate column c and up column c of its
rows side by side, and SwiGLU is computed in registers after splitting the even and odd columns; the
pairs are ordered (grouped_gemm.gluon_w13_order) so that a thread's SwiGLU columns are contiguous and
reach shared memory in 16-byte stores. A
128-row weight tile (64 gate + 64 up rows) gives 64 SwiGLU columns; the 1x128 quantization group
needs two such items, so the first item's SwiGLU output waits in shared memory (rounded to the
activation dtype, as the reference rounds it) with its row maxima in registers.

Numerics are those of grouped_gemm_sorted (products of each K block scaled by sa * sb and summed in
float32 in K order; gate/up outputs, then SwiGLU's, rounded to the activation dtype; 1x128 groups
quantized by quantize_values' arithmetic). Written against Triton 3.6's Gluon API (grouped_gemm.GLUON_TRITON:
later versions renamed the TMA copies and changed warp_specialize's arguments); runs only on CUDA
devices of compute capability 9.x (no interpreter), where grouped_gemm.gluon_ok says so.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the gate/up kernel's w13 row order: 1 = grouped_gemm.gluon_w13_order (a side file of benchmarks/bench_gluon_ab.py
# without this name expects gate and up rows plainly alternating)
W13_ORDER = 1
_GL_ACT = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}
_GL_OUT = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32,
           torch.float8_e4m3fn: gl.float8e4nv}


@gluon.constexpr_function
def _acc_layout(BLOCK_M, BLOCK_N, num_warps):
    """The wgmma accumulator layout: warps along M first (16 rows each), the rest along N."""
    wm = min(num_warps, BLOCK_M // 16)
    wn = num_warps // wm
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[wm, wn], instr_shape=[16, BLOCK_N // wn, 32])


@gluon.jit
def _item_coords(item, pid, progs, num_pid_m, num_pid_n, ITEMS: gl.constexpr, GROUP_M: gl.constexpr):
    """(pid_m, pid_n, part) of this program's item-th work item (the same tile order as _tile_coords)."""
    tile = pid + (item // ITEMS) * progs
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m, item % ITEMS


@gluon.jit
def _load_step(s, off_m, row0, kk, a_desc, b_desc, a_smem, b_smem, ready, BLOCK_M: gl.constexpr):
    """TMA loads of rows [off_m, off_m + BLOCK_M) of A and rows [row0, row0 + BLOCK_N) of B, columns [kk, kk +
    128), into ring buffer s; A's box may be a part of the BLOCK_M rows (the warp-specialized kernel: 64 rows,
    one buffer per consumer)."""
    A_ROWS: gl.constexpr = a_desc.block_type.shape[0]
    PARTS: gl.constexpr = BLOCK_M // A_ROWS
    mbarrier.expect(ready.index(s), PARTS * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    for j in gl.static_range(PARTS):
        tma.async_copy_global_to_shared(a_desc, [off_m + j * A_ROWS, kk], ready.index(s),
                                        a_smem.index(s * PARTS + j))
    tma.async_copy_global_to_shared(b_desc, [row0, kk], ready.index(s), b_smem.index(s))


@gluon.jit
def _item_rows(item, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr, ITEMS: gl.constexpr,
               ALIGN_M: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """(first A row, first B row) of this program's item-th work item; (0, 0) past its last item (the
    expert id is then not loaded: the tile may lie past the used blocks)."""
    pid_m, pid_n, part = _item_coords(item, pid, progs, num_pid_m, num_pid_n, ITEMS, GROUP_M)
    off_m = pid_m * BLOCK_M
    expert = gl.load(bexp_ptr + off_m // ALIGN_M, mask=item < my_items, other=0)
    return off_m, expert * N + (pid_n * ITEMS + part) * BLOCK_N


@gluon.jit
def _next_load(ld, cursor, k_tiles, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr, a_desc, b_desc, a_smem,
               b_smem, ready, ITEMS: gl.constexpr, ALIGN_M: gl.constexpr, GROUP_M: gl.constexpr,
               STAGES: gl.constexpr, BLOCK_M: gl.constexpr):
    """The single-warpgroup kernel's loads of step ``cursor``, the next step its loader state ld = (K block,
    item, first A row, first B row, the next item's first A and B rows) describes; returns the state
    advanced by one step. An item's rows (its expert id, a global load) are found once, an item ahead:
    found at every step, that load's latency and the coordinate arithmetic came between the steps."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    kb, item, off_m, row0, next_m, next_row0 = ld
    _load_step(cursor % STAGES, off_m, row0, kb * BLOCK_K, a_desc, b_desc, a_smem, b_smem, ready, BLOCK_M)
    kb += 1
    if kb == k_tiles:
        kb = 0
        item += 1
        off_m = next_m
        row0 = next_row0
        next_m, next_row0 = _item_rows(item + 1, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr, ITEMS,
                                       ALIGN_M, GROUP_M, BLOCK_M, BLOCK_N)
    return kb, item, off_m, row0, next_m, next_row0


@gluon.jit
def _weight_scale_ptrs(bs_ptr, bexp_ptr, pid_m, pid_n, stride_bse, stride_bsn, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, SWIGLU: gl.constexpr, ALIGN_M: gl.constexpr):
    """The K rows of this tile's weight block scales: (gate, up) for SWIGLU (block pair pid_n), else
    the down weight's block of the tile's columns, twice."""
    expert = gl.load(bexp_ptr + (pid_m * BLOCK_M) // ALIGN_M)
    bs_base = bs_ptr + expert.to(gl.int64) * stride_bse
    if SWIGLU:
        bs_g = bs_base + (2 * pid_n) * stride_bsn
        return bs_g, bs_g + stride_bsn
    else:
        bs_g = bs_base + ((pid_n * BLOCK_N) // 128) * stride_bsn
        return bs_g, bs_g


@gluon.jit
def _kb_scales(kb, as_ptr, P, offs_m, bs_g, bs_u):
    """K block kb's scales: the rows' activation group scales (K-major), the weight block's (gate, up)."""
    return gl.load(as_ptr + kb * P + offs_m), gl.load(bs_g + kb), gl.load(bs_u + kb)


@gluon.jit
def _promote(acc, prod, sa, sg, su, is_up, SWIGLU: gl.constexpr):
    """acc + prod * (sa x the weight scale): one K block's product scaled into the float32 sum."""
    if SWIGLU:
        return acc + prod * (sa[:, None] * gl.where(is_up, su, sg)[None, :])
    else:
        return acc + prod * (sa * sg)[:, None]


@gluon.jit
def _round(x, ACT: gl.constexpr):
    """float32 x rounded to the activation dtype and back (round to nearest even). bf16 takes two values
    per conversion (cvt.rn.bf16x2.f32 and two bit operations, where .to() converts one value at a time
    and shifts it back)."""
    if ACT == gl.bfloat16:
        return gl.inline_asm_elementwise(
            "{ .reg .b32 p; cvt.rn.bf16x2.f32 p, $3, $2; shl.b32 $0, p, 16; and.b32 $1, p, 0xffff0000; }",
            "=r,=r,r,r", [x], dtype=gl.float32, is_pure=True, pack=2)
    else:
        return x.to(ACT).to(gl.float32)


@gluon.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) by ex2.approx and rcp.approx, flushing subnormals (exp overflowing to inf gives
    0): 4 instructions, where exp and / with Triton's range fix-ups take 9. Its relative error, a few
    float32 ulp, is far below the bf16 rounding of the SwiGLU output that follows."""
    return gl.inline_asm_elementwise(
        "{ .reg .f32 t; mul.ftz.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.ftz.f32 t, t, 0f3F800000; "
        "rcp.approx.ftz.f32 $0, t; }",
        "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _quantize(y, scale):
    """y / scale as float32, for y holding bf16/fp16 values with |y| <= 448 * scale: act_quant.quantize_values'
    FAST_DIV arithmetic (Markstein's correction on negated terms; exact for those values, and the sign of
    zero right without a fix-up). Not clamped to +-448: the FP8 conversion that follows saturates
    (cvt.rn.satfinite), which rounds every value as the clamp then the conversion would."""
    sx = gl.where(scale < 7.888609052210118e-31, 18446744073709551616.0, 1.0)  # 2^-100, 2^64
    s2 = scale * sx
    nr = gl.div_rn(gl.full_like(s2, -1.0), s2)
    ny2 = y * (0.0 - sx)
    q0 = ny2 * nr
    e = gl.fma(q0, s2, ny2)
    return gl.fma(e, nr, q0)


@gluon.jit
def _quantize_ieee(y, scale):
    """y / scale by IEEE division (float32 activations); saturated by the FP8 conversion, as _quantize."""
    return gl.div_rn(y, scale)


@gluon.jit
def _schedule(used_ptr, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
              ITEMS: gl.constexpr, ALIGN_M: gl.constexpr):
    """(num_pid_m, num_pid_n, k_tiles, pid, progs, my_items, total steps) of this program."""
    num_pid_m = gl.load(used_ptr) * (ALIGN_M // BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N * ITEMS)
    k_tiles = gl.cdiv(K, BLOCK_K)
    pid = gl.program_id(0)
    progs = gl.num_programs(0)
    my_items = gl.cdiv(gl.maximum(num_pid_m * num_pid_n - pid, 0), progs) * ITEMS
    return num_pid_m, num_pid_n, k_tiles, pid, progs, my_items, my_items * k_tiles


@gluon.jit
def _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_buf, c_lo, c_hi, c_desc, cs_ptr, valid_rows, P,
              row_l: gl.constexpr, SWIGLU: gl.constexpr, ACT: gl.constexpr, FAST_DIV: gl.constexpr,
              BLOCK_N: gl.constexpr):
    """A finished item's output; returns the row maxima a first gate/up item leaves for the second.

    SWIGLU: SwiGLU of the even (gate) and odd (up) columns, rounded as the reference rounds them, padding
    rows (not valid_rows) zeroed; the first item's 64 columns wait in h_buf (stored and read back by the
    same threads, in the same layout, 16 bytes at a time; swizzled by 16-byte chunk, as the 8 rows a warp
    writes would otherwise put a chunk on the same banks), the second item quantizes both halves with the
    group's scale and stores them (TMA, c_lo / c_hi) and the scales (K-major). Else the tile in the
    output dtype through c_lo."""
    HALF: gl.constexpr = BLOCK_N // 2
    if SWIGLU:
        # column 8j + 2t + s of the tile (thread t of a quad holds the pairs 2t, 2t + 1 of every 8) is gate
        # (s = 0) or up (s = 1) of SwiGLU column 16t + j (pack_experts' order for interleave 1)
        x = gl.permute(gl.reshape(acc, [acc.shape[0], BLOCK_N // 8, 4, 2]), [0, 2, 1, 3])
        g, u = gl.split(gl.reshape(x, [acc.shape[0], HALF, 2]))
        g = _round(g, ACT)
        u = _round(u, ACT)
        h = _round(g * _sigmoid(g) * u, ACT)
        h_l: gl.constexpr = g.type.layout
        valid = gl.convert_layout(valid_rows, gl.SliceLayout(1, h_l))
        h = gl.where(valid[:, None], h, 0.0)
        amax = gl.convert_layout(gl.max(gl.abs(h), axis=1), row_l)
        if part == 0:
            h_buf.store(h.to(ACT))
            amax_lo = amax
        else:
            amax = gl.maximum(amax, amax_lo)
            scale = gl.where(amax == 0.0, 1.0, gl.div_rn(amax, gl.full_like(amax, 448.0)))
            scale_h = gl.convert_layout(scale, gl.SliceLayout(1, h_l))[:, None]
            h_lo = h_buf.load(h_l).to(gl.float32)
            if FAST_DIV:
                q_lo = _quantize(h_lo, scale_h)
                q_hi = _quantize(h, scale_h)
            else:
                q_lo = _quantize_ieee(h_lo, scale_h)
                q_hi = _quantize_ieee(h, scale_h)
            tma.store_wait(pendings=0)  # the previous group's stores have left c_lo / c_hi
            c_lo.store(q_lo.to(c_desc.dtype))
            c_hi.store(q_hi.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [off_m, pid_n * BLOCK_N], c_lo)
            tma.async_copy_shared_to_global(c_desc, [off_m, pid_n * BLOCK_N + HALF], c_hi)
            gl.store(cs_ptr + pid_n * P + offs_m, scale)
    else:
        tma.store_wait(pendings=0)  # the previous tile's store has left c_lo
        c_lo.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, pid_n * BLOCK_N], c_lo)
    return amax_lo


@gluon.jit
def _grouped_sorted_gluon_kernel(
    # A descriptor (P, K') fp8 box [BLOCK_M, 128]; scales K-major (ceil(K'/128), P) float32.
    # B descriptor [E*N, K] fp8 box [BLOCK_N, 128] (SWIGLU: 128 = 64 gate + 64 up rows, interleave 1);
    # block scales [E, N/128, ceil(K/128)] (SWIGLU: gate and up blocks alternating, as pack_experts)
    a_desc, as_ptr, b_desc, bs_ptr,
    sid_ptr, bexp_ptr, used_ptr,
    # SWIGLU: q descriptor (P, N/2) fp8 box [BLOCK_M, 64], scales K-major (N/256, P) float32;
    # else y descriptor (P, N) box [BLOCK_M, BLOCK_N]
    c_desc, cs_ptr,
    P, N, K, num_valid, stride_bse, stride_bsn,
    SWIGLU: gl.constexpr, ACT: gl.constexpr, FAST_DIV: gl.constexpr, ALIGN_M: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    ITEMS: gl.constexpr = 2 if SWIGLU else 1  # SWIGLU: a 128-column output group = two 128-row items
    HALF: gl.constexpr = BLOCK_N // 2
    acc_l: gl.constexpr = _acc_layout(BLOCK_M, BLOCK_N, num_warps)
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)

    num_pid_m, num_pid_n, k_tiles, pid, progs, my_items, total = _schedule(
        used_ptr, N, K, BLOCK_M, BLOCK_N, BLOCK_K, ITEMS, ALIGN_M)

    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    h_smem = gl.allocate_shared_memory(ACT, [BLOCK_M, HALF],
                                       gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))
    if SWIGLU:
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [2, BLOCK_M, HALF], c_desc.layout)
    else:
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [BLOCK_M, BLOCK_N], c_desc.layout)

    # the loader's state (_next_load) at step 0; every buffer starts filled: steps 0 .. STAGES-1
    first_m, first_row0 = _item_rows(0, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr, ITEMS, ALIGN_M,
                                     GROUP_M, BLOCK_M, BLOCK_N)
    next_m, next_row0 = _item_rows(1, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr, ITEMS, ALIGN_M,
                                   GROUP_M, BLOCK_M, BLOCK_N)
    ld = (0, 0, first_m, first_row0, next_m, next_row0)
    for i in gl.static_range(STAGES):
        if i < total:
            ld = _next_load(ld, i, k_tiles, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr, a_desc, b_desc,
                            a_smem, b_smem, ready, ITEMS, ALIGN_M, GROUP_M, STAGES, BLOCK_M)

    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    cols = gl.arange(0, BLOCK_N, layout=col_l)
    is_up = (cols % 2) == 1
    amax_lo = gl.zeros([BLOCK_M], gl.float32, row_l)
    # Two product registers, X and Y, take the K blocks in turn (the loop below is unrolled by two), so
    # the product in flight is never copied: a read of a wgmma's registers before it retires makes
    # ptxas serialize every wgmma of the kernel (its warning C7514)
    x = zero
    y = zero
    step = 0
    for item in range(my_items):
        pid_m, pid_n, part = _item_coords(item, pid, progs, num_pid_m, num_pid_n, ITEMS, GROUP_M)
        off_m = pid_m * BLOCK_M
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=row_l)
        valid_rows = gl.load(sid_ptr + offs_m) < num_valid  # for the epilogue: loaded before the K loop
        bs_g, bs_u = _weight_scale_ptrs(bs_ptr, bexp_ptr, pid_m, pid_n, stride_bse, stride_bsn, BLOCK_M, BLOCK_N,
                                        SWIGLU, ALIGN_M)
        acc = zero

        # K block 0 into X; each later block's MMA is issued before the previous block's product is
        # read, so the scaling below runs while the tensor cores work
        s = step % STAGES
        mbarrier.wait(ready.index(s), (step // STAGES) & 1)
        x = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), x, use_acc=False, is_async=True)
        x = warpgroup_mma_wait(num_outstanding=1, deps=(x,))  # returns at once: X stays in flight
        sax, sgx, sux = _kb_scales(0, as_ptr, P, offs_m, bs_g, bs_u)
        for kb in range(1, k_tiles - 1, 2):
            step += 1
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            y = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), y, use_acc=False, is_async=True)
            say, sgy, suy = _kb_scales(kb, as_ptr, P, offs_m, bs_g, bs_u)
            y, x = warpgroup_mma_wait(num_outstanding=1, deps=(y, x))  # X retires, Y stays in flight
            if step - 1 + STAGES < total:  # X's buffer takes the step STAGES ahead
                ld = _next_load(ld, step - 1 + STAGES, k_tiles, pid, progs, num_pid_m, num_pid_n, my_items, N,
                                bexp_ptr, a_desc, b_desc, a_smem, b_smem, ready, ITEMS, ALIGN_M, GROUP_M, STAGES,
                                BLOCK_M)
            acc = _promote(acc, x, sax, sgx, sux, is_up, SWIGLU)
            step += 1
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            x = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), x, use_acc=False, is_async=True)
            sax, sgx, sux = _kb_scales(kb + 1, as_ptr, P, offs_m, bs_g, bs_u)
            x, y = warpgroup_mma_wait(num_outstanding=1, deps=(x, y))
            if step - 1 + STAGES < total:
                ld = _next_load(ld, step - 1 + STAGES, k_tiles, pid, progs, num_pid_m, num_pid_n, my_items, N,
                                bexp_ptr, a_desc, b_desc, a_smem, b_smem, ready, ITEMS, ALIGN_M, GROUP_M, STAGES,
                                BLOCK_M)
            acc = _promote(acc, y, say, sgy, suy, is_up, SWIGLU)
        if k_tiles % 2 == 0:  # one block left: into Y, then both retire
            step += 1
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            y = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), y, use_acc=False, is_async=True)
            say, sgy, suy = _kb_scales(k_tiles - 1, as_ptr, P, offs_m, bs_g, bs_u)
            y, x = warpgroup_mma_wait(num_outstanding=1, deps=(y, x))
            if step - 1 + STAGES < total:
                ld = _next_load(ld, step - 1 + STAGES, k_tiles, pid, progs, num_pid_m, num_pid_n, my_items, N,
                                bexp_ptr, a_desc, b_desc, a_smem, b_smem, ready, ITEMS, ALIGN_M, GROUP_M, STAGES,
                                BLOCK_M)
            acc = _promote(acc, x, sax, sgx, sux, is_up, SWIGLU)
            y = warpgroup_mma_wait(num_outstanding=0, deps=(y,))
            acc = _promote(acc, y, say, sgy, suy, is_up, SWIGLU)
        else:
            x = warpgroup_mma_wait(num_outstanding=0, deps=(x,))
            acc = _promote(acc, x, sax, sgx, sux, is_up, SWIGLU)
        if step + STAGES < total:
            ld = _next_load(ld, step + STAGES, k_tiles, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr,
                            a_desc, b_desc, a_smem, b_smem, ready, ITEMS, ALIGN_M, GROUP_M, STAGES, BLOCK_M)
        step += 1

        if SWIGLU:
            amax_lo = _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_smem, c_smem.index(0), c_smem.index(1),
                                c_desc, cs_ptr, valid_rows, P, row_l, SWIGLU, ACT, FAST_DIV, BLOCK_N)
        else:
            amax_lo = _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_smem, c_smem, c_smem, c_desc, cs_ptr,
                                valid_rows, P, row_l, SWIGLU, ACT, FAST_DIV, BLOCK_N)
    tma.store_wait(pendings=0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))


def _nvmma(block, dtype):
    return gl.NVMMASharedLayout.get_default_for(block, dtype)


def launch_sorted(a, a_scale_t, b, b_scale, sorted_ids, block_expert, used_blocks, c, cs, *, swiglu: bool,
                  num_valid: int, out_dtype: torch.dtype, align_m: int, block_m: int, block_n: int, group_m: int,
                  stages: int, programs: int, warmup: bool = False):
    """Launch a Gluon kernel on checked operands (grouped_gemm.grouped_gemm_sorted checks them): block_m
    128 takes the warp-specialized kernel (two consumer warpgroups and a TMA warp), 64 the single
    warpgroup one with asynchronous wgmma; block_n is the MMA width (128 for gate/up: one item of 64
    gate + 64 up rows); programs the grid. Returns the compiled kernel; warmup=True compiles it without
    launching (its registers and shared memory size the persistent grid)."""
    e, n, k = b.shape
    p = sorted_ids.numel()
    ws = block_m >= 128

    am = 64 if ws else block_m  # the warp-specialized kernel loads A in 64-row parts, one per consumer
    a_d = TensorDescriptor.from_tensor(a, [am, 128], _nvmma([am, 128], gl.float8e4nv))
    bv = b.view(e * n, k)
    b_d = TensorDescriptor.from_tensor(bv, [block_n, 128], _nvmma([block_n, 128], gl.float8e4nv))
    cw, cm = (block_n // 2 if swiglu else block_n), (64 if ws else block_m)
    c_d = TensorDescriptor.from_tensor(c, [cm, cw], _nvmma([cm, cw], _GL_OUT[c.dtype]))
    args = (a_d, a_scale_t, b_d, b_scale, sorted_ids, block_expert, used_blocks, c_d, cs,
            p, n, k, num_valid, b_scale.stride(0), b_scale.stride(1))
    meta = dict(SWIGLU=swiglu, ACT=_GL_ACT[out_dtype], FAST_DIV=out_dtype != torch.float32, ALIGN_M=align_m,
                GROUP_M=group_m, STAGES=stages)
    if ws:
        # consumer registers after setmaxnreg: what 2 (3) consumer warpgroups and the loader's (24) leave
        kernel, meta = _grouped_ws_kernel, dict(meta, BLOCK_M=block_m, CONSUMER_REGS=232 if block_m == 128 else 160)
    else:
        kernel = _grouped_sorted_gluon_kernel
    if warmup:
        return kernel.warmup(*args, grid=(1,), **meta, num_warps=4)
    return kernel[(programs,)](*args, **meta, num_warps=4)


# -- warp-specialized form: a TMA producer warp and two consumer warpgroups ------------------------------

@gluon.jit
def _ws_producer(a_desc, b_desc, a_smem, b_smem, ready, empty, bexp_ptr, used_ptr, N, K,
                 ITEMS: gl.constexpr, ALIGN_M: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                 BLOCK_M: gl.constexpr):
    """The loads of every step into the ring; a buffer is refilled once every consumer released it.

    An item's rows (its expert id, a global load) are found once per item, the next item's while this
    one's loads are issued: found per step, that load's latency and the coordinate arithmetic made a
    loader step 600-2000 clocks (benchmarks/trace_gluon.py on an H100), and the consumers, whose step
    takes ~1200, waited for data."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    num_pid_m, num_pid_n, k_tiles, pid, progs, my_items, total = _schedule(
        used_ptr, N, K, BLOCK_M, BLOCK_N, BLOCK_K, ITEMS, ALIGN_M)
    off_m, row0 = _item_rows(0, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr, ITEMS, ALIGN_M, GROUP_M,
                             BLOCK_M, BLOCK_N)
    step = 0
    for item in range(my_items):
        next_m, next_row0 = _item_rows(item + 1, pid, progs, num_pid_m, num_pid_n, my_items, N, bexp_ptr, ITEMS,
                                       ALIGN_M, GROUP_M, BLOCK_M, BLOCK_N)
        for kb in range(k_tiles):
            s = step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) - 1) & 1, pred=step >= STAGES)
            _load_step(s, off_m, row0, kb * BLOCK_K, a_desc, b_desc, a_smem, b_smem, ready, BLOCK_M)
            step += 1
        off_m = next_m
        row0 = next_row0


@gluon.jit
def _ws_step(acc, prod, step, sa, sg, su, is_up, a_smem, b_smem, ready, empty, WG: gl.constexpr,
             BLOCK_M: gl.constexpr, SWIGLU: gl.constexpr, STAGES: gl.constexpr):
    """One K step of consumer WG: its wgmma once the buffers are loaded (use_acc=False: prod's registers
    are only the destination), waited for, the buffer released, the product scaled into acc."""
    s = step % STAGES
    mbarrier.wait(ready.index(s), (step // STAGES) & 1)
    prod = warpgroup_mma(a_smem.index(s * (BLOCK_M // 64) + WG), b_smem.index(s).permute((1, 0)), prod,
                         use_acc=False, is_async=True)
    prod = warpgroup_mma_wait(num_outstanding=0, deps=(prod,))
    mbarrier.arrive(empty.index(s), count=1)
    return _promote(acc, prod, sa, sg, su, is_up, SWIGLU), prod, step + 1


@gluon.jit
def _ws_consumer(WG: gl.constexpr, a_smem, b_smem, ready, empty, h_smem, c_smem, as_ptr, bs_ptr, sid_ptr, bexp_ptr,
                 used_ptr, c_desc, cs_ptr, P, N, K, num_valid, stride_bse, stride_bsn,
                 SWIGLU: gl.constexpr, ACT: gl.constexpr, FAST_DIV: gl.constexpr, ALIGN_M: gl.constexpr,
                 GROUP_M: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 BLOCK_K: gl.constexpr):
    """Rows [64 WG, 64 WG + 64) of every tile: per K block one synchronous wgmma (the other warpgroups'
    run meanwhile), the buffer released, the product scaled into the sum; then the epilogue."""
    ITEMS: gl.constexpr = 2 if SWIGLU else 1
    HALF: gl.constexpr = BLOCK_N // 2
    acc_l: gl.constexpr = _acc_layout(64, BLOCK_N, 4)
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    num_pid_m, num_pid_n, k_tiles, pid, progs, my_items, total = _schedule(
        used_ptr, N, K, BLOCK_M, BLOCK_N, BLOCK_K, ITEMS, ALIGN_M)
    zero = gl.zeros([64, BLOCK_N], gl.float32, acc_l)
    is_up = (gl.arange(0, BLOCK_N, layout=col_l) % 2) == 1
    amax_lo = gl.zeros([64], gl.float32, row_l)
    prod = zero
    step = 0
    for item in range(my_items):
        pid_m, pid_n, part = _item_coords(item, pid, progs, num_pid_m, num_pid_n, ITEMS, GROUP_M)
        off_m = pid_m * BLOCK_M + 64 * WG
        offs_m = off_m + gl.arange(0, 64, layout=row_l)
        valid_rows = gl.load(sid_ptr + offs_m) < num_valid  # for the epilogue: loaded before the K loop
        bs_g, bs_u = _weight_scale_ptrs(bs_ptr, bexp_ptr, pid_m, pid_n, stride_bse, stride_bsn, BLOCK_M, BLOCK_N,
                                        SWIGLU, ALIGN_M)
        acc = zero
        if BLOCK_M == 128:
            # Two consumers: each K block's scales load a block ahead, in two register sets taken in turn
            # (the loop unrolled by two; one set copied from the other put the copy, which waits on the
            # load, between a step's wgmma instructions). H100, 4096 tokens: gate/up 176.9 -> 173.1 us,
            # down 83.2 -> 79.2. With three consumers it measured slower (gate/up 528 -> 551 us at 16384).
            sa0, sg0, su0 = _kb_scales(0, as_ptr, P, offs_m, bs_g, bs_u)
            for kb in range(0, k_tiles - 1, 2):
                sa1, sg1, su1 = _kb_scales(kb + 1, as_ptr, P, offs_m, bs_g, bs_u)
                acc, prod, step = _ws_step(acc, prod, step, sa0, sg0, su0, is_up, a_smem, b_smem, ready, empty, WG,
                                           BLOCK_M, SWIGLU, STAGES)
                sa0, sg0, su0 = _kb_scales(gl.minimum(kb + 2, k_tiles - 1), as_ptr, P, offs_m, bs_g, bs_u)
                acc, prod, step = _ws_step(acc, prod, step, sa1, sg1, su1, is_up, a_smem, b_smem, ready, empty, WG,
                                           BLOCK_M, SWIGLU, STAGES)
            if k_tiles % 2 == 1:
                acc, prod, step = _ws_step(acc, prod, step, sa0, sg0, su0, is_up, a_smem, b_smem, ready, empty, WG,
                                           BLOCK_M, SWIGLU, STAGES)
        else:
            for kb in range(k_tiles):
                sa, sg, su = _kb_scales(kb, as_ptr, P, offs_m, bs_g, bs_u)  # in flight while this warpgroup waits
                acc, prod, step = _ws_step(acc, prod, step, sa, sg, su, is_up, a_smem, b_smem, ready, empty, WG,
                                           BLOCK_M, SWIGLU, STAGES)

        if SWIGLU:
            amax_lo = _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_smem.index(WG), c_smem.index(2 * WG),
                                c_smem.index(2 * WG + 1), c_desc, cs_ptr, valid_rows, P, row_l, SWIGLU, ACT,
                                FAST_DIV, BLOCK_N)
        else:
            amax_lo = _epilogue(acc, part, amax_lo, off_m, offs_m, pid_n, h_smem.index(WG), c_smem.index(WG),
                                c_smem.index(WG), c_desc, cs_ptr, valid_rows, P, row_l, SWIGLU, ACT, FAST_DIV,
                                BLOCK_N)
    tma.store_wait(pendings=0)


@gluon.jit
def _grouped_ws_kernel(
    a_desc, as_ptr, b_desc, bs_ptr, sid_ptr, bexp_ptr, used_ptr, c_desc, cs_ptr,
    P, N, K, num_valid, stride_bse, stride_bsn,
    SWIGLU: gl.constexpr, ACT: gl.constexpr, FAST_DIV: gl.constexpr, ALIGN_M: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """As _grouped_sorted_gluon_kernel (same operands, but A's descriptor box is 64 rows), BLOCK_M = 128 or
    192: warpgroup 0 (this kernel's 4 warps) and one or two worker warpgroups take 64 rows each, a 1-warp
    worker issues the TMA loads (A in 64-row parts, one buffer per consumer: Triton tensors are powers of
    two). The warpgroups wait for their own wgmma, but not for each other, so one's scaling overlaps the
    others' MMAs; each is paced by its own wait-then-scale chain, which is why a third one pays (H100, 927
    rows per expert: down 226-230 us against 270-280 with two). Registers after setmaxnreg:
    CONSUMER_REGS per consumer (232 with two, 160 with three), 24 for the loader."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    HALF: gl.constexpr = BLOCK_N // 2
    ITEMS: gl.constexpr = 2 if SWIGLU else 1
    NC: gl.constexpr = BLOCK_M // 64  # consumer warpgroups: 2 or 3
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES * NC, 64, BLOCK_K], a_desc.layout)  # [stage, warpgroup]
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NC)  # one arrive per consumer warpgroup
    h_smem = gl.allocate_shared_memory(ACT, [NC, 64, HALF],
                                       gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))
    if SWIGLU:
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [2 * NC, 64, HALF], c_desc.layout)  # [warpgroup, half]
    else:
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [NC, 64, BLOCK_N], c_desc.layout)
    # each partition's arguments spelled out: Gluon 3.6 keeps no JIT function or dtype in a tuple variable
    if NC == 2:
        gl.warp_specialize([(_ws_consumer, (0, a_smem, b_smem, ready, empty, h_smem, c_smem, as_ptr, bs_ptr, sid_ptr,
                                         bexp_ptr, used_ptr, c_desc, cs_ptr, P, N, K, num_valid, stride_bse,
                                         stride_bsn, SWIGLU, ACT, FAST_DIV, ALIGN_M, GROUP_M, STAGES, BLOCK_M,
                                         BLOCK_N, BLOCK_K)),
                            (_ws_consumer, (1, a_smem, b_smem, ready, empty, h_smem, c_smem, as_ptr, bs_ptr, sid_ptr,
                                         bexp_ptr, used_ptr, c_desc, cs_ptr, P, N, K, num_valid, stride_bse,
                                         stride_bsn, SWIGLU, ACT, FAST_DIV, ALIGN_M, GROUP_M, STAGES, BLOCK_M,
                                         BLOCK_N, BLOCK_K)),
                            (_ws_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, bexp_ptr, used_ptr, N, K,
                                         ITEMS, ALIGN_M, GROUP_M, STAGES, BLOCK_M))],
                           [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_ws_consumer, (0, a_smem, b_smem, ready, empty, h_smem, c_smem, as_ptr, bs_ptr, sid_ptr,
                                         bexp_ptr, used_ptr, c_desc, cs_ptr, P, N, K, num_valid, stride_bse,
                                         stride_bsn, SWIGLU, ACT, FAST_DIV, ALIGN_M, GROUP_M, STAGES, BLOCK_M,
                                         BLOCK_N, BLOCK_K)),
                            (_ws_consumer, (1, a_smem, b_smem, ready, empty, h_smem, c_smem, as_ptr, bs_ptr, sid_ptr,
                                         bexp_ptr, used_ptr, c_desc, cs_ptr, P, N, K, num_valid, stride_bse,
                                         stride_bsn, SWIGLU, ACT, FAST_DIV, ALIGN_M, GROUP_M, STAGES, BLOCK_M,
                                         BLOCK_N, BLOCK_K)),
                            (_ws_consumer, (2, a_smem, b_smem, ready, empty, h_smem, c_smem, as_ptr, bs_ptr, sid_ptr,
                                         bexp_ptr, used_ptr, c_desc, cs_ptr, P, N, K, num_valid, stride_bse,
                                         stride_bsn, SWIGLU, ACT, FAST_DIV, ALIGN_M, GROUP_M, STAGES, BLOCK_M,
                                         BLOCK_N, BLOCK_K)),
                            (_ws_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, bexp_ptr, used_ptr, N, K,
                                         ITEMS, ALIGN_M, GROUP_M, STAGES, BLOCK_M))],
                           [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
