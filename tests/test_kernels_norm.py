"""kernels/norm.py against ops.rms_norm (CPU: Triton interpreter, small shapes; CUDA: a serving shape).

The kernel reduces the sum of squares in another order than torch, which moves the inverse RMS by
about an ulp of float32 in some rows: bf16/fp16 outputs then differ by at most one ulp in rare
elements, float32 outputs by a few float32 ulps. The checks count ulps on the bit patterns
(kernels/testing.check_ulps, which benchmarks/bench_norm.py uses too).
"""

import itertools

import pytest
import torch

from fp8conv.kernels import act_quant, norm
from fp8conv.kernels.testing import check_ulps, poison
from fp8conv.runtime.ops import rms_norm as ref_rms_norm

EPS = 1e-6
ROWS = [1, 7, 83]
COLS = [1, 136, 200, 300]  # 1408-like: not powers of two (a head and a tail tile), and a single column
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# the most ulps an output may differ by, and the least fraction of outputs that must be bit-equal (none
# for float32: a row whose inverse RMS moved by an ulp differs in nearly every element)
MAX_ULPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 8}
MIN_EQUAL = {torch.bfloat16: 0.99, torch.float16: 0.99, torch.float32: 0.0}


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_norm(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """NaN where ref has NaN, within MAX_ULPS of ref elsewhere, MIN_EQUAL of it bit-equal; and in float32
    terms, a relative error within one ulp of the output dtype."""
    check_ulps(out, ref, MAX_ULPS[out.dtype], MIN_EQUAL[out.dtype], what)
    nan = torch.isnan(ref.cpu())
    rtol = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}[out.dtype]
    torch.testing.assert_close(out.cpu()[~nan].float(), ref.cpu()[~nan].float(), rtol=rtol, atol=2.0 ** -24,
                               msg=what)


