"""kernels/fp8_gemm.py: per-token x per-channel FP8 GEMM against the dequantized float32 reference."""

import itertools

import pytest
import torch

from fp8conv import numerics as fp8
from fp8conv.kernels.config import KernelConfig, default_config
from fp8conv.kernels import act_quant
from fp8conv.kernels.fp8_gemm import fp8_gemm_nt, interleave_gate_up, swiglu_order, tma_ok
from fp8conv.kernels.testing import TOL, check, poison, ref_gemm_nt

MS = [1, 7, 83]
NK = [(40, 48), (33, 96), (56, 80), (128, 256)]  # N, K not multiples of the tiles
SMALL = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a, sa = fp8.quantize_per_token(torch.randn(m, k, generator=g) * 2)
    b, sb = fp8.quantize_channel(torch.randn(n, k, generator=g) * 0.05)
    return [t.to(_dev()) for t in (a, sa, b, sb)]


@pytest.mark.parametrize("m,nk,variant", list(itertools.product(MS, NK, ["ptr", "auto"])))
def test_gemm_matches_reference(m, nk, variant):
    n, k = nk
    a, sa, b, sb = _operands(m, n, k, seed=m * 7919 + n * 31 + k)
    out = poison(torch.empty(m, n, dtype=torch.bfloat16, device=a.device))
    fp8_gemm_nt(a, sa, b, sb, torch.bfloat16, config=SMALL if not a.is_cuda else None, variant=variant, out=out)
    check(out.cpu(), ref_gemm_nt(a, sa, b, sb, torch.bfloat16).cpu(), what=f"fp8_gemm {m}x{n}x{k} {variant}")


@pytest.mark.parametrize("out_dtype,promote", [(torch.float16, False), (torch.float32, True)])
def test_gemm_tma_other_dtypes(out_dtype, promote):
    a, sa, b, sb = _operands(83, 64, 96, seed=5)
    assert tma_ok(83, 64, 96, out_dtype)
    out = poison(torch.empty(83, 64, dtype=out_dtype, device=a.device))
    fp8_gemm_nt(a, sa, b, sb, out_dtype, config=SMALL if not a.is_cuda else None, variant="tma", out=out,
                 promote=promote)
    check(out.cpu(), ref_gemm_nt(a, sa, b, sb, out_dtype).cpu(), what=f"tma {out_dtype} promote={promote}")


def test_gemm_ptr_promote():
    a, sa, b, sb = _operands(7, 33, 96, seed=6)
    out = poison(torch.empty(7, 33, dtype=torch.bfloat16, device=a.device))
    fp8_gemm_nt(a, sa, b, sb, config=SMALL if not a.is_cuda else None, variant="ptr", out=out, promote=True)
    check(out.cpu(), ref_gemm_nt(a, sa, b, sb, torch.bfloat16).cpu(), what="ptr promote")


@pytest.mark.parametrize("variant,k", [("ptr", 240), ("tma", 240), ("tma", 224), ("ptr", 32)])
def test_gemm_two_chains(variant, k):
    """promote=2: the BLOCK_K steps as chained pieces summed in FP32 (two here). K = 240 is 7 steps of 32
    plus a tail of 16, 224 exactly 7 (odd: pieces of 4 and 3), 32 a single step (one piece): every step
    counted once."""
    a, sa, b, sb = _operands(19, 40, k, seed=11 + k)
    out = poison(torch.empty(19, 40, dtype=torch.float32, device=a.device))
    fp8_gemm_nt(a, sa, b, sb, torch.float32, config=SMALL if not a.is_cuda else None, variant=variant,
                out=out, promote=2)
    check(out.cpu(), ref_gemm_nt(a, sa, b, sb, torch.float32).cpu(), what=f"{variant} K={k} promote=2")
    with pytest.raises(ValueError, match="promote"):
        fp8_gemm_nt(a, sa, b, sb, promote=3)


