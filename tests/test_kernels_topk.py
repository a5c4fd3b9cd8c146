"""kernels/topk.py against torch.topk and an exact (value desc, index asc) reference.

CPU: Triton interpreter at small shapes; both paths (one program per row, and the multi-program path
with small chunks, its sample filter steered into each of its cases). CUDA: the beam-search shapes.
"""

import itertools
import math

import pytest
import torch

from fp8conv.kernels import topk as topk_mod
from fp8conv.kernels.config import KernelConfig, default_config
from fp8conv.kernels.topk import topk

MULTI = KernelConfig(BLOCK_N=512, BLOCK_K=128, num_warps=4)  # several programs per row at C ~ 1000s


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def ref_topk(x, k):
    """Exact reference: order-preserving keys (NaN highest, -0.0 below +0.0), ties lowest index first."""
    xf = x.float()  # on x's device; the result on the CPU
    b = xf.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(b >= 2**31, b ^ 0xFFFFFFFF, b | 2**31)
    key = torch.where(torch.isnan(xf), 2**32 - 1, key)
    c = x.shape[1]
    ck = key * c + (c - 1 - torch.arange(c, device=x.device))
    idx = torch.sort(ck, dim=1, descending=True).indices[:, :k]
    return xf.gather(1, idx).cpu(), idx.cpu()


def bits(t):
    return t.float().contiguous().view(torch.int32)


def check(x, k, **kw):
    v, i = topk(x, k, **kw)
    assert v.shape == (x.shape[0], k) and i.shape == (x.shape[0], k)
    assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.is_contiguous() and i.is_contiguous()
    v, i = v.cpu(), i.cpu()
    rv, ri = ref_topk(x, k)
    assert torch.equal(i, ri), f"indices differ from the (value desc, index asc) order\n{i}\n{ri}"
    assert torch.equal(bits(v), bits(rv))
    xc = x.float().cpu()
    assert torch.equal(bits(xc.gather(1, i)), bits(v))  # indices point at those values
    assert all(len(set(row.tolist())) == k for row in i)  # distinct
    # the same values as torch.topk (== makes -0.0 and +0.0 equal, whose order torch leaves open;
    # NaN compared by position), bit-for-bit where no signed zeros are involved
    tv = torch.topk(xc, k, dim=-1, sorted=True).values
    nan = torch.isnan(tv)
    assert torch.equal(nan, torch.isnan(v))
    assert torch.equal(tv[~nan], v[~nan])
    if not ((xc == 0) & torch.signbit(xc)).any():
        assert torch.equal(bits(tv), bits(v))
    return v, i


PATHS = [dict(single_program=True), dict(single_program=False, config=MULTI)]
PATH_IDS = ["rows", "multi"]


# -- random data, awkward sizes, both paths ----------------------------------------------------------

CASES = [(1, 1), (7, 1), (7, 7), (7, 3), (83, 1), (83, 83), (83, 17), (1000, 10), (1000, 333),
         (4099, 1), (4099, 512), (4099, 77)]


@pytest.mark.parametrize("c,k", CASES)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_random(c, k, path):
    g = torch.Generator().manual_seed(c * 31 + k)
    rows = 3 if k <= 100 else 1  # the interpreter's bitonic sort is slow at k >= 256
    x = torch.randn(rows, c, generator=g).to(_dev())
    check(x, k, **path)


@pytest.mark.parametrize("c,k", [(83, 83), (4099, 4099), (4099, 2049)])
def test_large_k_sorted_by_torch(c, k):
    """k > SORT_MAX (or forced there): exactly k composites, ordered by torch.sort."""
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-50, 50, (2, c), generator=g).float().to(_dev())  # ties across the cut
    if k <= topk_mod.SORT_MAX:
        old = topk_mod.SORT_MAX
        topk_mod.SORT_MAX = 16
        try:
            check(x, k)
        finally:
            topk_mod.SORT_MAX = old
    else:
        check(x, k)


# -- ties, -inf, equal rows, signed zeros, NaN -----------------------------------------------------------

