"""Exact top-k along the last dimension by radix select: beam search's per-step top-k.

``topk(scores, k)`` returns what ``torch.topk(scores, k, dim=-1, sorted=True)`` returns, as float32
values (bit-identical: read back from ``scores``) and int64 indices, with a fixed order among equal
values: the lower index first.

Order. Each element gets an order-preserving 32-bit key (float32 bits with the sign bit flipped for
positives and all bits flipped for negatives; every NaN maps to 2^32 - 1, so NaN ranks above +inf, as
torch.topk ranks it, and -0.0 ranks just below +0.0, as torch's CUDA radix select ranks them). Ties
are broken through a unique 62-bit *composite* ``ck = key * C + (C - 1 - index)``: a larger composite
is a larger value, or an equal value at a lower index, and the answer is the k largest composites.

Radix select ("narrowing"): a range [lo, hi] of composites is known to hold the k-th largest, with
``above`` elements beyond it; a 256-bin histogram (``tl.histogram``) of the elements in the range,
each bin 2^shift composites wide (shift = bitlen(hi - lo) - 8), gives the bin d that holds the k-th
largest, which becomes the range. Each level takes 8 bits off the range, which need not be aligned.
(256 bins: tl.histogram merges its per-warp counts through shared-memory atomics, num_warps x bins of
them, bank-conflicted beyond 256 bins; 2048 bins would cost more than the memory traffic.)

Long rows (C > SMALL_C), several programs per row (KernelConfig.BLOCK_N elements each, streamed in
BLOCK_K steps), no host synchronisation:
  1. _sample: one program per row reads a sample of the row (512 blocks of 32, evenly spread) and
     narrows to a key L that about j of the sample reach, j chosen so that ~4k + 1024 elements of the
     row should be above L. Zeroes the counters.
  2. _filter (the one full read): every element with key > L is appended to a candidate buffer
     (R, cap); elements == L are counted per program.
  3. _stage2: each row is READY (k <= #(> L) <= cap: the answer is among the candidates), TIES
     (#(> L) < k <= #(>= L): the answer is the candidates plus the lowest-index elements == L, which
     the programs holding them append in index order from the per-program counts; mostly -inf or
     all-equal rows land here, reading only the chunks they need) or FALLBACK (the sample misled: L
     too high or too low; the range is narrowed from what the counts prove).
  4. _pass x levels: FALLBACK rows narrow by full reads, one level per pass, and gather once the
     elements at or above the range fit the buffer; READY/TIES rows return at once.
  5. _rows, one program per row: narrows the ~4k candidates to a tile of 2 * next_pow2(k), which it
     sorts (``tl.topk``, bitonic on composites); index from the composite, value read from ``scores``.
Short rows (C <= SMALL_C, or <= 16 * SMALL_C where k is too large a share of the row for the filter):
_rows alone, reading the row itself (a min/max pass, a level or two of narrowing, the sort).
k > SORT_MAX: _rows narrows until exactly k remain, writes their composites and ``torch.sort`` orders
them (a device sort).

Every launch and size follows from (R, C, k), so ``topk`` can be captured in a CUDA graph (the
workspaces come from torch's caching allocator).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8conv.kernels.config import KernelConfig, default_config

KERNEL_NAME = "topk"

NB_LOG = 8
NB = 1 << NB_LOG  # histogram bins per narrowing level
SMALL_C = 16384  # rows up to this long: one program per row
CAND_CAP = 16384  # candidate buffer per row, at least (4k + 1024 are expected)
SORT_MAX = 2048  # k up to this: sorted in the kernel; larger k: torch.sort of the k composites
SAMPLE_BLOCKS, SAMPLE_LEN = 512, 32
ROWS_BLOCK = 2048  # elements per step of the sample and final per-row kernels (short rows: config.BLOCK_K)
MAX_ROWS_PER_LAUNCH = 65535  # CUDA grid y limit: the multi-program path takes more rows in slices

# per-row state records (int64 fields) of the multi-program path
_LO = tl.constexpr(0)
_HI = tl.constexpr(1)
_ABOVE = tl.constexpr(2)
_EQ = tl.constexpr(3)
_MODE = tl.constexpr(4)
_NA = tl.constexpr(5)  # candidates in the buffer once done
_SHIFT = tl.constexpr(6)
_CASE = tl.constexpr(7)  # how stage 2 found the row (for tests): 1 ready, 2 ties, 3/4 L too high/low, 5 no filter
_NF = tl.constexpr(8)
_DONE = tl.constexpr(1)


def _plan(c: int, k: int) -> tuple[bool, int, int]:
    """(use the sample filter, sample rank j of its threshold, candidate buffer per row). The filter
    aims at ~4k + 1024 elements above its threshold (the count of a sample order statistic: j >= 5
    keeps the odds of fewer than k, which costs the fallback's passes, negligible) and is skipped
    where that is more than an eighth of the row (k close to C)."""
    s = SAMPLE_BLOCKS * SAMPLE_LEN
    target = 4 * k + 1024
    j = -(-s * target // c)
    use = j <= s // 8
    return use, j, min(c, max(CAND_CAP, 2 * target if use else 0, k))


def one_program_per_row(c: int, k: int) -> bool:
    """Whether ``topk`` (single_program=None) takes the one-program-per-row path for rows of c with this k:
    rows of at most SMALL_C, and rows up to 16 * SMALL_C where k is too large a share for the sample filter.
    Which config fields matter follows from it (the tuner's search space, fp8conv.tuning.candidates)."""
    return c <= SMALL_C or (c <= 16 * SMALL_C and not _plan(c, k)[0])


# -- device helpers ----------------------------------------------------------------------------------

@triton.jit
def _key32(x):
    """Order-preserving key of x (any float dtype), uint32: float32 bits with the sign bit flipped
    (x >= +0.0) or all bits flipped (x <= -0.0); NaN (any sign or payload) -> 2^32 - 1."""
    xf = x.to(tl.float32)
    b = xf.to(tl.int32, bitcast=True)
    k32 = tl.where(b < 0, ~b, b ^ -2147483648)
    k32 = tl.where(xf != xf, -1, k32)
    return k32.to(tl.uint32, bitcast=True)


@triton.jit
def _key(x):
    """_key32 as int64 in [0, 2^32)."""
    return _key32(x).to(tl.int64)


@triton.jit
def _bitlen(x):
    """Number of bits of int64 x >= 0 (0 for 0), by binary search."""
    b = x * 0
    b = tl.where((x >> (b + 32)) > 0, b + 32, b)
    b = tl.where((x >> (b + 16)) > 0, b + 16, b)
    b = tl.where((x >> (b + 8)) > 0, b + 8, b)
    b = tl.where((x >> (b + 4)) > 0, b + 4, b)
    b = tl.where((x >> (b + 2)) > 0, b + 2, b)
    b = tl.where((x >> (b + 1)) > 0, b + 1, b)
    return b + (x >> b)


@triton.jit
def _shift_for(lo, hi, NB_LOG: tl.constexpr):
    """log2 of the bin width so that 2^NB_LOG bins cover [lo, hi]."""
    return tl.maximum(_bitlen(hi - lo) - NB_LOG, 0)


@triton.jit
def _select(h, above, k, lo, hi, shift, NB: tl.constexpr):
    """h (NB,) int32: histogram of the elements in [lo, hi] (bins of 2^shift); above: elements beyond
    hi. Returns the range of the bin that holds the k-th largest, the elements beyond it and in it."""
    bins = tl.arange(0, NB)
    suf = tl.cumsum(h, 0, reverse=True)  # suf[j]: elements in bins >= j
    d = tl.max(tl.where(suf >= k - above, bins, -1), 0)
    hd = tl.sum(tl.where(bins == d, h, 0), 0)
    sd = tl.sum(tl.where(bins == d, suf, 0), 0)
    new_lo = lo + (d.to(tl.int64) << shift)
    new_hi = tl.minimum(hi, new_lo + (((lo * 0 + 1) << shift) - 1))
    return new_lo, new_hi, above + (sd - hd).to(tl.int64), hd.to(tl.int64)


@triton.jit
def _composite(x_row, offs, mask, C):
    """Composites of x_row[offs] (int64; garbage where ~mask)."""
    v = tl.load(x_row + offs, mask=mask, other=0.0)
    return _key(v) * C + (C - 1 - offs)


@triton.jit
def _range_hist(x_row, start, end, C, lo, hi, shift, BLOCK: tl.constexpr, NB: tl.constexpr):
    """Histogram of the composites of x_row[start:end] that lie in [lo, hi]: NB bins of 2**shift from lo."""
    acc = tl.zeros([NB], dtype=tl.int32)
    for s in range(start, end, BLOCK):
        o = s + tl.arange(0, BLOCK)
        ck = _composite(x_row, o, o < end, C)
        g = (o < end) & (ck >= lo) & (ck <= hi)
        acc += tl.histogram(tl.where(g, (ck - lo) >> shift, 0).to(tl.int32), NB, mask=g)
    return acc


@triton.jit
def _load_ck(x_row, cand_row, o, m, C, FROM_X: tl.constexpr):
    """Composites of elements o of the row (FROM_X) or of the candidate buffer (-1 where ~m)."""
    if FROM_X:
        ck = tl.where(m, _composite(x_row, o, m, C), -1)
    else:
        ck = tl.load(cand_row + o, mask=m, other=-1)
    return ck


@triton.jit
def _minmax(x_row, cand_row, n, C, FROM_X: tl.constexpr, BLOCK: tl.constexpr):
    """Smallest and largest composite (>= 0) of the n elements."""
    mn = tl.full([BLOCK], 9223372036854775807, tl.int64)
    mx = tl.full([BLOCK], -1, tl.int64)
    for s in range(0, n, BLOCK):
        o = s + tl.arange(0, BLOCK)
        ck = _load_ck(x_row, cand_row, o, o < n, C, FROM_X)
        mn = tl.minimum(mn, tl.where(ck >= 0, ck, 9223372036854775807))
        mx = tl.maximum(mx, ck)
    return tl.min(mn, 0), tl.max(mx, 0)


@triton.jit
def _narrow_loop(x_row, cand_row, n, C, lo, hi, above, eq, k, stop, FROM_X: tl.constexpr,
                 EXACT: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                 NB_LOG: tl.constexpr):
    """One program narrows [lo, hi] over n elements until above + eq <= stop (EXACT: == k)."""
    for _ in range(LEVELS):
        if EXACT:
            go = above + eq != k
        else:
            go = above + eq > stop
        if go:
            shift = _shift_for(lo, hi, NB_LOG)
            acc = tl.zeros([NB], dtype=tl.int32)
            for s in range(0, n, BLOCK):
                o = s + tl.arange(0, BLOCK)
                ck = _load_ck(x_row, cand_row, o, o < n, C, FROM_X)
                g = (ck >= lo) & (ck <= hi)
                acc += tl.histogram(tl.where(g, (ck - lo) >> shift, 0).to(tl.int32), NB, mask=g)
            lo, hi, above, eq = _select(acc, above, k, lo, hi, shift, NB)
    return lo, hi, above, eq


@triton.jit
def _field(rec, i: tl.constexpr):
    """Field i of a state record (_NF int64)."""
    return tl.sum(tl.where(tl.arange(0, _NF) == i, rec, 0), 0)


@triton.jit
def _record(lo, hi, above, eq, mode, na, shift, case):
    """A state record of these fields."""
    f = tl.arange(0, _NF)
    rec = tl.where(f == _LO, lo, 0) + tl.where(f == _HI, hi, 0) + tl.where(f == _ABOVE, above, 0)
    rec += tl.where(f == _EQ, eq, 0) + tl.where(f == _MODE, mode, 0) + tl.where(f == _NA, na, 0)
    return rec + tl.where(f == _SHIFT, shift, 0) + tl.where(f == _CASE, case, 0)


@triton.jit
def _append(dst, count_ptr, ck, g, cap):
    """Append the composites ck[g] at dst[slot] (slot < cap), slots taken from *count_ptr, one atomic
    per element (few are appended; a block-wide cumsum would double the registers of the streaming
    loops); the order is arbitrary, the readers sort by composite."""
    if tl.sum(g.to(tl.int32), 0) > 0:
        slot = tl.atomic_add(count_ptr + g.to(tl.int32) * 0, 1, mask=g, sem="relaxed")
        tl.store(dst + slot, ck, mask=g & (slot < cap))


# -- multi-program path (long rows) ----------------------------------------------------------------------

@triton.jit
def _sample_kernel(x_ptr, stride_x, C, j, thr_ptr, samp_ptr, cnt_ptr, hist_ptr, HZ,
                   USE_FILTER: tl.constexpr, NBLK: tl.constexpr, SB: tl.constexpr, S: tl.constexpr,
                   LEVELS: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, NB_LOG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zero = row * 0
    c64 = zero + C
    tl.store(cnt_ptr + row * 2 + tl.arange(0, 2), tl.zeros([2], dtype=tl.int32))
    for s in range(0, HZ, BLOCK):
        o = s + tl.arange(0, BLOCK)
        tl.store(hist_ptr + row * HZ + o, tl.zeros([BLOCK], dtype=tl.int32), mask=o < HZ)
    if USE_FILTER:
        x_row = x_ptr + row * stride_x
        samp_row = samp_ptr + row * S
        nvalid = zero
        for s in range(0, S, BLOCK):
            i = s + tl.arange(0, BLOCK)
            pos = ((i // SB) * c64) // NBLK + (i % SB)
            valid = (pos < c64) & (i < S)
            key = _key(tl.load(x_row + pos, mask=valid, other=0.0))
            tl.store(samp_row + i, tl.where(valid, key * S + (S - 1 - i), -1), mask=i < S)
            nvalid += tl.sum(valid.to(tl.int64), 0)
        tl.debug_barrier()
        lo, hi = _minmax(x_row, samp_row, S, S, False, BLOCK)
        jj = tl.minimum(zero + j, nvalid)
        # stop once at most j + j/4 sample elements are >= lo: L = key(lo) is reached by >= j of them
        lo, hi, above, eq = _narrow_loop(x_row, samp_row, S, S, lo, hi, zero, nvalid, jj, jj + jj // 4,
                                         False, False, LEVELS, BLOCK, NB, NB_LOG)
        tl.store(thr_ptr + row, lo // S)


@triton.jit
def _filter_kernel(x_ptr, stride_x, C, thr_ptr, cand_ptr, cnt_ptr, eqc_ptr, capk, P,
                   BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # offsets within a row are int32 (C <= 2^30)
    row = tl.program_id(1).to(tl.int64)
    thr = tl.load(thr_ptr + row).to(tl.uint32)
    x_row = x_ptr + row * stride_x
    start = pid * BLOCK_N
    end = tl.minimum(start + BLOCK_N, C)
    neq = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(start, end, BLOCK):
        o = s + tl.arange(0, BLOCK)
        m = o < end
        key = _key32(tl.load(x_row + o, mask=m, other=0.0))
        neq += (m & (key == thr)).to(tl.int32)
        gt = m & (key > thr)
        if tl.sum(gt.to(tl.int32), 0) > 0:
            ck = key.to(tl.int64) * C + (C - 1 - o)
            _append(cand_ptr + row * capk, cnt_ptr + row * 2, ck, gt, capk)
    tl.store(eqc_ptr + row * P + pid, tl.sum(neq, 0))


@triton.jit
def _stage2_kernel(x_ptr, stride_x, C, k, thr_ptr, cand_ptr, cnt_ptr, eqc_ptr, state_ptr, hist_ptr,
                   capk, P, NLS, NLH, maxc, USE_FILTER: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK: tl.constexpr, NB: tl.constexpr, NB_LOG: tl.constexpr, PB: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    zero = row * 0
    c64 = zero + C
    k64 = zero + k
    x_row = x_ptr + row * stride_x
    start = pid * BLOCK_N
    end = tl.minimum(start + BLOCK_N, c64)
    rec_ptr = state_ptr + row * NLS * _NF + tl.arange(0, _NF)
    if USE_FILTER:
        thr = tl.load(thr_ptr + row)
        ngt = tl.load(cnt_ptr + row * 2).to(tl.int64)
        neq = zero
        before = zero  # elements == thr in the programs before this one
        for qs in range(0, P, PB):
            q = qs + tl.arange(0, PB)
            e = tl.load(eqc_ptr + row * P + q, mask=q < P, other=0).to(tl.int64)
            neq += tl.sum(e, 0)
            before += tl.sum(tl.where(q < pid, e, 0), 0)
        ready = (ngt >= k64) & (ngt <= capk)
        ties = (ngt < k64) & (ngt + neq >= k64)
    else:
        thr = zero
        ngt = zero
        neq = zero
        before = zero
        ready = zero != 0
        ties = zero != 0
    if ready | ties:
        if pid == 0:
            tl.store(rec_ptr, _record(zero, zero, zero, zero, zero + _DONE, tl.where(ready, ngt, k64), zero,
                                      tl.where(ready, 1, 2)))
        if ties:  # append the first k - ngt elements == thr, in index order, after the ngt above it
            m = k64 - ngt
            run = before
            for s in range(start, end, BLOCK):
                if run < m:
                    o = s + tl.arange(0, BLOCK)
                    mk = o < end
                    key = _key(tl.load(x_row + o, mask=mk, other=0.0))
                    e = (mk & (key == thr)).to(tl.int32)
                    r = run + tl.cumsum(e, 0) - 1
                    take = (e > 0) & (r < m)
                    tl.store(cand_ptr + row * capk + ngt + r, key * C + (C - 1 - o), mask=take)
                    run += tl.sum(e, 0)
    else:  # fallback: narrow by full reads from the range the counts prove
        if USE_FILTER:
            low = ngt + neq < k64  # thr too high: everything >= thr is in, the k-th is below it
            lo = tl.where(low, 0, (thr + 1) * c64)
            hi = tl.where(low, thr * c64 - 1, zero + maxc)
            above = tl.where(low, ngt + neq, 0)
            eq = tl.where(low, c64 - ngt - neq, ngt)
            case = tl.where(low, 3, 4)
        else:
            lo = zero
            hi = zero + maxc
            above = zero
            eq = c64
            case = zero + 5
        shift = _shift_for(lo, hi, NB_LOG)
        if pid == 0:
            tl.store(rec_ptr, _record(lo, hi, above, eq, zero, zero, shift, case))
        acc = _range_hist(x_row, start, end, C, lo, hi, shift, BLOCK, NB)
        tl.atomic_add(hist_ptr + row * NLH * NB + tl.arange(0, NB), acc, mask=acc > 0, sem="relaxed")


@triton.jit
def _pass_kernel(x_ptr, stride_x, C, k, state_ptr, hist_ptr, cand_ptr, cnt_ptr, capk, lvl, NLS, NLH,
                 LAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                 NB_LOG: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    zero = row * 0
    f = tl.arange(0, _NF)
    prev = state_ptr + row * NLS * _NF + (lvl - 1) * _NF
    rec = tl.load(prev + f)
    if _field(rec, _MODE) == _DONE:
        if pid == 0:
            tl.store(prev + _NF + f, rec)
    else:
        lo = _field(rec, _LO)
        hi = _field(rec, _HI)
        above = _field(rec, _ABOVE)
        shift = _field(rec, _SHIFT)
        h = tl.load(hist_ptr + (row * NLH + lvl - 1) * NB + tl.arange(0, NB))
        lo, hi, above, eq = _select(h, above, zero + k, lo, hi, shift, NB)
        shift = _shift_for(lo, hi, NB_LOG)
        if LAST:
            done = zero == 0
        else:
            done = above + eq <= capk
        if pid == 0:
            tl.store(prev + _NF + f, _record(lo, hi, above, eq, done.to(tl.int64), tl.where(done, above + eq, 0),
                                             shift, _field(rec, _CASE)))
        x_row = x_ptr + row * stride_x
        start = pid * BLOCK_N
        end = tl.minimum(start + BLOCK_N, zero + C)
        if done:  # gather every element >= lo: above + eq of them, at most capk
            for s in range(start, end, BLOCK):
                o = s + tl.arange(0, BLOCK)
                ck = _composite(x_row, o, o < end, C)
                _append(cand_ptr + row * capk, cnt_ptr + row * 2 + 1, ck, (o < end) & (ck >= lo), capk)
        else:  # histogram of the new range
            acc = _range_hist(x_row, start, end, C, lo, hi, shift, BLOCK, NB)
            tl.atomic_add(hist_ptr + (row * NLH + lvl) * NB + tl.arange(0, NB), acc, mask=acc > 0,
                          sem="relaxed")


# -- one program per row: short rows, or the candidates of long ones ----------------------------------------

@triton.jit
def _rows_kernel(x_ptr, stride_x, C, k, state_ptr, cand_ptr, capk, lvl, NLS,
                 scratch_ptr, ov_ptr, oi_ptr, ock_ptr,
                 FROM_X: tl.constexpr, EXACT: tl.constexpr, LEVELS: tl.constexpr,
                 BLOCK: tl.constexpr, TILE: tl.constexpr, KP: tl.constexpr,
                 NB: tl.constexpr, NB_LOG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zero = row * 0
    k64 = zero + k
    x_row = x_ptr + row * stride_x
    cand_row = cand_ptr + row * capk
    if FROM_X:
        n = zero + C
    else:
        n = _field(tl.load(state_ptr + row * NLS * _NF + lvl * _NF + tl.arange(0, _NF)), _NA)
    lo, hi = _minmax(x_row, cand_row, n, C, FROM_X, BLOCK)
    lo, hi, above, eq = _narrow_loop(x_row, cand_row, n, C, lo, hi, zero, n, k64, zero + TILE,
                                     FROM_X, EXACT, LEVELS, BLOCK, NB, NB_LOG)
    # gather the elements >= lo (above + eq of them), in order
    if EXACT:
        dst = ock_ptr + row * k
    else:
        dst = scratch_ptr + row * TILE
    cnt = zero.to(tl.int32)
    for s in range(0, n, BLOCK):
        o = s + tl.arange(0, BLOCK)
        ck = _load_ck(x_row, cand_row, o, o < n, C, FROM_X)
        g = (ck >= lo).to(tl.int32)
        tl.store(dst + cnt + tl.cumsum(g, 0) - 1, ck, mask=g > 0)
        cnt += tl.sum(g, 0)
    if not EXACT:
        tl.debug_barrier()  # the tile is read back by other threads of this program
        j = tl.arange(0, TILE)
        t = tl.load(dst + j, mask=j < cnt, other=-1)
        top = tl.topk(t, KP)  # descending composites: descending value, then ascending index
        jj = tl.arange(0, KP)
        keep = jj < k
        idx = (C - 1) - top % C
        v = tl.load(x_row + idx, mask=keep, other=0.0)
        tl.store(ov_ptr + row * k + jj, v.to(tl.float32), mask=keep)
        tl.store(oi_ptr + row * k + jj, idx, mask=keep)


# -- launcher ------------------------------------------------------------------------------------------

def _levels(span: int) -> int:
    """Narrowing levels that take a range of span + 1 composites to one."""
    return max(1, -(-span.bit_length() // NB_LOG))


def _multi(scores, k, cfg, scratch, out_v, out_i, ock, exact, tile, kp, trace):
    r, c = scores.shape
    dev = scores.device
    maxc = (c << 32) - 1
    levels = _levels(maxc)
    nls, nlh = levels + 1, levels  # state records 0..levels; histograms 0..levels-1
    chunk = cfg.BLOCK_N
    block = min(cfg.BLOCK_K, chunk)
    progs = triton.cdiv(c, chunk)
    s_total = SAMPLE_BLOCKS * SAMPLE_LEN
    use_filter, j, capk = _plan(c, k)
    j = max(1, min(j, s_total))
    capk = min(c, max(capk, k))
    i64, i32 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.int32, device=dev)
    state = torch.empty(r, nls, int(_NF), **i64)
    hist = torch.empty(r, nlh, NB, **i32)
    cnt = torch.empty(r, 2, **i32)  # candidates appended by the filter, by the fallback
    eqc = torch.empty(r, progs, **i32)
    thr = torch.empty(r, **i64)
    samp = torch.empty(r, s_total if use_filter else 1, **i64)
    cand = torch.empty(r, capk, **i64)
    stride = scores.stride(0)
    _sample_kernel[(r,)](scores, stride, c, j, thr, samp, cnt, hist, nlh * NB, USE_FILTER=use_filter,
                         NBLK=SAMPLE_BLOCKS, SB=SAMPLE_LEN, S=s_total, LEVELS=_levels((2**32) * s_total),
                         BLOCK=ROWS_BLOCK, NB=NB, NB_LOG=NB_LOG, num_warps=8)
    if use_filter:
        _filter_kernel[(progs, r)](scores, stride, c, thr, cand, cnt, eqc, capk, progs,
                                   BLOCK_N=chunk, BLOCK=block, num_warps=cfg.num_warps)
    _stage2_kernel[(progs, r)](scores, stride, c, k, thr, cand, cnt, eqc, state, hist, capk, progs, nls, nlh,
                               maxc, USE_FILTER=use_filter, BLOCK_N=chunk, BLOCK=block, NB=NB, NB_LOG=NB_LOG,
                               PB=1024, num_warps=cfg.num_warps)
    for lvl in range(1, levels + 1):
        _pass_kernel[(progs, r)](scores, stride, c, k, state, hist, cand, cnt, capk, lvl, nls, nlh,
                                 LAST=lvl == levels, BLOCK_N=chunk, BLOCK=block, NB=NB, NB_LOG=NB_LOG,
                                 num_warps=cfg.num_warps)
    _rows_kernel[(r,)](scores, stride, c, k, state, cand, capk, levels, nls, scratch, out_v, out_i, ock,
                       FROM_X=False, EXACT=exact, LEVELS=levels, BLOCK=ROWS_BLOCK, TILE=tile, KP=kp,
                       NB=NB, NB_LOG=NB_LOG, num_warps=8)
    if trace is not None:
        trace.setdefault("case", []).append(state[:, 0, int(_CASE)])
        trace.setdefault("candidates", []).append(state[:, -1, int(_NA)])


def topk(scores: torch.Tensor, k: int, config: KernelConfig | None = None, *,
         single_program: bool | None = None, _trace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row, sorted: ``torch.topk(scores, k, dim=-1, sorted=True)``.

    scores: (R, C) float32, bfloat16 or float16 with unit column stride (any row stride), C <= 2^30;
    1 <= k <= C. Returns (values (R, k) float32 contiguous, descending; indices (R, k) int64
    contiguous). The values are bit-identical to torch.topk's (read back from ``scores``; bf16/fp16
    values are widened to float32 exactly), -inf included. Equal values come lowest index first
    (torch leaves their order unspecified). NaN ranks above +inf, as in torch.topk, NaNs among
    themselves lowest index first; -0.0 ranks just below +0.0 (IEEE-equal; torch's CUDA radix select
    orders them the same way).

    config: KernelConfig of the "topk" kernel (default: fp8conv.kernels.config.default_config):
    BLOCK_N = elements per program of the multi-program path, BLOCK_K = elements per loop step of its
    streaming passes (filter, stage 2, narrowing passes; capped at BLOCK_N) and of the one-program-per-row
    path's reads of the row, num_warps of those kernels; the other fields are unused, and so is the config
    by the sample kernel and the final per-row kernel of the multi-program path (ROWS_BLOCK elements per
    step, 8 warps: they read a 16K sample and the ~4k + 1024 candidates, whatever the row length). The
    fp8conv.kernels backend passes the tuned config (fp8conv.kernels.config.resolve_config); a direct call
    without one uses the default. single_program: force (True) or forbid (False) the
    one-program-per-row path; None: rows of at most SMALL_C elements take it (and rows up to
    16 * SMALL_C where k is too large a share for the sample filter). No host synchronisation
    (CUDA-graph capturable). See the module docstring for the algorithm. _trace (tests): a dict that
    receives the multi-program path's per-row stage-2 case and candidate count (device tensors).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        what = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"Expected scores to be a 2-D tensor (rows, candidates), got {what}")
    if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"Expected scores to be float32, bfloat16 or float16, got {scores.dtype} instead.")
    r, c = scores.shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 1 <= k <= c:
        raise ValueError(f"k must be between 1 and the row length {c}, got {k}")
    if c > 2**30:
        raise ValueError(f"rows of at most 2^30 candidates are supported, got {c}")
    if scores.stride(1) != 1 and c > 1:
        raise ValueError(f"Expected scores to have unit stride along the row, got strides {scores.stride()}")
    dev = scores.device
    out_v = torch.empty(r, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(r, k, dtype=torch.int64, device=dev)
    if r == 0:
        return out_v, out_i
    cfg = config or default_config(KERNEL_NAME, r, c, k)
    exact = k > SORT_MAX
    kp = max(2, triton.next_power_of_2(k))  # tl.topk(x, 1) does not compile in Triton 3.6
    tile = max(16, 2 * kp)
    if exact:  # the k composites, for torch.sort
        ock = torch.empty(r, k, dtype=torch.int64, device=dev)
        scratch = ock
    else:
        scratch = torch.empty(r, tile, dtype=torch.int64, device=dev)
        ock = scratch
    if single_program is None:  # rows too short for the sample filter narrow in one program up to 256K
        small = one_program_per_row(c, k)
    else:
        small = single_program
    if small:  # the row streamed in BLOCK_K steps by num_warps warps (the default: ROWS_BLOCK, 8)
        _rows_kernel[(r,)](scores, scores.stride(0), c, k, scratch, scratch, 0, 0, 0,
                           scratch, out_v, out_i, ock, FROM_X=True, EXACT=exact, LEVELS=_levels((c << 32) - 1),
                           BLOCK=cfg.BLOCK_K, TILE=tile, KP=kp, NB=NB, NB_LOG=NB_LOG, num_warps=cfg.num_warps)
    else:
        for r0 in range(0, r, MAX_ROWS_PER_LAUNCH):
            r1 = min(r, r0 + MAX_ROWS_PER_LAUNCH)
            _multi(scores[r0:r1], k, cfg, scratch[r0:r1], out_v[r0:r1], out_i[r0:r1], ock[r0:r1],
                   exact, tile, kp, _trace)
    if exact:
        srt = torch.sort(ock, dim=1, descending=True).values
        out_i.copy_((c - 1) - srt % c)
        out_v.copy_(scores.gather(1, out_i))
    return out_v, out_i
