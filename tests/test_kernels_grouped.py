"""kernels/grouped_gemm.py: packing, align, the block-scaled grouped GEMM (fused gate/up + SwiGLU +
quant, and down), combine and the whole pipeline, against dequantized float32 references.

Each stage is checked on its own inputs against the 1e-3 gate (end to end, a second dynamic
quantization of a GEMM output amplifies accumulation-order differences: kernels/testing.py,
TOL_CHAINED; that comparison with ReferenceBackend is a CUDA test)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fp8conv import numerics as fp8
from fp8conv.kernels import grouped_gemm as gg
from fp8conv.kernels.config import KernelConfig
from fp8conv.kernels.testing import TOL_CHAINED, check, check_quant, poison
from fp8conv.runtime.ops import Experts, ReferenceBackend

CFG_GU = KernelConfig(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=2)
CFG_DN = KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=2)
# (E, I, d, T, topk): I and d not multiples of 128; T = 1, 7, 83
# d = 208, I = 144: 16-byte aligned rows, so B (and the down GEMM's A) go through TMA descriptors
CASES = [(4, 150, 200, 1, 2), (4, 150, 200, 7, 2), (3, 128, 136, 83, 3), (3, 144, 208, 83, 3)]


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _experts(e, i, d, seed):
    g = torch.Generator().manual_seed(seed)

    def qb(rows, cols):
        qs = [fp8.quantize_block(torch.randn(rows, cols, generator=g) * 0.05) for _ in range(e)]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    (gq, gs), (uq, us), (dq, ds) = qb(i, d), qb(i, d), qb(d, i)
    dev = _dev()
    return Experts(gq.to(dev), uq.to(dev), dq.to(dev), gs.to(dev), us.to(dev), ds.to(dev), "layer")


def _routing(t, e, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    return ids.to(_dev()), w.to(_dev())


def test_pack_interleaves_blocks_and_pads():
    ex = _experts(2, 150, 200, seed=0)
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale)
    assert p.w13.shape == (2, 512, 200) and p.s13.shape == (2, 4, 2) and p.inter == 150
    w = p.w13.cpu().float()
    assert torch.equal(w[1, 0:128], ex.gate[1, :128].cpu().float())
    assert torch.equal(w[1, 128:256], ex.up[1, :128].cpu().float())
    assert torch.equal(w[1, 256:278], ex.gate[1, 128:].cpu().float())
    assert (w[1, 278:384] == 0).all() and (w[1, 406:512] == 0).all()
    assert torch.equal(p.s13[1, 3].cpu(), ex.up_scale[1, 1].cpu())


def test_pack_interleave_1_orders_rows_for_the_gluon_quads():
    """interleave 1: row 8j + 2t + s of each 128-row tile is gate (s 0) or up (s 1) row 16t + j of the tile's
    64, so thread t of a wgmma quad (columns 2t, 2t + 1 of every 8) holds SwiGLU columns 16t..16t+15."""
    ex = _experts(2, 150, 64, seed=3)
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale, interleave=1)
    assert p.w13.shape == (2, 512, 64) and p.interleave == 1
    w = p.w13.cpu().float()
    g = torch.nn.functional.pad(ex.gate.cpu().float(), (0, 0, 0, 106))  # padded to 256 rows
    u = torch.nn.functional.pad(ex.up.cpu().float(), (0, 0, 0, 106))
    for tile in range(4):
        for j in range(16):
            for t in range(4):
                row = 64 * tile + 16 * t + j
                assert torch.equal(w[1, 128 * tile + 8 * j + 2 * t], g[1, row]), (tile, j, t)
                assert torch.equal(w[1, 128 * tile + 8 * j + 2 * t + 1], u[1, row]), (tile, j, t)
    assert torch.equal(p.s13.cpu(), gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale,
                                                      ex.down_scale, interleave=64).s13.cpu())
    order = gg.gluon_w13_order(256)
    assert sorted(order.tolist()) == list(range(256))  # a permutation
    with pytest.raises(ValueError, match="multiple of 128"):
        gg.gluon_w13_order(192)


def test_pack_rejects_wrong_scales():
    ex = _experts(2, 128, 128, seed=0)
    with pytest.raises(ValueError, match="gate_scale"):
        gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale[:, :, :0], ex.up_scale, ex.down_scale)


@pytest.mark.parametrize("t,e,k,align", [(1, 4, 2, 16), (7, 4, 2, 16), (83, 5, 3, 64)])
def test_moe_align(t, e, k, align):
    ids, _ = _routing(t, e, k, seed=t)
    sid, bexp = gg.moe_align(ids, e, align)
    sid, bexp, flat = sid.cpu(), bexp.cpu(), ids.reshape(-1).cpu()
    valid = sid < t * k
    assert sorted(sid[valid].tolist()) == list(range(t * k))  # every routed row exactly once
    for p in valid.nonzero().flatten().tolist():
        assert flat[sid[p]].item() == bexp[p // align].item()  # the block's expert is the row's
    used = bexp >= 0
    assert used.sum() == sum(-(-(flat == x).sum().item() // align) for x in range(e))
    assert not used[used.long().argmin():].any() or used.all()  # used blocks come first


def _h_ref(ex, xd, sid, flat, n_valid, k, ip):
    """The gate/up GEMM's SwiGLU output for every padded row (zeros for padding), from dequantized token
    activations xd: gate/up outputs rounded to bf16, then SwiGLU's, as the kernels round."""
    h_ref = torch.zeros(sid.numel(), ip, dtype=torch.bfloat16)
    i = ex.gate.shape[1]
    for r in range(sid.numel()):
        tok = sid[r].item()
        if tok < n_valid:
            ei, row = flat[tok].item(), tok // k
            gt = (xd[row] @ fp8.dequantize(ex.gate[ei].cpu(), ex.gate_scale[ei].cpu()).t()).to(torch.bfloat16)
            ut = (xd[row] @ fp8.dequantize(ex.up[ei].cpu(), ex.up_scale[ei].cpu()).t()).to(torch.bfloat16)
            h_ref[r, :i] = (F.silu(gt.float()) * ut.float()).to(torch.bfloat16)
    return h_ref