@pytest.mark.parametrize("variant", ["ptr", "tma"])
def test_gemm_chained_pieces_long_k(variant):
    """promote=2 at K = 4160: three chained pieces of at most PROMOTE_MIN_K (1408, 1408, 1344 with
    BLOCK_K 32), the last piece shorter; also with K split in two (one piece per split: 2080 > 2048)."""
    from fp8conv.kernels.fp8_gemm import _chunks

    assert _chunks(2, 4160 // 32, 32) == 3 and _chunks(1, 130, 32) == 1
    a, sa, b, sb = _operands(3, 16, 4160, seed=21)
    for split in (1, 2) if variant == "tma" else (1,):
        cfg = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_K=split)
        out = poison(torch.empty(3, 16, dtype=torch.float32, device=a.device))
        fp8_gemm_nt(a, sa, b, sb, torch.float32, config=cfg if not a.is_cuda else None, variant=variant,
                    out=out, promote=2)
        check(out.cpu(), ref_gemm_nt(a, sa, b, sb, torch.float32).cpu(), what=f"{variant} K=4160 split {split}")


def test_gemm_warp_spec_config_field():
    """KernelConfig.WARP_SPEC = 1 takes the warp-specialised TMA kernel (the interpreter runs the same loop);
    the field is 0 or 1 and old cache entries without it read as 0."""
    a, sa, b, sb = _operands(19, 40, 224, seed=13)
    cfg = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2, WARP_SPEC=1)
    if a.is_cuda:
        cfg = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=3, WARP_SPEC=1)
    for promote in (0, 2):
        out = poison(torch.empty(19, 40, dtype=torch.float32, device=a.device))
        fp8_gemm_nt(a, sa, b, sb, torch.float32, config=cfg, out=out, promote=promote)
        check(out.cpu(), ref_gemm_nt(a, sa, b, sb, torch.float32).cpu(), what=f"warp-specialised promote {promote}")
    with pytest.raises(ValueError, match="WARP_SPEC"):
        KernelConfig(WARP_SPEC=2)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("WARP_SPEC", "SPLIT_K")}
    assert KernelConfig.from_dict(old).WARP_SPEC == 0 and KernelConfig.from_dict(old).SPLIT_K == 1
    assert default_config("fp8_gemm", 16384, 1408, 3840).WARP_SPEC == 1


@pytest.mark.parametrize("m,n,k,split,promote", [(1, 40, 224, 3, None), (7, 56, 96, 2, 1), (83, 48, 240, 8, 2),
                                                 (19, 40, 64, 4, 1), (33, 64, 32, 4, 0)])
def test_gemm_split_k(m, n, k, split, promote):
    """SPLIT_K: K steps spread over programs with a serial fix-up. Uneven splits (7 steps over 3, 8 over
    a K of 8 steps with a 16-wide tail), more splits than steps (clamped), every promotion mode; the
    counters are back at zero afterwards and the result is the same bits twice."""
    from fp8conv.kernels import fp8_gemm as mod

    a, sa, b, sb = _operands(m, n, k, seed=100 + m + k)
    cfg = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_K=split)
    if a.is_cuda:
        cfg = KernelConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=3, SPLIT_K=split)
    outs = []
    for _ in range(2):
        out = poison(torch.empty(m, n, dtype=torch.float32, device=a.device))
        fp8_gemm_nt(a, sa, b, sb, torch.float32, config=cfg, variant="tma", out=out, promote=promote)
        check(out.cpu(), ref_gemm_nt(a, sa, b, sb, torch.float32).cpu(), what=f"split {split} {m}x{n}x{k}")
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert int(mod._COUNTERS[(a.device.type, a.device.index)].abs().sum()) == 0


def _swiglu_ref(a, sa, w13, s13, dtype=torch.bfloat16):
    """The unfused reference: the (M, 2I) GEMM rounded to dtype, then silu(gate) * up rounded again."""
    gu = ref_gemm_nt(a, sa, w13, s13, dtype).float()
    g, u = gu[:, 0::2], gu[:, 1::2]
    return (torch.nn.functional.silu(g) * u).to(dtype)