def _special_rows(c, g):
    rows = []
    rows.append(torch.tensor([-1.5, -0.25, -3.0, -7.0])[torch.randint(0, 4, (c,), generator=g)])  # few values
    rows.append(torch.full((c,), -math.inf))  # all -inf
    r = torch.full((c,), -math.inf)
    pos = torch.randperm(c, generator=g)[: max(1, c // 50)]
    r[pos] = -torch.rand(len(pos), generator=g) * 20  # mostly -inf
    rows.append(r)
    rows.append(torch.full((c,), -2.0))  # all equal
    r = torch.randn(c, generator=g).log_softmax(-1)
    r[torch.rand(c, generator=g) < 0.3] = -math.inf  # masked log-probabilities
    rows.append(r)
    return torch.stack(rows)


@pytest.mark.parametrize("c,k", [(83, 10), (120, 120), (1000, 1), (1000, 101)])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_ties_and_minus_inf(c, k, path):
    g = torch.Generator().manual_seed(c + k)
    x = _special_rows(c, g).to(_dev())
    v, i = check(x, k, **path)
    # lowest index first among equal values
    for row_v, row_i in zip(v, i):
        for a in range(k - 1):
            if bits(row_v[a : a + 1]).item() == bits(row_v[a + 1 : a + 2]).item():
                assert row_i[a] < row_i[a + 1]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_signed_zero_and_nan(path):
    x = torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0, math.nan, -math.inf, math.nan, -1.0, -math.nan],
                      [-0.0, -0.0, 0.0, -0.0, 0.0, 0.0, -0.0, 0.0, -0.0, -0.0]])
    x = x.repeat(1, 9).to(_dev())  # 90 columns
    for k in (1, 2, 5, 11, 40, 90):
        v, i = check(x, k, **path)
    # row 0: the NaNs (either sign) come first, lowest index first; +0.0 before -0.0
    v, i = topk(x, 90, **path)
    v, i = v.cpu(), i.cpu()
    assert torch.isnan(v[0, :27]).all() and v[0, 27] == 1.0
    assert i[0, :3].tolist() == [5, 7, 9]
    z = v[1]
    assert (z == 0).all() and not torch.signbit(z[:36]).any() and torch.signbit(z[36:]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 300, generator=g) * 4).to(dtype)  # many ties after rounding
    x[1, ::7] = -math.inf
    x = x.to(_dev())
    for path in PATHS:
        v, i = check(x, 37, **path)
        assert torch.equal(v.cpu(), torch.topk(x.cpu(), 37).values.float())


def test_row_stride_and_empty():
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 700, generator=g).to(_dev())
    check(wide[:, 50:650], 9)  # a view: row stride 700
    check(wide[:, 50:650], 9, single_program=False, config=MULTI)
    v, i = topk(torch.empty(0, 5, device=_dev()), 2)
    assert v.shape == (0, 2) and i.shape == (0, 2)


# -- the multi-program path's sample filter, steered into each case ------------------------------------------

@pytest.fixture
def small_sample(monkeypatch):
    monkeypatch.setattr(topk_mod, "SAMPLE_BLOCKS", 32)
    monkeypatch.setattr(topk_mod, "SAMPLE_LEN", 8)  # 256 sampled
    return monkeypatch


def _run_plan(monkeypatch, x, k, j, cap, use=True):
    monkeypatch.setattr(topk_mod, "_plan", lambda c, kk: (use, j, cap))
    trace = {}
    check(x, k, single_program=False, config=MULTI, _trace=trace)
    return trace["case"][0].cpu().tolist(), trace["candidates"][0].cpu().tolist()


def test_filter_cases(small_sample):
    g = torch.Generator().manual_seed(11)
    c = 4099
    x = torch.randn(3, c, generator=g).log_softmax(-1).to(_dev())
    # ready: ~16/256 of the row (~256) above the threshold, >= k, within the buffer
    case, n = _run_plan(small_sample, x, 77, 16, 1024)
    assert case == [1, 1, 1] and all(77 <= v <= 1024 for v in n)
    # threshold too high: ~16 above it, k = 100 -> narrowed below it by full reads
    case, _ = _run_plan(small_sample, x, 100, 1, 1024)
    assert case == [3, 3, 3]
    # threshold too low: ~3800 above it, buffer 400 -> narrowed above it
    case, n = _run_plan(small_sample, x, 77, 240, 400)
    assert case == [4, 4, 4] and all(77 <= v <= 400 for v in n)
    # no filter: narrowed from the whole range
    case, _ = _run_plan(small_sample, x, 77, 16, 1024, use=False)
    assert case == [5, 5, 5]


def test_filter_ties(small_sample):
    g = torch.Generator().manual_seed(12)
    x = _special_rows(3000, g).to(_dev())  # few values, all -inf, mostly -inf, equal, masked log-probs
    case, n = _run_plan(small_sample, x, 100, 16, 1024)
    assert case[:4] == [2, 2, 2, 2] and n[:4] == [100] * 4  # the threshold is tied: index order
    case, _ = _run_plan(small_sample, x, 1, 3, 64)
    assert 2 in case