@pytest.mark.parametrize("case", CASES)
def test_stages_against_references(case):
    e, i, d, t, k = case
    ex = _experts(e, i, d, seed=sum(case))
    ids, w = _routing(t, e, k, seed=t + 1)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16).to(_dev())
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale)
    align = 16
    xq, xs = fp8.quantize_per_group(x)
    sid, bexp = gg.moe_align(ids, e, align)
    n_rows, ip = sid.numel(), p.w13.shape[1] // 2
    hq = poison(torch.empty(n_rows, ip, dtype=torch.float8_e4m3fn, device=x.device))
    hs = poison(torch.empty(n_rows, ip // 128, dtype=torch.float32, device=x.device))
    gg.grouped_gemm_block_fp8(xq, xs, p.w13, p.s13, sid, bexp, topk=k, swiglu=True, align_m=align,
                              config=CFG_GU, out=(hq, hs))
    # reference h for every padded row, from the same inputs (padding rows must be exact zeros)
    xd = fp8.dequantize(xq.cpu(), xs.cpu())
    flat = ids.reshape(-1).cpu()
    h_ref = _h_ref(ex, xd, sid, flat, t * k, k, ip)
    # rows of blocks no expert uses (past the last used block) are never read and not written
    used = (bexp.cpu() >= 0).repeat_interleave(align)
    check_quant(hq.cpu()[used], hs.cpu()[used], h_ref[used], True, f"gate_up+swiglu+quant {case}")
    # down, from the kernel's own h
    y = poison(torch.empty(t * k, d, dtype=torch.bfloat16, device=x.device))
    gg.grouped_gemm_block_fp8(hq, hs, p.w2, p.s2, sid, bexp, topk=k, swiglu=False, align_m=align,
                              num_valid=t * k, config=CFG_DN, out=y)
    hd = fp8.dequantize(hq.cpu(), hs.cpu())
    y_ref = torch.empty(t * k, d)
    for r in range(n_rows):
        tok = sid[r].item()
        if tok < t * k:
            ei = flat[tok].item()
            y_ref[tok] = hd[r, :i] @ fp8.dequantize(ex.down[ei].cpu(), ex.down_scale[ei].cpu()).t()
    check(y.cpu(), y_ref.to(torch.bfloat16), what=f"down {case}")
    out = gg.combine_topk(y, w)
    ref = (y.cpu().float().view(t, k, d) * w.cpu()[..., None]).sum(1).to(torch.bfloat16)
    check(out.cpu(), ref, what="combine")


def test_default_grouped_configs_follow_the_role():
    from fp8conv.kernels.config import default_config
    # d > 2*I: the gate/up weight has fewer rows than columns, the role still decides
    assert default_config("fp8_grouped_gemm", 500, 2048, 4096, gate_up=True).BLOCK_N == 256
    assert default_config("fp8_grouped_gemm", 500, 4096, 1024, gate_up=False).BLOCK_N == 128
    for gu in (True, False):
        assert default_config("fp8_grouped_gemm", 1, 256, 128, gate_up=gu).BLOCK_K == 128


def test_config_constraints_are_enforced():
    ex = _experts(2, 128, 128, seed=1)
    ids, _ = _routing(3, 2, 1, seed=1)
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale)
    xq, xs = fp8.quantize_per_group(torch.randn(3, 128).to(_dev()))
    sid, bexp = gg.moe_align(ids, 2, 16)
    with pytest.raises(ValueError, match="BLOCK_K == 128"):
        gg.grouped_gemm_block_fp8(xq, xs, p.w13, p.s13, sid, bexp, topk=1, swiglu=True, align_m=16,
                                  config=KernelConfig(BLOCK_M=16, BLOCK_N=256, BLOCK_K=64))
    with pytest.raises(ValueError, match="BLOCK_N == 256"):
        gg.grouped_gemm_block_fp8(xq, xs, p.w13, p.s13, sid, bexp, topk=1, swiglu=True, align_m=16,
                                  config=KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128))