@pytest.mark.parametrize("m,inter,k,variant,order", [(1, 32, 48, "auto", 2), (7, 64, 96, "auto", 2),
                                                     (83, 96, 80, "auto", 2), (83, 20, 96, "ptr", 1),
                                                     (7, 32, 48, "tma", 2), (7, 40, 48, "tma", 1)])
def test_gemm_swiglu_epilogue(m, inter, k, variant, order):
    """swiglu=True on gate/up weights pair-interleaved: silu(gate) * up of the rounded GEMM outputs, I
    columns, with the pairs in either order."""
    a, sa, g, sg = _operands(m, inter, k, seed=m + inter + k)
    _, _, u, su = _operands(m, inter, k, seed=m + inter + k + 1)
    w13, s13 = interleave_gate_up(g, u, order), interleave_gate_up(sg, su, order)
    idx = swiglu_order(inter, order).to(a.device)
    assert torch.equal(w13[1::2].view(torch.uint8), u[idx].view(torch.uint8)) and torch.equal(s13[0::2], sg[idx])
    out = poison(torch.empty(m, inter, dtype=torch.bfloat16, device=a.device))
    fp8_gemm_nt(a, sa, w13, s13, config=SMALL if not a.is_cuda else None, variant=variant, out=out, swiglu=True,
                swiglu_order=order)
    pos = torch.argsort(idx)  # output column c comes from pair pos[c]
    ref = _swiglu_ref(a, sa, w13, s13)[:, pos]
    check(out.cpu(), ref.cpu(), what=f"swiglu {m}x{inter}x{k} {variant} order {order}")
    # and bit for bit what the unfused path feeds the down projection: the (M, 2I) output, then
    # act_quant's fused SwiGLU + quantization
    gu = fp8_gemm_nt(a, sa, w13, s13, config=SMALL if not a.is_cuda else None, variant=variant)
    q0, s0 = act_quant.swiglu_quant(gu[:, 0::2][:, pos].contiguous(), gu[:, 1::2][:, pos].contiguous())
    q1, s1 = act_quant.per_token_quant(out)
    assert torch.equal(s0, s1) and torch.equal(q0.view(torch.uint8), q1.view(torch.uint8))


def test_gemm_swiglu_validation():
    a, sa, b, sb = _operands(3, 33, 48, seed=2)
    with pytest.raises(ValueError, match="even number of rows"):
        fp8_gemm_nt(a, sa, b, sb, swiglu=True)
    with pytest.raises(ValueError, match="multiple of 64 rows"):
        fp8_gemm_nt(a, sa, b[:32], sb[:32], swiglu=True, swiglu_order=2)
    with pytest.raises(ValueError, match=r"\(3, 16\)"):
        fp8_gemm_nt(a, sa, b[:32], sb[:32], swiglu=True, swiglu_order=1,
                    out=torch.empty(3, 32, dtype=torch.bfloat16, device=a.device))
    with pytest.raises(ValueError, match="I % 32"):
        interleave_gate_up(b[:20], b[:20], order=2)


def test_unwritten_output_fails():
    a, sa, b, sb = _operands(7, 40, 48, seed=3)
    out = poison(torch.empty(7, 40, dtype=torch.bfloat16, device=a.device))
    out[:6] = fp8_gemm_nt(a[:6], sa[:6], b, sb, torch.bfloat16, config=SMALL)  # row 6 left poisoned
    with pytest.raises(AssertionError):
        check(out.cpu(), ref_gemm_nt(a, sa, b, sb, torch.bfloat16).cpu())


def test_validation_names_the_tensor():
    a, sa, b, sb = _operands(2, 16, 32, seed=1)
    with pytest.raises(ValueError, match="Expected b to be torch.float8_e4m3fn"):
        fp8_gemm_nt(a, sa, b.float(), sb)
    with pytest.raises(ValueError, match="K mismatch"):
        fp8_gemm_nt(a, sa, b[:, :16].contiguous(), sb)
    with pytest.raises(ValueError, match="a_scale"):
        fp8_gemm_nt(a, sa[:1], b, sb)


