"""kernels/act_quant.py against fp8conv.numerics (CPU: Triton interpreter, tiny shapes)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fp8conv import numerics as fp8
from fp8conv.kernels import act_quant
from fp8conv.kernels.testing import check_quant, poison
from fp8conv.runtime.ops import rms_norm

SHAPES = [(1, 128), (7, 200), (83, 300)]  # M = 1, 7, 83; K a multiple of 128 and not
DTYPES = [torch.bfloat16, torch.float16]


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape,dtype,per_group", list(itertools.product(SHAPES, DTYPES, [False, True])))
def test_plain_quant(shape, dtype, per_group):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1] + 7 * per_group + (dtype == torch.float16))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(_dev())
    fn = act_quant.per_group_quant if per_group else act_quant.per_token_quant
    m, k = shape
    ns = -(-k // 128) if per_group else 1
    q = poison(torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device))
    s = poison(torch.empty(m, ns, dtype=torch.float32, device=x.device))
    fn(x, out=(q, s))
    check_quant(q.cpu(), s.cpu(), x.cpu(), per_group, f"quant {shape}")
    # the plain quantization is bit-exact to fp8conv.numerics (also under the interpreter: the kernel
    # rounds to FP8 values itself, see act_quant.round_to_e4m3)
    rq, rs = (fp8.quantize_per_group if per_group else fp8.quantize_per_token)(x.cpu())
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)


@pytest.mark.parametrize("shape,per_group", list(itertools.product(SHAPES, [False, True])))
def test_rmsnorm_quant(shape, per_group):
    g = torch.Generator().manual_seed(1 + shape[0])
    x = torch.randn(*shape, generator=g).to(torch.bfloat16).to(_dev())
    w = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(_dev())
    q, s = act_quant.rmsnorm_quant(x, w, 1e-6, per_group=per_group)
    check_quant(q.cpu(), s.cpu(), rms_norm(x.cpu(), w.cpu(), 1e-6), per_group, f"rmsnorm+quant {shape}")


@pytest.mark.parametrize("shape,per_group", list(itertools.product(SHAPES, [False, True])))
def test_swiglu_quant_on_views(shape, per_group):
    m, i = shape
    g = torch.Generator().manual_seed(2 + m)
    gu = (torch.randn(m, 2 * i, generator=g) * 2).to(torch.bfloat16).to(_dev())  # one GEMM output
    q, s = act_quant.swiglu_quant(gu[:, :i], gu[:, i:], per_group=per_group)
    gc = gu.cpu().float()
    ref = (F.silu(gc[:, :i]) * gc[:, i:]).to(torch.bfloat16)
    check_quant(q.cpu(), s.cpu(), ref, per_group, f"swiglu+quant {shape}")


def test_zero_row_gets_scale_one_and_nan_is_caught():
    x = torch.randn(3, 130).to(torch.bfloat16).to(_dev())
    x[1] = 0
    q, s = act_quant.per_token_quant(x)
    assert s[1].item() == 1.0 and (q[1].float() == 0).all()
    bad = q.clone()
    poison(bad)
    with pytest.raises(AssertionError):
        check_quant(bad.cpu(), s.cpu(), x.cpu(), False, "poisoned")


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        act_quant.per_token_quant(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="norm weight"):
        act_quant.rmsnorm_quant(torch.randn(2, 8), torch.randn(7), 1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("m,k", list(itertools.product([1, 83, 4096], [1408, 3840])))
def test_real_shapes_cuda(m, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, device="cuda")
    for per_group in (False, True):
        q, s = act_quant.rmsnorm_quant(x, w, 1e-6, per_group=per_group)
        check_quant(q.cpu(), s.cpu(), rms_norm(x, w, 1e-6).cpu(), per_group, f"rmsnorm {m}x{k}")
        q, s = act_quant.swiglu_quant(x, x.flip(1).contiguous(), per_group=per_group)
        ref = (F.silu(x.float()) * x.flip(1).float()).to(torch.bfloat16)
        check_quant(q.cpu(), s.cpu(), ref.cpu(), per_group, f"swiglu {m}x{k}")


@pytest.mark.cuda
@pytest.mark.parametrize("per_group", [False, True])
def test_non_finite_input_never_quantizes_finite_cuda(per_group):
    """Outside the contract, but never silent: an inf or NaN activation must not come out as a finite
    FP8 value (the GPU path casts the quotient unclamped; the clamp it replaced turned NaN into -448).
    The other rows and groups keep the reference's bits."""
    x = torch.randn(4, 384, device="cuda", dtype=torch.bfloat16)
    x[1, 5], x[1, 300], x[2, 7] = float("inf"), -float("inf"), float("nan")
    quant = act_quant.per_group_quant if per_group else act_quant.per_token_quant
    q, _ = quant(x)
    qf = q.float().cpu()
    for r, c in ((1, 5), (1, 300), (2, 7)):
        assert torch.isnan(qf[r, c]), f"x[{r}, {c}] = {x[r, c].item()} quantized to {qf[r, c].item()}"
    ref = (fp8.quantize_per_group if per_group else fp8.quantize_per_token)(x[[0, 3]].cpu())[0]
    assert torch.equal(q[[0, 3]].cpu().view(torch.uint8), ref.view(torch.uint8))