@pytest.mark.cuda
@pytest.mark.parametrize("t,k,interleave", list(itertools.product([1, 7, 83, 2048], [3], [1, 64, 128])))
def test_fused_experts_vs_reference_backend_cuda(t, k, interleave):
    """Every layout (interleave 64: sorted, the serving path, its down GEMM in Gluon on Hopper; 1: both
    GEMMs in Gluon; 128: gather) at the 4b preset's shapes."""
    if interleave == 1 and not gg.gluon_ok("cuda"):
        pytest.skip("the Gluon kernels need compute capability 9.x and Triton with Gluon")
    e, i, d = 53, 1408, 1408  # 4b preset experts
    ex = _experts(e, i, d, seed=t)
    ids, w = _routing(t, e, k, seed=t)
    x = torch.randn(t, d, device="cuda").to(torch.bfloat16)
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale, interleave=interleave)
    out = gg.fused_experts(x, ids, w, p)
    check(out, ReferenceBackend().experts(x, ids, w, ex), tol=TOL_CHAINED, what=f"experts T={t}")


@pytest.mark.cuda
@pytest.mark.parametrize("t", [7, 2048])
def test_stages_real_shapes_cuda(t):
    """Each grouped stage at the 4b preset's shapes against its own inputs (1e-3 gate)."""
    e, i, d, k = 53, 1408, 1408, 3
    ex = _experts(e, i, d, seed=100 + t)
    ids, w = _routing(t, e, k, seed=t)
    x = torch.randn(t, d, device="cuda").to(torch.bfloat16)
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale)
    align = 128
    xq, xs = fp8.quantize_per_group(x)
    sid, bexp = gg.moe_align(ids, e, align)
    n_rows = sid.numel()
    hq = poison(torch.empty(n_rows, i, dtype=torch.float8_e4m3fn, device="cuda"))
    hs = poison(torch.empty(n_rows, i // 128, dtype=torch.float32, device="cuda"))
    gg.grouped_gemm_block_fp8(xq, xs, p.w13, p.s13, sid, bexp, topk=k, swiglu=True, align_m=align, out=(hq, hs))
    y = poison(torch.empty(t * k, d, dtype=torch.bfloat16, device="cuda"))
    gg.grouped_gemm_block_fp8(hq, hs, p.w2, p.s2, sid, bexp, topk=k, swiglu=False, align_m=align,
                              num_valid=t * k, out=y)
    xd, hd = fp8.dequantize(xq, xs), fp8.dequantize(hq, hs)
    flat = ids.reshape(-1)
    valid = sid < t * k
    row_exp = bexp.repeat_interleave(align)
    h_ref = torch.zeros(n_rows, i, dtype=torch.bfloat16, device="cuda")
    y_ref = torch.empty(t * k, d, device="cuda")
    for ei in range(e):
        r = (valid & (row_exp == ei)).nonzero().flatten()
        if r.numel() == 0:
            continue
        tok = sid[r].long()
        assert (flat[tok] == ei).all()
        xe = xd[tok // k]
        gt = (xe @ fp8.dequantize(ex.gate[ei], ex.gate_scale[ei]).t()).to(torch.bfloat16).float()
        ut = (xe @ fp8.dequantize(ex.up[ei], ex.up_scale[ei]).t()).to(torch.bfloat16).float()
        h_ref[r] = (F.silu(gt) * ut).to(torch.bfloat16)
        y_ref[tok] = hd[r] @ fp8.dequantize(ex.down[ei], ex.down_scale[ei]).t()
    used = row_exp >= 0
    check_quant(hq[used], hs[used], h_ref[used], True, "gate_up+swiglu+quant", own_scale=True)
    check(y, y_ref.to(torch.bfloat16), what="down")


# -- the sorted-layout path (persistent TMA kernels; fused_experts' default where TMA applies) ----------

SORTED_CASES = [(3, 144, 208, 83, 3), (4, 144, 208, 7, 2), (2, 128, 128, 1, 1)]
CFG_GU_S = KernelConfig(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=2)
CFG_DN_S = KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=2)


@pytest.mark.parametrize("t,e,k,align", [(1, 4, 2, 16), (83, 5, 3, 64), (40, 3, 1, 16)])
def test_moe_align_pos_is_the_inverse(t, e, k, align):
    ids, _ = _routing(t, e, k, seed=t + 7)
    sid, bexp, pos, used = gg.moe_align(ids, e, align, with_pos=True)
    sid2, bexp2 = gg.moe_align(ids, e, align)
    assert torch.equal(sid, sid2) and torch.equal(bexp, bexp2)
    assert pos.shape == (t, k) and pos.dtype == torch.int32 and used.shape == (1,)
    flat_pos = pos.reshape(-1).long().cpu()
    assert torch.equal(sid.cpu()[flat_pos], torch.arange(t * k, dtype=torch.int32))
    assert used.item() == (bexp >= 0).sum().item()


def test_per_group_quant_sorted_matches_per_group_quant():
    from fp8conv.kernels import act_quant

    t, k, d = 37, 3, 200
    ids, _ = _routing(t, 5, k, seed=3)
    sid, _, pos, _ = gg.moe_align(ids, 5, 16, with_pos=True)
    x = (torch.randn(t, d, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16).to(_dev())
    q_ref, s_ref = act_quant.per_group_quant(x)
    q = poison(torch.empty(sid.numel(), d, dtype=torch.float8_e4m3fn, device=x.device))
    s = poison(torch.empty(2, sid.numel(), dtype=torch.float32, device=x.device))
    act_quant.per_group_quant_sorted(x, pos, sid.numel(), out=(q, s))
    for j in range(k):  # every routed copy holds the token's quantization, bit for bit
        rows = pos[:, j].long()
        assert torch.equal(q[rows].view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(s[:, rows].t(), s_ref)
    with pytest.raises(ValueError, match="dest"):
        act_quant.per_group_quant_sorted(x, pos.long(), sid.numel())


# the Gluon kernels (CUDA, Hopper): a warpgroup per 64 rows; K and I not multiples of 128, experts
# with no rows, a used-block count below the buffers'
GLUON_CASES = [(3, 144, 208, 83, 3), (6, 400, 272, 300, 2), (5, 128, 128, 1, 1), (53, 1408, 1408, 700, 3)]
# BLOCK_M 64: one warpgroup, asynchronous wgmma; 128 (192): two (three) consumer warpgroups and a TMA warp
CFG_GL = {bm: (KernelConfig(BLOCK_M=bm, BLOCK_N=256, BLOCK_K=128, GROUP_M=4, num_warps=bm // 16, num_stages=2),
               KernelConfig(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=bm // 16, num_stages=3))
          for bm in (64, 128, 192)}


@pytest.mark.parametrize("case,impl", [(c, "triton") for c in SORTED_CASES]
                         + [pytest.param(c, f"gluon{bm}", marks=pytest.mark.cuda) for c in GLUON_CASES
                            for bm in CFG_GL])
def test_sorted_stages_against_references(case, impl):
    """The persistent sorted-layout kernels (tl.dot, or Gluon on Hopper) on their own inputs: gate/up +
    SwiGLU + quant, then down (rows in sorted order), then the gathering combine; outputs poisoned
    first."""
    gluon_bm = int(impl[5:]) if impl.startswith("gluon") else None
    if gluon_bm and not gg.gluon_ok("cuda"):
        pytest.skip("the Gluon kernels need compute capability 9.x and Triton with Gluon")
    e, i, d, t, k = case
    ex = _experts(e, i, d, seed=sum(case) + 1)
    ids, w = _routing(t, e, k, seed=t + 3)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16).to(_dev())
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale,
                        interleave=gg.INTERLEAVE["gluon" if gluon_bm else "sorted"])
    assert gg.sorted_path_ok(d, i)
    align = max(128, gluon_bm) if gluon_bm else 16
    cfg_gu, cfg_dn = CFG_GL[gluon_bm] if gluon_bm else (CFG_GU_S, CFG_DN_S)
    impl = "gluon" if gluon_bm else impl
    sid, bexp, pos, used = gg.moe_align(ids, e, align, with_pos=True)
    n_rows, ip = sid.numel(), p.w13.shape[1] // 2
    from fp8conv.kernels.act_quant import per_group_quant_sorted

    xq = poison(torch.empty(n_rows, d, dtype=torch.float8_e4m3fn, device=x.device))
    xs = poison(torch.empty(-(-d // 128), n_rows, dtype=torch.float32, device=x.device))
    per_group_quant_sorted(x, pos, n_rows, out=(xq, xs))  # padding rows keep the poison (NaN)
    hq = poison(torch.empty(n_rows, ip, dtype=torch.float8_e4m3fn, device=x.device))
    hs = poison(torch.empty(ip // 128, n_rows, dtype=torch.float32, device=x.device))
    gg.grouped_gemm_sorted(xq, xs, p.w13, p.s13, sid, bexp, used, swiglu=True, num_valid=t * k, align_m=align,
                           config=cfg_gu, out=(hq, hs), impl=impl)
    xr, xsr = fp8.quantize_per_group(x.cpu())
    xd = fp8.dequantize(xr, xsr)
    flat = ids.reshape(-1).cpu()
    h_ref = _h_ref(ex, xd, sid, flat, t * k, k, ip)
    used_rows = (bexp.cpu() >= 0).repeat_interleave(align)
    assert used_rows.sum() == used.item() * align
    hs_rows = hs.cpu().t()
    # padding rows (poisoned NaN inputs) must come out as exact zeros with scale 1
    pad = used_rows & (sid.cpu() >= t * k)
    assert (hq.cpu()[pad].float() == 0).all() and (hs_rows[pad] == 1).all()
    check_quant(hq.cpu()[used_rows], hs_rows[used_rows].contiguous(), h_ref[used_rows], True,
                f"sorted gate_up+swiglu+quant {case}")
    y = poison(torch.empty(n_rows, d, dtype=torch.bfloat16, device=x.device))
    gg.grouped_gemm_sorted(hq, hs, p.w2, p.s2, sid, bexp, used, swiglu=False, num_valid=t * k, align_m=align,
                           config=cfg_dn, out=y, impl=impl)
    hd = fp8.dequantize(hq.cpu(), hs_rows.contiguous())
    y_ref = torch.zeros(n_rows, d)
    for r in range(n_rows):
        tok = sid[r].item()
        if tok < t * k:
            ei = flat[tok].item()
            y_ref[r] = hd[r, :i] @ fp8.dequantize(ex.down[ei].cpu(), ex.down_scale[ei].cpu()).t()
    check(y.cpu()[used_rows], y_ref[used_rows].to(torch.bfloat16), what=f"sorted down {case}")
    out = gg.combine_topk(y, w, pos)
    yv = y.cpu().float()[pos.cpu().long()]  # (t, k, d)
    ref = (yv * w.cpu()[..., None]).sum(1).to(torch.bfloat16)
    check(out.cpu(), ref, what="combine (gathered)")


def test_fused_experts_layouts_agree():
    """fused_experts picks the sorted layout where TMA applies; both layouts give the same result."""
    e, i, d, t, k = 3, 144, 208, 29, 2
    ex = _experts(e, i, d, seed=11)
    ids, w = _routing(t, e, k, seed=12)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16).to(_dev())
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale, interleave=64)
    p128 = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale)
    cfg = dict(config_gate_up=CFG_GU_S, config_down=CFG_DN_S)
    a = gg.fused_experts(x, ids, w, p, **cfg)  # auto: sorted (aligned rows, interleave 64)
    b = gg.fused_experts(x, ids, w, p128, **cfg)  # auto: gather (interleave 128)
    with pytest.raises(ValueError, match="interleave=64"):
        gg.fused_experts(x, ids, w, p128, layout="sorted", **cfg)
    with pytest.raises(ValueError, match="interleave=128"):
        gg.fused_experts(x, ids, w, p, layout="gather", **cfg)
    check(a.cpu(), b.cpu(), what="sorted vs gather layout")
    ref = ReferenceBackend().experts(x, ids, w, ex)
    check(a.cpu(), ref.cpu(), tol=TOL_CHAINED, what="sorted layout vs reference backend")
    assert not gg.sorted_path_ok(200, 150)  # unaligned rows take the gather layout
    w64 = p.w13.cpu().float()  # interleave 64: gate rows 0-63, up rows 0-63, gate 64-127, ...
    assert torch.equal(w64[1, 64:128], ex.up[1, :64].cpu().float())
    assert torch.equal(w64[1, 128:192], ex.gate[1, 64:128].cpu().float())
    with pytest.raises(ValueError, match="layout"):
        gg.fused_experts(x, ids, w, p, layout="nope", **cfg)
    p1 = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale, interleave=1)
    # interleave 1 (the Gluon kernels): gate row r at 2r, up row r at 2r + 1, then gluon_w13_order
    w1 = p1.w13.cpu().float()[:, torch.argsort(gg.gluon_w13_order(p1.w13.shape[1]))]
    assert torch.equal(w1[1, 0::2][:i], ex.gate[1].cpu().float())
    assert torch.equal(w1[1, 1::2][:i], ex.up[1].cpu().float())
    assert torch.equal(p1.s13, p.s13)  # the same 128-row block pairs: the same scales
    with pytest.raises(ValueError, match="interleave=1"):
        gg.fused_experts(x, ids, w, p, layout="gluon", **cfg)
    assert gg.expert_layout(d, i) == "sorted" and gg.expert_layout(200, 150) == "gather"
    if not gg.gluon_ok(x.device):
        assert gg.expert_layout(d, i, x.device) == "sorted"
        with pytest.raises(RuntimeError, match="Gluon"):
            gg.fused_experts(x, ids, w, p1, **cfg)  # auto: the packing's layout, which cannot run here


@pytest.mark.parametrize("routing", ["one_expert", "empty"])
def test_sorted_layout_skewed_and_empty_routing(routing):
    """The persistent loop's tile count comes from the used blocks on the device: every row to one
    expert (the others get no blocks), and no tokens at all."""
    e, i, d, k = 4, 144, 208, 2
    ex = _experts(e, i, d, seed=21)
    t = 0 if routing == "empty" else 37
    ids = torch.stack([torch.tensor([1, 3]) for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.int64)
    ids, w = ids.to(_dev()), torch.rand(t, k, generator=torch.Generator().manual_seed(22)).to(_dev())
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(23)).to(torch.bfloat16).to(_dev())
    p = gg.pack_experts(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale, interleave=64)
    sid, bexp, pos, used = gg.moe_align(ids, e, 16, with_pos=True)
    assert used.item() == (2 * -(-t // 16) if t else 0)
    out = gg.fused_experts(x, ids, w, p, config_gate_up=CFG_GU_S, config_down=CFG_DN_S)
    assert out.shape == (t, d)
    if t:
        ref = ReferenceBackend().experts(x, ids, w, ex)
        check(out.cpu(), ref.cpu(), tol=TOL_CHAINED, what=f"sorted layout, {routing}")


def test_gluon_kernels_only_on_the_triton_they_were_written_for(monkeypatch):
    """The Gluon kernels use Triton 3.6's Gluon API (later versions renamed its TMA copies): another
    Triton, or a CPU tensor, takes the tl.dot kernels."""
    import triton

    monkeypatch.setattr(gg, "_GLUON", None)
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert gg._gluon() is None and not gg.gluon_ok("cpu")
    assert gg.expert_layout(1408, 1408, "cpu") == "sorted"
    # the down GEMM's kernel per layout: the gluon layout always Gluon, the gather layout always tl.dot
    assert gg.layout_kernels("gluon") == (gg.GLUON_KERNEL,) * 2
    assert gg.layout_kernels("sorted") == gg.layout_kernels("gather") == (gg.KERNEL_NAME,) * 2
    monkeypatch.setattr(gg, "_GLUON", None)
    monkeypatch.setattr(triton, "__version__", gg.GLUON_TRITON + ".0")
    got = gg._gluon()
    assert got is None or hasattr(got, "launch_sorted")  # None only where this Triton lacks Gluon
    assert not gg.gluon_ok("cpu")
    monkeypatch.setattr(gg, "_GLUON", None)  # the next caller looks again with the real version
