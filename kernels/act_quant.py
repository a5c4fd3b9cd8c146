"""Dynamic FP8 activation quantization, alone or fused with its producer (RMSNorm, SwiGLU).

One kernel, a few rows per program (KernelConfig.BLOCK_M of the "act_quant" config). A row's groups of
128 columns are held as a power-of-two head tile and a padded tail tile (group_tiles), so per-token
(one scale per row) and 1x128-group (one scale per group) quantization share the code with little
padding; the producer is applied in registers first, so the activation crosses memory once: read in
its dtype, written as FP8 plus float32 scales.

Numerics follow fp8conv.numerics exactly: the producer's result is rounded to the activation dtype (as
the reference backend's unfused ops do), scale = amax / 448 with IEEE division (an all-zero row or
group gets 1), q = cast(clamp(y / scale, -448, 448)) rounded to nearest even, where y / scale is the
IEEE quotient's FP8 value (quantize_values: a reciprocal and Markstein's FMA correction for bf16/fp16
activations, exhaustively checked; ``tl.div_rn`` for float32 ones).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fp8conv.kernels.config import KernelConfig, default_config, group_tiles

FP8_MAX = 448.0
GROUP = 128


def sw_round() -> bool:
    """Whether kernels must round in software (Triton's interpreter is on; it is chosen when a kernel is
    decorated, so reading the environment at import is what Triton itself does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SOFT_BF16 = tl.constexpr(sw_round())


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (bf16/fp16/fp32) and back, round-to-nearest-even. bf16 under
    TRITON_INTERPRET (whose bf16 cast truncates) by integer arithmetic, bit-exact with torch's cast; on
    the GPU by the hardware conversion (cvt.rn.bf16.f32), which rounds to nearest even itself."""
    if DTYPE == tl.bfloat16 and not _SOFT_BF16:
        return x.to(tl.bfloat16).to(tl.float32)
    elif DTYPE == tl.bfloat16:
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
    to a multiple of 2^-9 in float32 arithmetic, on |x| with x's sign put back (-0.0 stays -0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    u = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20
    normal = u.to(tl.float32, bitcast=True)
    sub = ((tl.abs(x) + 24576.0) - 24576.0).to(tl.int32, bitcast=True)  # on |x|: keep the sign of 0
    sub = (sub | (bits & -2147483648)).to(tl.float32, bitcast=True)  # sign bit (0x80000000) of x
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def fp8_scale(amax):
    """scale = amax / 448 by IEEE division; an all-zero row or group gets 1."""
    return tl.where(amax == 0.0, 1.0, tl.div_rn(amax, 448.0))


@triton.jit
def quantize_values(y, scale, FAST_DIV: tl.constexpr, SW_ROUND: tl.constexpr):
    """y / scale for the FP8 cast that follows (float32; scale broadcasts against y): its FP8 value is
    fp8conv.numerics' cast(clamp(y / scale, -448, 448)), exactly. Only the cast may follow: on the GPU
    the quotient is left unclamped (|q| exceeds 448 by at most a rounding error, as |y| <= amax), since
    the hardware conversion saturates to +-448 itself -- two instructions an element fewer.

    FAST_DIV (for y holding bf16 or fp16 values, |y| <= the amax its scale came from): y / scale from
    the row's reciprocal r = 1/scale, q0 = y * r, the exact remainder e = q0 * scale - y (one FMA) and
    q = q0 - e * r (one FMA): Markstein's correction, 1 multiply + 2 FMAs an element instead of an IEEE
    division (~10 instructions and a branch). It gives the same FP8 value as the IEEE quotient for
    every pair of bf16 (and fp16) values -- checked exhaustively, on the CPU and on the GPU
    (benchmarks/check_quant_exhaustive.py) -- once scales below 2^-100 (amax below ~1e-28, whose
    reciprocal would overflow) are first multiplied by 2^64 together with y (exact: powers of two).
    It runs on negated terms, so that every minus sits on a per-row value (Triton's unary minus on a
    tensor is 0 - x, one more instruction an element, and does not fold into an FMA): with nr = -r and
    -y, q0 = (-y) * nr, e = fma(q0, scale, -y) and q = fma(e, nr, q0) are the same values as the
    plain form's (round to nearest even is symmetric), and the signs of zero come out right by
    themselves: y = -0.0 gives q0 = -0.0, e = +0.0 and q = -0.0 + -0.0 = -0.0 (the plain form's last
    FMA adds +0.0 and needs y's sign bit put back: one instruction an element). Without FAST_DIV
    (float32 activations): IEEE division (``tl.div_rn``; Triton's ``/`` on float32 is approximate).

    SW_ROUND: clamp, then round to FP8 values in float32 integer arithmetic (round_to_e4m3) so the cast
    that follows is exact: needed under TRITON_INTERPRET, whose cast rounds wrongly (Triton issue 8322).
    On the GPU the hardware conversion (cvt.rn.satfinite.e4m3x2.f32 on Hopper) rounds to nearest even
    and saturates itself."""
    if FAST_DIV:
        sx = tl.where(scale < 7.888609052210118e-31, 18446744073709551616.0, 1.0)  # 2^-100, 2^64
        s2 = scale * sx
        nr = tl.div_rn(-1.0, s2)  # -r
        ny2 = y * (0.0 - sx)  # -y * sx: the pre-scale's multiply carries the minus
        q0 = ny2 * nr
        e = tl.fma(q0, s2, ny2)  # q0 * s2 - y * sx, exact
        q = tl.fma(e, nr, q0)  # q0 - e * r
    else:
        q = tl.div_rn(y, scale)
    if SW_ROUND:
        q = round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
    return q


def fast_div_ok(dtype: torch.dtype) -> bool:
    """Whether quantize_values' FAST_DIV is exact for activations held in ``dtype``."""
    return dtype in (torch.bfloat16, torch.float16)


# producer codes (compile-time)
_NONE, _RMSNORM, _SWIGLU = 0, 1, 2


@triton.jit
def _load_tile(ptr, rows, stride, cols, rmask, K, CACHE: tl.constexpr):
    mask = rmask[:, None, None] & (cols < K)[None, :, :]
    return tl.load(ptr + rows[:, None, None] * stride + cols[None, :, :], mask=mask, other=0.0,
                   cache_modifier=CACHE), mask


@triton.jit
def swiglu_values(g, u, DTYPE: tl.constexpr):
    """silu(g) * u in float32 from g, u holding DTYPE values, rounded to DTYPE (the reference's
    unfused SwiGLU on the GEMM's rounded output). Shared with fp8_gemm's SwiGLU epilogue, so both
    paths give the same bits."""
    gf = g.to(tl.float32)
    return round_to(gf * tl.sigmoid(gf) * u.to(tl.float32), DTYPE)


@triton.jit
def _swiglu_tile(g, u_ptr, rows, stride_u, cols, rmask, K):
    u, _ = _load_tile(u_ptr, rows, stride_u, cols, rmask, K, "")
    return swiglu_values(g, u, g.dtype)


@triton.jit
def _sum_squares(x):
    """Per row of a (rows, groups, GS) tile: the sum of its squares in float32 (masked lanes hold 0)."""
    xf = x.to(tl.float32)
    return tl.sum(tl.sum(xf * xf, axis=2), axis=1)


@triton.jit
def _rms_inv(ss, K, eps):
    """1 / sqrt(ss / K + eps) from the rows' sums of squares: ops.rms_norm's rsqrt(mean(x^2) + eps) as
    torch computes it on the CPU (the sum divided by K, then 1 / sqrt), with IEEE division and square
    root (Triton's ``/`` on float32 is approximate). ``K * 1.0``: K may arrive as the constexpr 1."""
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(ss, K * 1.0) + eps))


@triton.jit
def _norm_weight(w_ptr, cols, K, SHAPE: tl.constexpr, IN_X_LAYOUT: tl.constexpr):
    """The RMSNorm weight for an x tile of SHAPE (rows, groups, GS) over columns ``cols`` (groups, GS), in
    float32 (0 past K). IN_X_LAYOUT: loaded as a tile of x's shape, so each thread loads the columns it
    holds of x and no layout conversion follows (loaded once per program as (groups, GS), the weight
    has its own layout and reaches x's through shuffles, ~2 instructions an element at one row a
    program). Else once as (1, groups, GS), broadcast over the rows. act_quant takes the first form up
    to two rows a program; kernels/norm.py the second (at 2 rows / 4 warps, K = 3840, the first
    measured 90.2 against 86.5 us there; equal at one row, thirteenth run)."""
    if IN_X_LAYOUT:
        return tl.load(tl.broadcast_to(w_ptr + cols[None, :, :], SHAPE),
                       mask=tl.broadcast_to((cols < K)[None, :, :], SHAPE), other=0.0).to(tl.float32)
    else:
        return tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :, :]