def _inputs(shape, dtype, seed, w_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # an offset and a spread of row scales, so rows' RMS differ by orders of magnitude
    scale = 2.0 ** torch.randint(-6, 7, (*shape[:-1], 1), generator=g).float()
    x = ((torch.randn(*shape, generator=g) + 0.3) * scale).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(w_dtype)
    return x.to(_dev()), w.to(_dev())


@pytest.mark.parametrize("m,k,dtype", list(itertools.product(ROWS, COLS, DTYPES)))
def test_matches_reference(m, k, dtype):
    x, w = _inputs((m, k), dtype, seed=m * 1000 + k + DTYPES.index(dtype))
    out = poison(torch.empty(m, k, dtype=dtype, device=x.device))  # an unwritten element stays NaN
    assert norm.rms_norm(x, w, EPS, out=out) is out
    check_norm(out, ref_rms_norm(x, w, EPS), f"{m}x{k} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_in_the_activation_dtype_and_3d(dtype):
    """The model's norm weights are held in its dtype; leading dims are flattened and restored."""
    x, w = _inputs((3, 5, 200), dtype, seed=11, w_dtype=dtype)
    y = norm.rms_norm(x, w, EPS)
    assert y.shape == x.shape and y.is_contiguous()
    check_norm(y, ref_rms_norm(x, w, EPS), f"3-D {dtype}")


def test_strided_inputs():
    x, w = _inputs((4, 6, 2 * 136), torch.bfloat16, seed=12)
    w = w[:136]
    # rows with a row stride (2 * 136) read in place: (4, 6, 136) merges to (24, 136), strides (272, 1)
    xs = x[..., :136]
    assert xs.reshape(-1, 136).data_ptr() == xs.data_ptr()
    check_norm(norm.rms_norm(xs, w, EPS), ref_rms_norm(xs, w, EPS), "row-strided")
    # the context's key/value chunk c[:, :, j] of (U, S, J, G, D): no single row stride, copied
    c = _inputs((2, 5, 4, 3, 32), torch.bfloat16, seed=13)[0]
    wk = w[:32]
    check_norm(norm.rms_norm(c[:, :, 1], wk, EPS), ref_rms_norm(c[:, :, 1], wk, EPS), "kv chunk")
    # a transposed input (last-dim stride != 1): copied
    xt = x[0].t()  # (272, 6)
    w6 = w[:6]
    check_norm(norm.rms_norm(xt, w6, EPS), ref_rms_norm(xt, w6, EPS), "transposed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
def test_nan_inf_and_zero_rows_like_the_reference(dtype):
    x, w = _inputs((5, 200), dtype, seed=14)
    x[0, 17] = float("nan")  # the whole row's sum is NaN: the whole row NaN
    x[1, 199] = float("inf")  # inverse RMS 0: inf * 0 = NaN there, 0 elsewhere
    x[2] = 0  # inverse RMS 1/sqrt(eps): zeros
    x[3, 150] = float("-inf")
    out = norm.rms_norm(x, w, EPS)
    ref = ref_rms_norm(x, w, EPS)
    assert torch.isnan(out[0]).all() and torch.isnan(out[1, 199]) and (out[2] == 0).all()
    check_norm(out, ref, f"non-finite rows {dtype}")
    assert torch.isfinite(out[4]).all()


def test_matches_the_fused_quantization():
    """rms_norm then per-token quantization gives rmsnorm_quant's bytes: the same row, the same helpers."""
    x, w = _inputs((83, 300), torch.bfloat16, seed=15)
    for per_group in (False, True):
        q1, s1 = act_quant.rmsnorm_quant(x, w, EPS, per_group=per_group)
        quant = act_quant.per_group_quant if per_group else act_quant.per_token_quant
        q2, s2 = quant(norm.rms_norm(x, w, EPS))
        assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


def test_the_ulp_check_catches_what_it_should():
    r = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.bfloat16)
    one_up = (r.view(torch.int16) + torch.tensor([1, 0, 0, 0], dtype=torch.int16)).view(torch.bfloat16)
    assert check_ulps(one_up, r, 1) == (1, 0.75)
    neg_zero = r.clone()
    neg_zero[2] = -0.0
    assert check_ulps(neg_zero, r, 0) == (0, 1.0)  # -0.0 vs +0.0 is no ulp
    with pytest.raises(AssertionError, match="2 ulps"):
        check_ulps((one_up.view(torch.int16) + 1).view(torch.bfloat16), r, 1)
    with pytest.raises(AssertionError, match="NaN"):
        check_ulps(poison(r.clone()), r, 1)
    with pytest.raises(AssertionError, match="bit-equal"):
        check_ulps(one_up, r, 1, min_equal=0.9)


def test_empty_inputs():
    w = torch.ones(136, device=_dev())
    assert norm.rms_norm(torch.empty(0, 136, dtype=torch.bfloat16, device=_dev()), w, EPS).shape == (0, 136)
    assert norm.rms_norm(torch.empty(2, 0, 3, 136, device=_dev()), w, EPS).shape == (2, 0, 3, 136)


def test_rejects_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="norm weight"):
        norm.rms_norm(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match="float64"):
        norm.rms_norm(x.double(), torch.ones(8), EPS)
    with pytest.raises(ValueError, match="out must be"):
        norm.rms_norm(x, torch.ones(8), EPS, out=torch.empty(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        norm.rms_norm(x, torch.ones(8), EPS, out=torch.empty(8, 4).t())


@pytest.mark.cuda
@pytest.mark.parametrize("m,k,dtype", [(16384, 1408, torch.bfloat16), (4096, 3840, torch.bfloat16),
                                       (4096, 1408, torch.float16), (4096, 1408, torch.float32)])
def test_real_shapes_cuda(m, k, dtype):
    x, w = _inputs((m, k), dtype, seed=16, w_dtype=torch.bfloat16)
    out = poison(torch.empty_like(x))
    norm.rms_norm(x, w, EPS, out=out)
    check_norm(out, ref_rms_norm(x, w, EPS), f"{m}x{k} {dtype} vs torch on the GPU")
    check_norm(out, ref_rms_norm(x.cpu(), w.cpu(), EPS), f"{m}x{k} {dtype} vs torch on the CPU")
