"""fp8_gemm's per-token x per-channel FP8 GEMM written in Gluon, for Hopper (sm_90), for long K.

    out[m, n] = (sum_k A[m, k] * B[n, k]) * a_scale[m] * b_scale[n]     (FP32 accumulate)

Why: past PROMOTE_MIN_K the tensor cores' chained sum must be promoted to FP32 now and then
(kernels/fp8_gemm.py, PROMOTE_MODES). In the ``tl.dot`` kernel a promotion waits for the whole
tile's wgmmas: both warpgroups of the 128-row tile drain at once and the tensor cores idle, ~1 us a
piece on an H100 (16384 x 1408 x 3840: 145 us in one chain, 157-168 us in two pieces, 150 us for
`_scaled_mm`). Here each 64-row part of a tile is its own consumer warpgroup (``gl.warp_specialize``:
two or three consumers and a one-warp TMA producer), each with its own wgmma chain and FP32 sum:
when one warpgroup waits for its chain and adds it into its sum, the other's wgmmas keep the tensor
cores busy.

A consumer's K loop: one asynchronous wgmma per 128-deep K block, chained into its product registers
(``use_acc``), the previous block's wgmma waited for (``warpgroup_mma_wait(num_outstanding=1)``) and
its ring buffer released; every PIECE blocks (and at the end of K) the chain is waited for and added
into the FP32 sum, and the next block starts a new chain (``use_acc=False``). The epilogue scales the
sum by the rows' and columns' scales (in that order, as fp8_gemm's) and stores it through shared
memory and TMA. Numerics: K summed in FP32 over chains of at most PIECE x 128 (the ``tl.dot`` kernel's
mode 2 sums at most PROMOTE_MIN_K), so the bits differ from fp8_gemm's by the chains' rounding.

TMA descriptors zero-fill out-of-bounds reads and drop out-of-bounds writes, so M, N and K tails need
no masks (rows need 16-byte alignment: K % 16 == 0, N * out_elem % 16 == 0: fp8_gemm.tma_ok).
Written against Triton 3.6's Gluon API, as grouped_gemm_gluon (grouped_gemm.GLUON_TRITON).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fp8conv.kernels.grouped_gemm_gluon import _GL_OUT, _acc_layout, _item_coords, _load_step, _nvmma

# consumer registers after setmaxnreg with two (three) consumer warpgroups and the 24 of the TMA warp
_CONSUMER_REGS = {2: 232, 3: 160}


@gluon.jit
def _dense_schedule(M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """(num_pid_m, num_pid_n, k_tiles, pid, progs, my_items) of this program: tiles pid, pid + progs, ..."""
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    pid = gl.program_id(0)
    progs = gl.num_programs(0)
    my_items = gl.cdiv(gl.maximum(num_pid_m * num_pid_n - pid, 0), progs)
    return num_pid_m, num_pid_n, gl.cdiv(K, BLOCK_K), pid, progs, my_items


@gluon.jit
def _dense_producer(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M: gl.constexpr,
                    STAGES: gl.constexpr, BLOCK_M: gl.constexpr):
    """The TMA loads of every K block of every tile into the ring; a buffer is refilled once every
    consumer has released it."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    num_pid_m, num_pid_n, k_tiles, pid, progs, my_items = _dense_schedule(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    step = 0
    for item in range(my_items):
        pid_m, pid_n, part = _item_coords(item, pid, progs, num_pid_m, num_pid_n, 1, GROUP_M)
        for kb in range(k_tiles):
            s = step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) - 1) & 1, pred=step >= STAGES)
            _load_step(s, pid_m * BLOCK_M, pid_n * BLOCK_N, kb * BLOCK_K, a_desc, b_desc, a_smem, b_smem, ready,
                       BLOCK_M)
            step += 1


@gluon.jit
def _dense_consumer(WG: gl.constexpr, a_smem, b_smem, ready, empty, c_smem, as_ptr, bs_ptr, c_desc, M, N, K,
                    GROUP_M: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    BLOCK_K: gl.constexpr, PIECE: gl.constexpr):
    """Rows [64 WG, 64 WG + 64) of every tile: chains of PIECE K blocks summed in FP32, then the epilogue."""
    NC: gl.constexpr = BLOCK_M // 64
    acc_l: gl.constexpr = _acc_layout(64, BLOCK_N, 4)
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    num_pid_m, num_pid_n, k_tiles, pid, progs, my_items = _dense_schedule(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    zero = gl.zeros([64, BLOCK_N], gl.float32, acc_l)
    prod = zero
    step = 0
    for item in range(my_items):
        pid_m, pid_n, part = _item_coords(item, pid, progs, num_pid_m, num_pid_n, 1, GROUP_M)
        off_m = pid_m * BLOCK_M + 64 * WG
        off_n = pid_n * BLOCK_N
        acc = zero
        for k0 in range(0, k_tiles, PIECE):
            # the chain's first block overwrites the product registers (use_acc=False)
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            prod = warpgroup_mma(a_smem.index(s * NC + WG), b_smem.index(s).permute((1, 0)), prod, use_acc=False,
                                 is_async=True)
            prod = warpgroup_mma_wait(num_outstanding=1, deps=(prod,))  # returns at once: it stays in flight
            step += 1
            for kb in range(k0 + 1, gl.minimum(k0 + PIECE, k_tiles)):
                s = step % STAGES
                mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                prod = warpgroup_mma(a_smem.index(s * NC + WG), b_smem.index(s).permute((1, 0)), prod,
                                     is_async=True)
                prod = warpgroup_mma_wait(num_outstanding=1, deps=(prod,))  # the previous block's retires
                mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
                step += 1
            prod = warpgroup_mma_wait(num_outstanding=0, deps=(prod,))
            mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
            acc = acc + prod
        offs_m = off_m + gl.arange(0, 64, layout=row_l)
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=col_l)
        sa = gl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
        sb = gl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
        tma.store_wait(pendings=0)  # this warpgroup's previous tile has left its buffer
        c_smem.index(WG).store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem.index(WG))
    tma.store_wait(pendings=0)