@triton.jit
def _norm_tile(x, w, inv):
    """(x * inv) * w in float32, rounded to x's dtype: ops.rms_norm's order of the two products."""
    return round_to(x.to(tl.float32) * inv[:, None, None] * w, x.dtype)


@triton.jit
def _rmsnorm_quant_row(x_ptr, w_ptr, stride_x, eps, q_ptr, s_ptr, M, K, NH: tl.constexpr, NT: tl.constexpr,
                       GS: tl.constexpr, FAST_DIV: tl.constexpr, SW_ROUND: tl.constexpr):
    """_act_quant_kernel's RMSNorm + per-token quantization at one row a program: the same arithmetic as
    its general path, written as its own sequence because Triton 3.6 schedules it better. The two
    compile to the same instructions in a slightly different order, and this one runs in 25.5 us
    against 26.9 at 16384 x 1408 on an H100 (docs/benchmarks.md, thirteenth run); why the order costs
    5% was not found."""
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    rmask = rows < M
    cols_h = tl.arange(0, NH)[:, None] * GS + tl.arange(0, GS)[None, :]
    cols_t = NH * GS + tl.arange(0, NT)[:, None] * GS + tl.arange(0, GS)[None, :]
    xh, mask_h = _load_tile(x_ptr, rows, stride_x, cols_h, rmask, K, "")
    if NT > 0:
        xt, mask_t = _load_tile(x_ptr, rows, stride_x, cols_t, rmask, K, "")
    wh = _norm_weight(w_ptr, cols_h, K, xh.shape, True)
    ss = _sum_squares(xh)
    if NT > 0:
        wt = _norm_weight(w_ptr, cols_t, K, xt.shape, True)
        ss += _sum_squares(xt)
    inv = _rms_inv(ss, K, eps)
    # x read again from L1 (see the general path)
    yh = _norm_tile(_load_tile(x_ptr, rows, stride_x, cols_h, rmask, K, ".ca")[0], wh, inv)
    amax = tl.max(tl.max(tl.abs(yh), axis=2), axis=1)
    if NT > 0:
        yt = _norm_tile(_load_tile(x_ptr, rows, stride_x, cols_t, rmask, K, ".ca")[0], wt, inv)
        amax = tl.maximum(amax, tl.max(tl.max(tl.abs(yt), axis=2), axis=1))
    scale = fp8_scale(amax)
    q_dt = q_ptr.dtype.element_ty
    qh = quantize_values(yh, scale[:, None, None], FAST_DIV, SW_ROUND).to(q_dt)
    if NT > 0:
        qt = quantize_values(yt, scale[:, None, None], FAST_DIV, SW_ROUND).to(q_dt)
    tl.store(s_ptr + rows, scale, mask=rmask)
    tl.store(q_ptr + rows[:, None, None] * K + cols_h[None, :, :], qh, mask=mask_h)
    if NT > 0:
        tl.store(q_ptr + rows[:, None, None] * K + cols_t[None, :, :], qt, mask=mask_t)


