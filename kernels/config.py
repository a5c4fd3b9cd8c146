"""Kernel launch configurations: one frozen dataclass shared by the launchers (issue 4), the tuner and
the tuning cache (issue 5). A launcher called with ``config=None`` uses its documented default."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int = 128
    BLOCK_N: int = 128
    BLOCK_K: int = 128
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    # fp8_gemm only: K split over this many programs per output tile (serial fix-up, kernels/fp8_gemm.py);
    # a cache entry written before this field existed reads as 1
    SPLIT_K: int = 1
    # fp8_gemm's TMA kernel only: 1 = Triton's warp specialisation of the persistent loop (producer and
    # consumer warps); an entry written before this field existed reads as 0
    WARP_SPEC: int = 0
    # fp8_gemm's TMA kernel only: resident programs per SM of its persistent grid (2: one program's
    # MMAs run under the other's epilogue, as the SwiGLU epilogue needs); an entry written before this
    # field existed reads as 1
    PROGRAMS_PER_SM: int = 1

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            flag = k == "WARP_SPEC"
            if not isinstance(v, int) or not (v in (0, 1) if flag else v >= 1):
                raise ValueError(f"KernelConfig.{k} must be {'0 or 1' if flag else 'a positive integer'}, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown KernelConfig keys: {sorted(unknown)}")
        return cls(**d)


# fp8_gemm promotes the tensor cores' chained sums to FP32 from this K on (kernels/fp8_gemm.py says why);
# in mode 2 no chain is longer than this
PROMOTE_MIN_K = 2048
# ... in this mode (kernels/fp8_gemm.py, PROMOTE_MODES): chained pieces of at most PROMOTE_MIN_K, summed
# in FP32 (H100, 16384x1408x3840: 167 us, 0.91x `_scaled_mm`, mean rel. error 7.3e-4; mode 1, every
# step: 186-198 us in the same run, 2.1e-4; the gate is 1e-3)
PROMOTE_DEFAULT = 2

# shared memory a block may opt in to on the H100 and H200 (227 KiB): the Gluon dense kernel's form check
# (fp8_gemm.gluon_form) and the tuner's H100 limits where no GPU can be asked (tuning/candidates.H100)
HOPPER_MAX_SHARED = 232448


def sorted_rows_aligned(d: int, inter: int) -> bool:
    """Whether the grouped GEMMs' rows are 16-byte aligned for TMA (x and y rows of d, the down weight's
    rows of inter FP8 bytes): the sorted-layout kernels' condition besides Triton having tensor
    descriptors (grouped_gemm.sorted_path_ok)."""
    return d % 16 == 0 and inter % 16 == 0


def group_tiles(k: int, group: int = 128) -> tuple[int, int]:
    """(NH, NT) of the act_quant kernel: a row's ceil(k / group) groups split into a power-of-two head
    and a tail padded to a power of two (0 if none)."""
    ng = max(1, -(-k // group))
    nh = 1 << (ng.bit_length() - 1)
    return nh, ((1 << (ng - nh - 1).bit_length()) if ng > nh else 0)


# -- documented defaults (used when no tuned config applies; see docs/kernels.md) ---------------------
#
# fp8_gemm (per-token x per-channel, _nt): BLOCK_K 128 (one 128-byte FP8 row segment per TMA box);
#   decode-sized M (<= 64) takes BLOCK_M 64 (the smallest wgmma M) and narrow BLOCK_N so more programs
#   stream the weight; larger M takes 128 x 128 tiles, 8 warps (two warpgroups), 4 stages
#   (4 x 32 KiB of shared memory).
# fp8_grouped_gemm (block-scaled, grouped): BLOCK_K must be 128 (one weight block / activation group
#   per K step). For the fused gate/up GEMM BLOCK_N must be 256 (128 gate + 128 up rows of one
#   block each, giving one 128-wide 1x128 quantization group of the SwiGLU output); the down GEMM takes
#   BLOCK_N 128. BLOCK_M is also the per-expert padding of the token segments.
# fp8_grouped_gemm_gluon (the same GEMMs in Gluon, Hopper only: kernels/grouped_gemm_gluon.py): BLOCK_M
#   64 at 4 warps (one warpgroup, asynchronous wgmma), 128 at 8 or 192 at 12 (two or three consumer
#   warpgroups and a TMA warp); BLOCK_N 256 for gate/up (two 128-row items), 64 or 128 for down. Both
#   GEMMs of a layer share the rows' alignment (the lcm of their BLOCK_Ms), so the tuner varies BLOCK_M
#   only between 64 and the default's.
# fp8_gemm_swiglu (fp8_gemm with the SwiGLU epilogue, the dense MLP's gate/up GEMM): BLOCK_N a
#   multiple of 64 (the quad order of the packed weight); otherwise fp8_gemm's fields and defaults, except
#   from M > 1024: 128 x 128 tiles, 4 warps, 3 stages and two programs per SM. The epilogue's sigmoid
#   (two MUFU operations an element) is ~12% of the GEMM when it stalls the tensor cores; a second
#   program's MMAs run under it (H100 at 16384 x 7680 x 1408: 331 us against 345 for fp8_gemm's
#   default tile with the SwiGLU epilogue and 325 for the plain GEMM; docs/benchmarks.md, eleventh run).
# act_quant: BLOCK_M = rows per program (power of two), num_warps; the other fields are unused.
# topk (kernels/topk.py; m = rows R, n = row length C, k = k): BLOCK_N = elements per program chunk of
#   the multi-program path (rows longer than topk.SMALL_C), a power of two between 16K and 1M chosen so
#   that ~1024 programs stream the input (R = 32, C = 4M: 128K, 32 programs per row); BLOCK_K =
#   elements per loop step (2048: 8 per thread keeps the filter at ~70 registers); num_warps 8; the
#   other fields are unused.

# rows per expert from which the Gluon grouped GEMM takes its 128-row warp-specialized form (H100 down
# GEMM at 232 rows per expert: 82-84 us against 95 for the 64-row form; at 29 both equal tl.dot's 49.6)
GLUON_WS_MIN_ROWS = 128
# ... and its 192-row form, three consumer warpgroups (H100, docs/benchmarks.md seventh run: at 927 rows
# per expert gate/up 600 us against 665 for 128 rows, down 230 against 270; at 232 rows 236 against 193
# and 91 against 81: padding each expert to 192 rows costs more there)
GLUON_WS3_MIN_ROWS = 512


def _is_gate_up(n: int, k: int, gate_up: bool | None) -> bool:
    """Whether a grouped GEMM with an [N, K] weight is the fused gate/up one: as the caller says, else
    guessed as n > k (true of the packed [E, 2*I, d] weight whenever 2*I > d)."""
    return (n > k) if gate_up is None else gate_up


def default_config(kernel: str, m: int, n: int, k: int, gate_up: bool | None = None) -> KernelConfig:
    """The documented default for ``kernel`` ("fp8_gemm", "fp8_gemm_swiglu", "fp8_grouped_gemm",
    "fp8_grouped_gemm_gluon", "act_quant", "topk") at M tokens (rows per expert for the grouped GEMM:
    total rows / experts), N outputs, K inputs.
    gate_up: for the grouped GEMM, whether this is the fused gate/up GEMM (None: guessed as n > k,
    true of the packed [E, 2*I, d] weight whenever 2*I > d; callers that know should say)."""
    if kernel == "fp8_gemm_swiglu":
        if m > 1024:
            return KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3,
                                PROGRAMS_PER_SM=2)
        return default_config("fp8_gemm", m, n, k)  # BLOCK_N 64 or 128 there
    if kernel == "fp8_gemm":
        if m <= 64:
            return KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
        if m <= 1024:
            return KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
        # H100 sweep at M = 16384 (docs/benchmarks.md): 128x256x128, 8 warps, 3 stages is best or within
        # 1% of best on every preset shape. With promotion (K >= PROMOTE_MIN_K) the Gluon kernel runs on
        # Hopper (kernels/fp8_gemm_gluon.py): 128x128, two consumer warpgroups, 5 stages, tiles in row
        # order (GROUP_M 1). H100, 16384 x 1408 x 3840, medians of 4 rounds: 146.1 us against 152.5 for
        # GROUP_M 8 and 162.0 for `_scaled_mm`; the tl.dot kernel 161-168 in the same runs; s4, s6 and 192
        # rows no better (docs/benchmarks.md, fourteenth run). Elsewhere the tl.dot kernel takes the same
        # config warp-specialised (the second accumulator makes 128x256 spill). Five stages keep the
        # Gluon ring and a float32 output tile within shared memory.
        if k >= PROMOTE_MIN_K:
            return KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=5,
                                WARP_SPEC=1)
        if n <= 128:
            return KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
        return KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if kernel == "fp8_grouped_gemm":
        # n is the packed weight's rows: 2 * I_padded for gate/up (SwiGLU fused), d for down.
        # Each K block's product is scaled into the accumulator, so a tile needs two accumulators'
        # worth of registers. Two kernels (kernels/grouped_gemm.py): the persistent sorted-layout one
        # where rows are 16-byte aligned (d % 16 == 0 and I % 16 == 0: fused_experts' serving path), the
        # gather-layout one elsewhere. H100 sweep at 49152 rows (docs/benchmarks.md, fifth run):
        gu = _is_gate_up(n, k, gate_up)
        # (gate/up sees only the padded width n // 2, always aligned: its own d decides)
        sorted_layout = sorted_rows_aligned(k, n // 2) if gu else sorted_rows_aligned(n, k)
        if gu and sorted_layout:
            # sorted gate/up computes a 256-row tile as two 128-row halves: 64 x 256, 4 warps, 3 stages,
            # two programs per SM (690 us; 128 x 256 at 8 warps 700 us; 64 x 256 at 8 warps, whose
            # warpgroups split the 128-wide dot into 64-wide ones, 1241 us)
            return KernelConfig(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
        if gu:
            # gather gate/up: two 128-wide accumulators; 128 x 256 at 8 warps and 4 warps spill
            return KernelConfig(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
        if sorted_layout and m >= 512:
            # sorted down: 128 x 128, 8 warps, 3 stages, one program per SM (306-311 us; 64 x 128 at 4
            # warps, two per SM, 317-320 us and less padding where experts get few rows)
            return KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
        # down: 64x128, 4 warps, 3 stages (gather layout with TMA: 1.16x _grouped_mm bf16 at 49152 rows)
        return KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    if kernel == "fp8_grouped_gemm_gluon":
        gu = _is_gate_up(n, k, gate_up)
        if m >= GLUON_WS3_MIN_ROWS:
            return KernelConfig(BLOCK_M=192, BLOCK_N=256 if gu else 128, BLOCK_K=128, GROUP_M=8, num_warps=12,
                                num_stages=4)
        if m >= GLUON_WS_MIN_ROWS:
            # H100 sweep at 49152 rows (docs/benchmarks.md): the warp-specialized kernel, gate/up
            # 128 x 256 s5 651 us (128 x 256 s3 675, 64 x 256 s3 795); down 128 x 128 s4 272 us (s5
            # 272, s3 282, 64 x 128 s3 330)
            return KernelConfig(BLOCK_M=128, BLOCK_N=256 if gu else 128, BLOCK_K=128, GROUP_M=8, num_warps=8,
                                num_stages=5 if gu else 4)
        return KernelConfig(BLOCK_M=64, BLOCK_N=256 if gu else 128, BLOCK_K=128, GROUP_M=8, num_warps=4,
                            num_stages=3)
    if kernel == "act_quant":
        # rows per program (BLOCK_M, a power of two) so that a program holds ~4-8K lanes: a row computes
        # head + tail lanes (group_tiles), 12 groups of 128 at K = 1408, 32 at 3840. H100 sweep
        # (docs/benchmarks.md, twelfth run): 2 rows / 4 warps best at K = 3840. Rows of 1025-1536 lanes
        # (K = 1408) take one row per program on one warp (48 lanes a thread, as 4 rows on 4 warps
        # had): the row's sum and max stay inside the warp, with no shared memory or barrier.
        # rmsnorm_quant 27.4 against 28.8 us at 16384 x 1408 (H200: 25.1 against 27.8), the other callers
        # equal or faster.
        lanes = 128 * sum(group_tiles(k))
        if 1024 < lanes <= 1536:
            return KernelConfig(BLOCK_M=1, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=1, num_stages=1)
        rows = 1 << (max(1, min(16, 8192 // lanes)).bit_length() - 1)  # a power of two
        return KernelConfig(BLOCK_M=rows, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)
    if kernel == "topk":
        per_prog = -(-max(1, m) * max(1, n) // 1024)
        chunk = 1 << max(14, min(20, (per_prog - 1).bit_length()))
        return KernelConfig(BLOCK_M=1, BLOCK_N=chunk, BLOCK_K=2048, GROUP_M=1, num_warps=8, num_stages=1)
    raise ValueError(f"unknown kernel {kernel!r}; expected 'fp8_gemm', 'fp8_gemm_swiglu', 'fp8_grouped_gemm', "
                     f"'fp8_grouped_gemm_gluon', 'act_quant' or 'topk'")


def resolve_config(kernel: str, m: int, n: int, k: int, gate_up: bool | None = None) -> tuple[KernelConfig, str]:
    """A tuned config from the tuning cache (issue 5, fp8conv.tuning.lookup) when that module exists
    and has one, else the documented default. Returns (config, source) so callers can report it."""
    try:
        from fp8conv.tuning.lookup import get_config
    except ImportError:
        return default_config(kernel, m, n, k, gate_up), "default"
    try:
        got = get_config(kernel, n, k, m)
    except Exception as exc:  # a broken cache must not take serving down; say so
        import warnings

        warnings.warn(f"tuning lookup failed for {kernel} (m={m}, n={n}, k={k}): {exc}; using the default")
        got = None
    if got is None:
        return default_config(kernel, m, n, k, gate_up), "default"
    if isinstance(got, tuple):  # (config, source) if the lookup reports where it came from
        cfg = got[0]
        src = str(got[1]) if len(got) > 1 else "tuned"
    else:
        cfg, src = got, "tuned"
    if isinstance(cfg, dict):
        cfg = KernelConfig.from_dict(cfg)
    if kernel == "fp8_gemm_swiglu" and cfg.BLOCK_N % 64:  # the quad order: not a config the kernel takes
        import warnings

        warnings.warn(f"tuning cache: {kernel} (m={m}, n={n}, k={k}) holds BLOCK_N {cfg.BLOCK_N}, not a multiple "
                      f"of 64; using the default")
        return default_config(kernel, m, n, k), "default"
    if kernel == "fp8_grouped_gemm_gluon":  # a cached config the kernel cannot run is not trusted either
        from fp8conv.kernels.grouped_gemm import gluon_config_ok

        gu = _is_gate_up(n, k, gate_up)
        if not gluon_config_ok(cfg, gu):
            import warnings

            warnings.warn(f"tuning cache: {kernel} (m={m}, n={n}, k={k}) holds {cfg}, which is not a form of the "
                          f"Gluon kernel (grouped_gemm.gluon_config_ok); using the default")
            return default_config(kernel, m, n, k, gate_up), "default"
    return cfg, src
