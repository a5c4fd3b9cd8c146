"""The converter's FP8 weight quantization: bit-exact to fp8conv.numerics, but chunked and cheap.

fp8conv.numerics states the contract on whole tensors (several full-size float32 temporaries). Here a
weight is cut into row chunks (whole 128-row block rows for the block scheme) that fit in cache; each
chunk is widened once into a reusable float32 scratch buffer and everything else happens in place:
amax, scale = amax / 448 (1 for an all-zero row or block), true division, clamp, round-to-nearest-even
cast. The same float32 operations on the same values give the same bits (tests/test_quantize.py
checks against numerics and an independent reference).

The manifest's errors come from the same pass: ||deq - w||^2 and ||w||^2 per chunk, summed in chunk
order (so the result does not depend on the thread count). Widening FP8 back to float32 is slow in
torch on the CPU (~5 ns/element), so it goes through float16 bits instead (see _dequant).

Chunks are independent: the caller runs them on a thread pool (torch ops release the GIL).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from fp8conv.numerics import BLOCK, FP8_DTYPE, FP8_MAX

CHUNK_ELEMS = 1 << 19  # 2 MB of float32 per chunk: big enough to amortise ~25 op dispatches, fits L3


@dataclass(frozen=True)
class ChunkStats:
    amax: float  # max |w| (nan/inf when the chunk holds a nan/inf)
    noise: float  # sum (deq - w)^2
    signal: float  # sum w^2


def row_chunks(scheme: str, n: int, k: int, device: str = "cpu") -> list[tuple[int, int]]:
    """[start, stop) row ranges; block chunks are whole 128-row block rows."""
    if device != "cpu":  # a GPU wants the whole tensor at once
        return [(0, n)]
    unit = BLOCK if scheme == "block" else 1
    rows = unit * max(1, CHUNK_ELEMS // (unit * max(k, 1)))
    return [(r, min(r + rows, n)) for r in range(0, n, rows)]


class _Scratch(threading.local):
    """Per-thread float32 buffers, grown on demand and reused across chunks and tensors."""

    def get(self, slot: str, numel: int, device: torch.device) -> torch.Tensor:
        key = (slot, device)
        buf = self.__dict__.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            self.__dict__[key] = buf
        return buf[:numel]


_scratch = _Scratch()


def _scale(amax: torch.Tensor) -> torch.Tensor:
    # Divide by a tensor, not the Python number 448: on CUDA, torch turns division by a scalar into
    # multiplication by its (inexact) reciprocal, which changes some scales in the last bit and then
    # the FP8 codes of ties (measured on an H100, torch 2.11). Tensor / tensor is true division.
    scale = amax / torch.full_like(amax, FP8_MAX)
    return scale.masked_fill_(amax == 0, 1.0)


def _dequant(q: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, float]:
    """q (fp8) -> (v, f) with v * f the float32 values of q; v is written into ``out``.

    On the CPU, e4m3fn bits are moved into float16 bits: the byte, sign-extended to 16 bits and shifted
    left by 7, has the exponent and mantissa where float16 keeps them and the sign at bit 15; bit 14
    (a copy of the sign) is cleared. That float16 is exactly the fp8 value / 256 (the exponent biases
    differ by 8), normal or subnormal, and widening float16 is fast. The caller folds f = 256 into its
    scale multiply, which is exact (a power of two). NaN never occurs: values are clamped before the
    cast."""
    if q.device.type != "cpu":
        return out.copy_(q), 1.0
    b = q.view(torch.int8).numpy()
    h = _u16(b.size).reshape(b.shape)
    np.copyto(h, b, casting="unsafe")  # int8 -> int16 sign-extends
    h <<= 7
    h &= np.int16(-16385)  # 0xBFFF
    out.copy_(torch.from_numpy(h).view(torch.float16))
    return out, 256.0


_u16_bufs = threading.local()


def _u16(numel: int, slot: str = "h") -> np.ndarray:
    buf = getattr(_u16_bufs, slot, None)
    if buf is None or buf.size < numel:
        buf = np.empty(numel, dtype=np.int16)
        setattr(_u16_bufs, slot, buf)
    return buf[:numel]


def _amax_rows(x: torch.Tensor) -> torch.Tensor:
    # max(|x|) without an |x| temporary: max(max x, -min x)
    return torch.maximum(x.amax(dim=-1), x.amin(dim=-1).neg_())


def quantize_channel_chunk(w: torch.Tensor, q: torch.Tensor, scale_out: torch.Tensor) -> ChunkStats:
    """w [r, K] (any float dtype) -> q [r, K] fp8 and scale_out [r, 1] float32, in place."""
    r, k = w.shape
    dev = w.device
    x = _scratch.get("x", r * k, dev).view(r, k)
    x.copy_(w)
    amax = _amax_rows(x)
    scale = _scale(amax)[:, None]
    y = _scratch.get("y", r * k, dev).view(r, k)
    torch.div(x, scale, out=y).clamp_(-FP8_MAX, FP8_MAX)
    q.copy_(y)
    scale_out.copy_(scale)
    deq, f = _dequant(q, y)  # y is free again: reuse it for deq - w
    deq.mul_(scale * f).sub_(x)
    return _stats(amax, deq, x)


def quantize_block_chunk(w: torch.Tensor, q: torch.Tensor, scale_out: torch.Tensor) -> ChunkStats:
    """w [r <= 128*m, K] -> q [r, K] fp8 and scale_out [m, ceil(K/128)] float32, in place.

    The chunk is copied into a zero-padded [128*m, 128*kb] buffer: zero padding cannot raise an amax,
    pads to zero, and adds nothing to the error sums."""
    r, k = w.shape
    dev = w.device
    m, kb = -(-r // BLOCK), -(-k // BLOCK)
    rp, kp = m * BLOCK, kb * BLOCK
    x = _scratch.get("x", rp * kp, dev).view(rp, kp)
    if rp != r or kp != k:
        x.zero_()
    x[:r, :k].copy_(w)
    amax = _amax_rows(x.view(rp, kb, BLOCK))  # [rp, kb]
    amax = amax.view(m, BLOCK, kb).amax(dim=1)  # [m, kb]
    scale = _scale(amax)
    blocks = scale.view(m, 1, kb, 1)
    y = _scratch.get("y", rp * kp, dev).view(rp, kp)
    torch.div(x.view(m, BLOCK, kb, BLOCK), blocks, out=y.view(m, BLOCK, kb, BLOCK)).clamp_(-FP8_MAX, FP8_MAX)
    if rp == r and kp == k:  # aligned: cast straight into the output
        qp = q
        qp.copy_(y)
    else:
        qp = _fp8_scratch(rp * kp, dev).view(rp, kp)
        qp.copy_(y)
        q.copy_(qp[:r, :k])
    scale_out.copy_(scale)
    deq, f = _dequant(qp, y)
    deq.view(m, BLOCK, kb, BLOCK).mul_(blocks * f)
    deq.sub_(x)
    return _stats(amax, deq, x)


_fp8 = threading.local()


def _fp8_scratch(numel: int, device: torch.device) -> torch.Tensor:
    key = f"buf_{device}"
    buf = getattr(_fp8, key, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=FP8_DTYPE, device=device)
        setattr(_fp8, key, buf)
    return buf[:numel]


def _stats(amax: torch.Tensor, diff: torch.Tensor, x: torch.Tensor) -> ChunkStats:
    """Sums of squares: float32 dot products along each row (error ~1e-9 relative for rows of a few
    thousand), rows added in float64. One float32 dot over a whole 2 MB chunk would be off by ~1e-6."""
    return ChunkStats(float(amax.max()), _sumsq(diff), _sumsq(x))


def _sumsq(t: torch.Tensor) -> float:
    t = t.reshape(t.shape[0], -1)
    if t.device.type != "cpu":
        return float(torch.sum(t.double() ** 2))
    out = float(torch.linalg.vecdot(t, t).double().sum())
    if not math.isfinite(out):  # a float32 row sum overflowed (|w| above ~1e19): redo it in float64
        out = float(torch.linalg.vecdot(t.double(), t.double()).sum())
    return out


def combine(stats: list[ChunkStats]) -> dict:
    """Per-tensor amax, rel_error and sqnr_db (None when exact, i.e. infinite SQNR)."""
    amax = max((s.amax for s in stats), default=0.0)
    if any(math.isnan(s.amax) for s in stats):
        amax = math.nan
    noise = math.fsum(s.noise for s in stats)
    signal = math.fsum(s.signal for s in stats)
    rel = math.sqrt(noise / signal) if signal > 0 else 0.0
    sqnr = 10.0 * math.log10(signal / noise) if noise > 0 and signal > 0 else None
    return {"amax": amax, "rel_error": rel, "sqnr_db": sqnr}