# -- validation, config ------------------------------------------------------------------------------------

def test_rejects_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="between 1 and"):
        topk(x, 9)
    with pytest.raises(ValueError, match="between 1 and"):
        topk(x, 0)
    with pytest.raises(ValueError, match="2-D"):
        topk(torch.randn(8), 2)
    with pytest.raises(ValueError, match="2-D"):
        topk(torch.randn(2, 2, 2), 2)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        topk(torch.arange(16).view(2, 8), 2)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        topk(x.double(), 2)
    with pytest.raises(ValueError, match="unit stride"):
        topk(torch.randn(8, 2).t(), 2)
    with pytest.raises(ValueError, match="k must be an int"):
        topk(x, 2.0)


def test_default_config():
    cfg = default_config("topk", 32, 4194304, 512)
    assert cfg.BLOCK_N == 131072 and 4194304 // cfg.BLOCK_N * 32 == 1024
    assert default_config("topk", 1, 4194304, 512).BLOCK_N == 16384  # enough programs for one row
    for m, n in itertools.product([1, 32, 4096], [8192, 4194304, 2**30]):
        cfg = default_config("topk", m, n, 10)
        assert 2**14 <= cfg.BLOCK_N <= 2**20 and cfg.BLOCK_N & (cfg.BLOCK_N - 1) == 0


@pytest.mark.parametrize("cfg", [KernelConfig(BLOCK_K=1024, num_warps=4), KernelConfig(BLOCK_K=4096, num_warps=16)],
                         ids=["1024w4", "4096w16"])
def test_short_rows_take_the_configs_step_and_warps(cfg, monkeypatch):
    """One program per row reads the config's BLOCK_K (elements per step) and num_warps (what the tuner
    varies there); every step size gives the same exact answer, ties and -inf included."""
    g = torch.Generator().manual_seed(21)
    x = torch.cat([torch.randn(2, 5000, generator=g), _special_rows(5000, g)]).to(_dev())
    assert topk_mod.one_program_per_row(5000, 100) and not topk_mod.one_program_per_row(20000, 10)
    real, launched = topk_mod._rows_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append((kw["BLOCK"], kw["num_warps"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(topk_mod, "_rows_kernel", Spy())
    for k in (1, 100):
        check(x, k, config=cfg)
    assert launched == [(cfg.BLOCK_K, cfg.num_warps)] * 2
    launched.clear()
    check(x, 100)  # the default: 2048 elements a step, 8 warps, as before configs reached this path
    assert launched == [(topk_mod.ROWS_BLOCK, 8)]


# -- GPU, the beam-search shapes -------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("r,c,k", [(32, 4194304, 512), (32, 8192, 512), (32, 4194304, 10), (1, 4194304, 512)])
def test_real_shapes_cuda(r, c, k):
    g = torch.Generator(device="cuda").manual_seed(0)
    beams = 512 if c == 4194304 else 1
    logp = torch.randn(r, beams, c // beams, device="cuda", generator=g).log_softmax(-1)
    scores = (-torch.rand(r, beams, 1, device="cuda", generator=g) * 5 + logp).view(r, c)
    if r >= 4:  # special rows (a single-row launch keeps row 0 as beam search makes it)
        scores[1, ::3] = -math.inf  # catalogue masking
        scores[2] = -math.inf  # a row with no allowed candidate
        scores[2, 12345 % c] = -1.0
        scores[3] = torch.randint(0, 4, (c,), device="cuda", generator=g).float() - 10  # four values
    trace = {}
    v, i = topk(scores, k, _trace=trace)
    tv, ti = torch.topk(scores, k, dim=-1, sorted=True)
    assert torch.equal(v.view(torch.int32), tv.view(torch.int32))  # bit-identical values
    assert torch.equal(scores.gather(1, i).view(torch.int32), v.view(torch.int32))
    rv, ri = ref_topk(scores, k)
    assert torch.equal(i.cpu(), ri)  # lowest index first among equal values
    if trace:
        print("stage-2 cases", trace["case"][0].tolist(), "candidates", trace["candidates"][0].tolist())
    # captured in a CUDA graph: same result
    out = {}
    gr = torch.cuda.CUDAGraph()
    topk(scores, k)  # warm up the compiles outside the capture
    with torch.cuda.graph(gr):
        out["v"], out["i"] = topk(scores, k)
    gr.replay()
    torch.cuda.synchronize()
    assert torch.equal(out["v"], v) and torch.equal(out["i"], i)