@triton.jit
def _act_quant_kernel(
    # inputs: x (or gate for SwiGLU) and up, row-major with a row stride; RMSNorm weight
    x_ptr, u_ptr, w_ptr, stride_x, stride_u, eps,
    # outputs: q (rows, K) fp8 contiguous; scale: element (row, group) at row * stride_sr + group *
    # stride_sc (NS = 1 or groups); COPIES > 0: input row r is written to output rows
    # dest[r * COPIES + j], j < COPIES (the MoE's expert-sorted layout), else to row r
    q_ptr, s_ptr, dest_ptr, M, K, NS, stride_sr, stride_sc,
    PRODUCER: tl.constexpr, PER_GROUP: tl.constexpr, ROWS: tl.constexpr, NH: tl.constexpr,
    NT: tl.constexpr, GS: tl.constexpr, FAST_DIV: tl.constexpr, SW_ROUND: tl.constexpr,
    COPIES: tl.constexpr, NSTORE: tl.constexpr,
):
    if PRODUCER == 1 and not PER_GROUP and ROWS == 1 and COPIES == 0:
        _rmsnorm_quant_row(x_ptr, w_ptr, stride_x, eps, q_ptr, s_ptr, M, K, NH, NT, GS, FAST_DIV, SW_ROUND)
        return
    # ROWS rows per program. A row's ceil(K / GS) groups of GS columns are held as a head tile of NH
    # groups (the largest power of two that fits) and a tail tile of NT groups (the rest, padded to a
    # power of two; NT = 0 if none), so K = 1408 (11 groups) computes 8 + 4 lanes, not 16.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    cols_h = tl.arange(0, NH)[:, None] * GS + tl.arange(0, GS)[None, :]  # (NH, GS)
    xh, mask_h = _load_tile(x_ptr, rows, stride_x, cols_h, rmask, K, "")
    if NT > 0:
        cols_t = NH * GS + tl.arange(0, NT)[:, None] * GS + tl.arange(0, GS)[None, :]
        xt, mask_t = _load_tile(x_ptr, rows, stride_x, cols_t, rmask, K, "")
    if PRODUCER == 1:  # RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w (kernels/norm.py: the same, alone)
        # the weight is loaded before the reductions, so its latency hides under theirs
        wh = _norm_weight(w_ptr, cols_h, K, xh.shape, ROWS <= 2)
        if NT > 0:
            wt = _norm_weight(w_ptr, cols_t, K, xt.shape, ROWS <= 2)
        ss = _sum_squares(xh)
        if NT > 0:
            ss += _sum_squares(xt)
        inv = _rms_inv(ss, K, eps)
        # x read again (an L1 hit; the cache operator keeps the load from being merged with the first)
        # rather than held in registers across the reductions and divisions: fewer live registers
        # (80 instead of 111 at one row a program); H100 at 16384 x 3840, the default 2 rows / 4 warps:
        # 72.5 against 74.9 us (thirteenth run)
        xh, _ = _load_tile(x_ptr, rows, stride_x, cols_h, rmask, K, ".ca")
        if NT > 0:
            xt, _ = _load_tile(x_ptr, rows, stride_x, cols_t, rmask, K, ".ca")
        yh = _norm_tile(xh, wh, inv)
        if NT > 0:
            yt = _norm_tile(xt, wt, inv)
    elif PRODUCER == 2:  # SwiGLU: y = silu(gate) * up
        yh = _swiglu_tile(xh, u_ptr, rows, stride_u, cols_h, rmask, K)
        if NT > 0:
            yt = _swiglu_tile(xt, u_ptr, rows, stride_u, cols_t, rmask, K)
    else:
        yh = xh.to(tl.float32)
        if NT > 0:
            yt = xt.to(tl.float32)
    if PER_GROUP:
        sh = fp8_scale(tl.max(tl.abs(yh), axis=2))  # (ROWS, NH)
        qh = quantize_values(yh, sh[:, :, None], FAST_DIV, SW_ROUND)
        if NT > 0:
            st = fp8_scale(tl.max(tl.abs(yt), axis=2))
            qt = quantize_values(yt, st[:, :, None], FAST_DIV, SW_ROUND)
    else:
        amax = tl.max(tl.max(tl.abs(yh), axis=2), axis=1)  # (ROWS,)
        if NT > 0:
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(yt), axis=2), axis=1))
        scale = fp8_scale(amax)
        qh = quantize_values(yh, scale[:, None, None], FAST_DIV, SW_ROUND)
        if NT > 0:
            qt = quantize_values(yt, scale[:, None, None], FAST_DIV, SW_ROUND)
    q_dt = q_ptr.dtype.element_ty
    qh = qh.to(q_dt)
    if NT > 0:
        qt = qt.to(q_dt)
    for j in tl.static_range(NSTORE):  # max(COPIES, 1)
        if COPIES > 0:
            drow = tl.load(dest_ptr + rows * COPIES + j, mask=rmask, other=0).to(tl.int64)
        else:
            drow = rows
        if PER_GROUP:
            gh = tl.arange(0, NH)
            tl.store(s_ptr + drow[:, None] * stride_sr + gh[None, :] * stride_sc, sh,
                     mask=rmask[:, None] & (gh < NS)[None, :])
        else:
            tl.store(s_ptr + drow * stride_sr, scale, mask=rmask)
        tl.store(q_ptr + drow[:, None, None] * K + cols_h[None, :, :], qh, mask=mask_h)
        if NT > 0:
            if PER_GROUP:
                gt = NH + tl.arange(0, NT)
                tl.store(s_ptr + drow[:, None] * stride_sr + gt[None, :] * stride_sc, st,
                         mask=rmask[:, None] & (gt < NS)[None, :])
            tl.store(q_ptr + drow[:, None, None] * K + cols_t[None, :, :], qt, mask=mask_t)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"Expected {name} to be 2-D (tokens, features), got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"Expected {name} to have unit stride along features, got strides {x.stride()}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"Expected {name} to be bfloat16, float16 or float32, got {x.dtype} instead.")