def _pairs_rows(dtype, amax_exps=(0,), lowest=-19):
    """Groups of 128: [amax, x_1 .. x_127] with amax = every significand of ``dtype`` at each exponent of
    ``amax_exps`` and the x every value of ``dtype`` (both signs, and -0.0) in [amax * 2^lowest, amax]:
    the (value, scale) pairs whose FP8 quotient the kernels' division must get right."""
    bits = torch.arange(0, 0x7F80 if dtype == torch.bfloat16 else 0x7C00, dtype=torch.int32)
    allv = bits.to(torch.int16).view(dtype).float()
    nsig = 128 if dtype == torch.bfloat16 else 1024
    groups = []
    for e in amax_exps:
        sig = allv[(allv >= 2.0 ** e) & (allv < 2.0 ** (e + 1))][:nsig]
        for a in sig[:: max(1, nsig // 128)]:
            xs = allv[(allv <= a) & (allv >= a * 2.0 ** lowest)]
            xs = torch.cat([xs, -xs, torch.tensor([-0.0, 0.0])])
            xs = xs.repeat(-(-127 // len(xs)))  # at least one full group
            xs = torch.cat([xs, xs[:(-len(xs)) % 127]]).view(-1, 127)
            groups.append(torch.cat([torch.full((xs.shape[0], 1), float(a)), xs], dim=1))
    return torch.cat(groups).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amax_exps", [(0,), (-95, -100)], ids=["normal", "tiny-scales"])
def test_division_is_exact_on_every_value_pair(dtype, amax_exps):
    """quantize_values' reciprocal + FMA correction gives the IEEE quotient's FP8 value for every value
    below each amax (all significands of amax; tiny amax gives scales below 2^-100, which take the
    2^64 pre-scaling), -0.0 included. The full exhaustive check over every bf16/fp16 pair, float32
    subnormal values and scales included (the interpreter mishandles those), is
    benchmarks/check_quant_exhaustive.py on the GPU."""
    if dtype == torch.float16 and amax_exps != (0,):
        amax_exps = (-14, -20)  # fp16's smallest normal / subnormal binades
    x = _pairs_rows(dtype, amax_exps).to(_dev())
    q, s = act_quant.per_group_quant(x)
    rq, rs = fp8.quantize_per_group(x.cpu())
    assert torch.equal(s.cpu(), rs)
    diff = (q.cpu().view(torch.uint8) != rq.view(torch.uint8)).sum().item()
    assert diff == 0, f"{diff} of {q.numel()} FP8 values differ from the IEEE division's"