def test_default_configs_are_documented_and_valid():
    for m in (1, 32, 512, 16384):
        cfg = default_config("fp8_gemm", m, 1408, 1408)
        assert cfg.BLOCK_K == 128 and cfg == KernelConfig.from_dict(cfg.to_dict())
    with pytest.raises(ValueError, match="unknown kernel"):
        default_config("nope", 1, 1, 1)


# 4b preset shapes (DESIGN): q/o, k/v, dense gate/up, dense down
PRESET_NK = [(1408, 1408), (128, 1408), (3840, 1408), (1408, 3840)]


@pytest.mark.cuda
@pytest.mark.parametrize("m,nk", list(itertools.product([1, 7, 83, 4096, 16384], PRESET_NK)))
def test_gemm_real_shapes_cuda(m, nk):
    n, k = nk
    a, sa, b, sb = _operands(m, n, k, seed=m + n + k)
    for variant in ("auto", "ptr"):
        out = poison(torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
        fp8_gemm_nt(a, sa, b, sb, torch.bfloat16, variant=variant, out=out)
        check(out, ref_gemm_nt(a, sa, b, sb, torch.bfloat16), what=f"{m}x{n}x{k} {variant}")
    for cfg, promote in ((KernelConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=5,
                                       SPLIT_K=4), None),
                         (KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4), 2)):
        if m > 512 and cfg.SPLIT_K > 1:
            continue
        out = poison(torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
        fp8_gemm_nt(a, sa, b, sb, torch.bfloat16, config=cfg, out=out, promote=promote)
        check(out, ref_gemm_nt(a, sa, b, sb, torch.bfloat16), what=f"{m}x{n}x{k} split {cfg.SPLIT_K} promote {promote}")


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 83, 4096, 16384])
def test_gemm_swiglu_epilogue_cuda(m):
    """The dense MLP's gate/up GEMM with SwiGLU in its epilogue at the 4b preset's widths (I 3840, d 1408),
    with the default config, split-K and a 64-row config: against the reference, and its per-token
    quantization bit for bit the unfused path's (the (M, 2I) output, then act_quant.swiglu_quant)."""
    inter, k = 3840, 1408
    a, sa, g, sg = _operands(m, inter, k, seed=m)
    _, _, u, su = _operands(m, inter, k, seed=m + 1)
    w13, s13 = interleave_gate_up(g, u), interleave_gate_up(sg, su)
    pos = torch.argsort(swiglu_order(inter).cuda())
    ref = _swiglu_ref(a, sa, w13, s13)[:, pos]
    for cfg in (None, KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4,
                                   SPLIT_K=2 if m <= 512 else 1)):
        for variant in ("auto", "ptr"):
            out = poison(torch.empty(m, inter, dtype=torch.bfloat16, device="cuda"))
            fp8_gemm_nt(a, sa, w13, s13, config=cfg, variant=variant, out=out, swiglu=True)
            # gate and up each carry the FP8 tensor cores' accumulation error (5.5e-4 at K = 1408 on an
            # H100, under the 1e-3 gate); their product carries both, so this check gets twice the gate.
            # The exact check is the next one: the same bits as the unfused path.
            check(out, ref, tol=2 * TOL, what=f"swiglu {m} {variant} {cfg}")
            gu = fp8_gemm_nt(a, sa, w13, s13, config=cfg, variant=variant)
            q0, s0 = act_quant.swiglu_quant(gu[:, 0::2][:, pos].contiguous(), gu[:, 1::2][:, pos].contiguous())
            q1, s1 = act_quant.per_token_quant(out)
            assert torch.equal(s0, s1) and torch.equal(q0.view(torch.uint8), q1.view(torch.uint8)), (m, variant, cfg)


# -- the Gluon kernel (kernels/fp8_gemm_gluon.py): Hopper only; its selection is checked everywhere ------------

GLUON_DEFAULT = default_config("fp8_gemm", 16384, 1408, 3840)