def _launch(x, u, w, eps, producer: int, per_group: bool, config: KernelConfig | None, out=None,
            fast_div: bool | None = None, soft_round: bool | None = None):
    # fast_div / soft_round: None = the defaults (fast_div_ok, sw_round); the benchmark A/Bs them
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
    _run(x, u, w, eps, q, s, s.stride(0), s.stride(1), None, 0, producer, per_group, config, fast_div,
         soft_round)
    return q, s


def _run(x, u, w, eps, q, s, stride_sr, stride_sc, dest, copies, producer, per_group, config, fast_div=None,
         soft_round=None):
    m, k = x.shape
    nh, nt = group_tiles(k)
    ns = triton.cdiv(k, GROUP) if per_group else 1
    cfg = config or default_config("act_quant", m, 0, k)
    rows = cfg.BLOCK_M  # rows per program
    _act_quant_kernel[(triton.cdiv(m, rows),)](
        x, u if u is not None else x, w if w is not None else x,
        x.stride(0), u.stride(0) if u is not None else 0, float(eps),
        q, s, dest if dest is not None else s, m, k, ns, stride_sr, stride_sc,
        PRODUCER=producer, PER_GROUP=per_group, ROWS=rows, NH=nh, NT=nt, GS=GROUP,
        FAST_DIV=fast_div_ok(x.dtype) if fast_div is None else fast_div,
        SW_ROUND=sw_round() if soft_round is None else soft_round, COPIES=copies, NSTORE=max(copies, 1),
        num_warps=cfg.num_warps,
    )


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