@gluon.jit
def _dense_ws_kernel(a_desc, as_ptr, b_desc, bs_ptr, c_desc, M, N, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                     BLOCK_M: gl.constexpr, PIECE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                     num_warps: gl.constexpr):
    """Persistent: program i takes tiles i, i + grid, ... (GROUP_M-swizzled, as fp8_gemm's). A's
    descriptor box is 64 rows (one buffer per consumer warpgroup), B's [BLOCK_N, BLOCK_K], C's [64, BLOCK_N].
    Warpgroup 0 (this kernel's 4 warps) and one or two worker warpgroups consume, a 1-warp worker loads."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    NC: gl.constexpr = BLOCK_M // 64
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES * NC, 64, BLOCK_K], a_desc.layout)  # [stage, warpgroup]
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [NC, 64, BLOCK_N], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NC)  # one arrive per consumer warpgroup
    # each partition's arguments spelled out: Gluon 3.6 keeps no JIT function in a tuple variable
    if NC == 2:
        gl.warp_specialize([(_dense_consumer, (0, a_smem, b_smem, ready, empty, c_smem, as_ptr, bs_ptr, c_desc, M, N,
                                               K, GROUP_M, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, PIECE)),
                            (_dense_consumer, (1, a_smem, b_smem, ready, empty, c_smem, as_ptr, bs_ptr, c_desc, M, N,
                                               K, GROUP_M, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, PIECE)),
                            (_dense_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M,
                                               STAGES, BLOCK_M))],
                           [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_dense_consumer, (0, a_smem, b_smem, ready, empty, c_smem, as_ptr, bs_ptr, c_desc, M, N,
                                               K, GROUP_M, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, PIECE)),
                            (_dense_consumer, (1, a_smem, b_smem, ready, empty, c_smem, as_ptr, bs_ptr, c_desc, M, N,
                                               K, GROUP_M, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, PIECE)),
                            (_dense_consumer, (2, a_smem, b_smem, ready, empty, c_smem, as_ptr, bs_ptr, c_desc, M, N,
                                               K, GROUP_M, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, PIECE)),
                            (_dense_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M,
                                               STAGES, BLOCK_M))],
                           [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


def launch(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor, *,
           block_m: int, block_n: int, group_m: int, stages: int, piece: int, programs: int):
    """Launch on checked operands (fp8_gemm.fp8_gemm_nt checks them): a (M, K) and b (N, K) contiguous FP8,
    a_scale (M,) and b_scale (N,) contiguous float32, out (M, N) contiguous; block_m 128 or 192 (two or
    three consumer warpgroups), block_n 64 or 128, BLOCK_K 128, piece K blocks a chain, programs the grid."""
    if block_m // 64 not in _CONSUMER_REGS or block_m % 64 or block_n not in (64, 128) or piece < 1 or stages < 2:
        raise ValueError(f"fp8_gemm_gluon: no form for block_m {block_m}, block_n {block_n}, piece {piece}, "
                         f"stages {stages} (block_m 128 or 192, block_n 64 or 128)")
    m, k = a.shape
    n = b.shape[0]
    a_d = TensorDescriptor.from_tensor(a, [64, 128], _nvmma([64, 128], gl.float8e4nv))
    b_d = TensorDescriptor.from_tensor(b, [block_n, 128], _nvmma([block_n, 128], gl.float8e4nv))
    c_d = TensorDescriptor.from_tensor(out, [64, block_n], _nvmma([64, block_n], _GL_OUT[out.dtype]))
    return _dense_ws_kernel[(programs,)](a_d, a_scale, b_d, b_scale, c_d, m, n, k, GROUP_M=group_m, STAGES=stages,
                                         BLOCK_M=block_m, PIECE=piece, CONSUMER_REGS=_CONSUMER_REGS[block_m // 64],
                                         num_warps=4)