def test_gluon_forms_and_chains():
    """Which configs the Gluon kernel takes (a consumer warpgroup per 64 rows, one program per SM, the ring
    within shared memory), and its chain lengths per promotion mode: mode 2 splits K as the tl.dot kernel's
    pieces do (at most PROMOTE_MIN_K a chain, at least two chains)."""
    from fp8conv.kernels.fp8_gemm import _gluon_piece, gluon_form

    assert gluon_form(GLUON_DEFAULT)
    assert gluon_form(KernelConfig(BLOCK_M=192, BLOCK_N=128, BLOCK_K=128, num_warps=12, num_stages=4))
    assert gluon_form(KernelConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=6))
    for bad in (dict(num_warps=4), dict(BLOCK_M=64, num_warps=4), dict(BLOCK_N=256), dict(BLOCK_K=256),
                dict(SPLIT_K=2), dict(PROGRAMS_PER_SM=2), dict(num_stages=7), dict(num_stages=1)):
        assert not gluon_form(KernelConfig(**{**GLUON_DEFAULT.to_dict(), **bad})), bad
    assert gluon_form(KernelConfig(**{**GLUON_DEFAULT.to_dict(), "num_stages": 6}))
    assert not gluon_form(KernelConfig(**{**GLUON_DEFAULT.to_dict(), "num_stages": 6}), out_elem=4)
    assert [_gluon_piece(2, t) for t in (30, 32, 33, 16, 1)] == [15, 16, 11, 8, 1]
    assert _gluon_piece(0, 30) == 30 and _gluon_piece(1, 30) == 1


def test_gluon_variant_is_refused_where_it_cannot_run():
    """variant='gluon' says why it cannot run (no Hopper GPU here, or a config that is not one of its
    forms); an unknown variant is an error, not the pointer kernel."""
    from fp8conv.kernels.fp8_gemm import gluon_dense_ok

    a, sa, b, sb = _operands(7, 64, 2064, seed=2)
    if not gluon_dense_ok(a.device):
        with pytest.raises(ValueError, match="variant 'gluon'"):
            fp8_gemm_nt(a, sa, b, sb, config=GLUON_DEFAULT, variant="gluon")
    with pytest.raises(ValueError, match="gluon_form"):
        fp8_gemm_nt(a, sa, b, sb, config=SMALL, variant="gluon")
    with pytest.raises(ValueError, match="variant must be one of"):
        fp8_gemm_nt(a, sa, b, sb, variant="cutlass")


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", [(1, 1408, 3840), (7, 136, 2064), (83, 1000, 4096), (300, 72, 2176),
                                   (4096, 1408, 3840), (16384, 1408, 3840)])
def test_gemm_gluon_cuda(m, n, k):
    """The Gluon kernel at long K (M, N, K tails; mode 2's chains of 15, 9 and 16 blocks, the second one
    shorter where the block count is odd, and mode 1's single blocks) in its forms, with bf16 / fp16 /
    fp32 outputs; 'auto' takes it for the long-K default config (the same bits as variant='gluon')."""
    from fp8conv.kernels.fp8_gemm import gluon_dense_ok

    a, sa, b, sb = _operands(m, n, k, seed=m + n + k)
    if not gluon_dense_ok(a.device):
        pytest.skip("the Gluon kernel needs a Hopper GPU and Triton's Gluon")
    forms = [GLUON_DEFAULT, KernelConfig(BLOCK_M=192, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=12, num_stages=4),
             KernelConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=6)]
    for cfg, promote, dtype in [(forms[0], None, torch.bfloat16), (forms[0], 1, torch.float16),
                                (forms[1], 2, torch.bfloat16), (forms[2], 2, torch.float32)]:
        out = poison(torch.empty(m, n, dtype=dtype, device="cuda"))
        fp8_gemm_nt(a, sa, b, sb, dtype, config=cfg, variant="gluon", out=out, promote=promote)
        check(out, ref_gemm_nt(a, sa, b, sb, dtype), what=f"gluon {m}x{n}x{k} {cfg} promote {promote}")
    ref = fp8_gemm_nt(a, sa, b, sb, config=GLUON_DEFAULT, variant="gluon")
    assert torch.equal(fp8_gemm_nt(a, sa, b, sb, config=GLUON_DEFAULT), ref)