def per_group_quant_sorted(x: torch.Tensor, dest: torch.Tensor, n_rows: int, config: KernelConfig | None = None,
                           out=None):
    """1x128-group quantization of x (T, K), each row written to ``copies`` rows of an expert-sorted
    buffer: row t goes to rows dest[t, j] (dest (T, copies) int32, distinct rows < n_rows; moe_align's
    ``pos``). Returns (q (n_rows, K) fp8, scale_t (ceil(K/128), n_rows) float32, the scales K-major so a
    GEMM's K step reads one contiguous run); rows no dest names are not written. The values are
    per_group_quant's, bit for bit: quantized once, stored ``copies`` times."""
    _check_rows(x, "x")
    t, k = x.shape
    if dest.dim() != 2 or dest.shape[0] != t or dest.dtype != torch.int32 or not dest.is_contiguous():
        raise ValueError(f"Expected dest to be a contiguous ({t}, copies) int32 tensor, got "
                         f"{tuple(dest.shape)} {dest.dtype}")
    ns = triton.cdiv(k, GROUP)
    if out is None:
        q = torch.empty(n_rows, k, dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty(ns, n_rows, dtype=torch.float32, device=x.device)
    else:
        q, s = out
        if (q.shape, q.dtype, s.shape, s.dtype) != ((n_rows, k), torch.float8_e4m3fn, (ns, n_rows),
                                                    torch.float32) or not (q.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"out must be contiguous (q ({n_rows}, {k}) float8_e4m3fn, scale ({ns}, {n_rows}) "
                             f"float32)")
    if t and dest.shape[1]:
        _run(x, None, None, 0.0, q, s, 1, n_rows, dest, dest.shape[1], _NONE, True, config)
    return q, s
