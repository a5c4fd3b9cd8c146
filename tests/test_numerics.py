"""fp8conv.numerics against an independent, element-by-element reference of DESIGN's contract."""

import itertools
import math

import pytest
import torch

from fp8conv import numerics as fp8

SHAPES = [(1, 1), (7, 83), (128, 128), (129, 257), (300, 130)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ref_quant(x: torch.Tensor, row_slices, col_slices):
    """Slow reference: loop over blocks; float32 amax/448, all-zero -> 1, clamp, RNE cast."""
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(len(row_slices), len(col_slices), dtype=torch.float32)
    for i, rs in enumerate(row_slices):
        for j, cs in enumerate(col_slices):
            blk = x[rs, cs].float()
            amax = blk.abs().max()
            s = torch.tensor(1.0) if amax.item() == 0 else amax / torch.tensor(448.0)
            scales[i, j] = s
            q[rs, cs] = torch.clamp(blk / s, -448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scales


def _slices(n, b):
    return [slice(i, min(i + b, n)) for i in range(0, n, b)]


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.05
    x[..., 0] *= 40  # an outlier per row
    return x.to(dtype)


@pytest.mark.parametrize("shape,dtype", list(itertools.product(SHAPES, DTYPES)))
def test_channel_bit_exact(shape, dtype):
    x = _rand(shape, dtype, 1)
    q, s = fp8.quantize_channel(x)
    rq, rs = _ref_quant(x, [slice(i, i + 1) for i in range(shape[0])], [slice(0, shape[1])])
    assert s.shape == (shape[0], 1) and s.dtype == torch.float32
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("shape,dtype", list(itertools.product(SHAPES, DTYPES)))
def test_block_bit_exact(shape, dtype):
    x = _rand(shape, dtype, 2)
    q, s = fp8.quantize_block(x)
    rq, rs = _ref_quant(x, _slices(shape[0], 128), _slices(shape[1], 128))
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_group_bit_exact():
    x = _rand((9, 300), torch.bfloat16, 3)
    q, s = fp8.quantize_per_group(x)
    rq, rs = _ref_quant(x, [slice(i, i + 1) for i in range(9)], _slices(300, 128))
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_zero_row_and_block_get_scale_one():
    x = _rand((130, 260), torch.float32, 4)
    x[5] = 0
    x[:128, 128:256] = 0
    _, s = fp8.quantize_channel(x)
    assert s[5].item() == 1.0
    _, sb = fp8.quantize_block(x)
    assert sb[0, 1].item() == 1.0


def test_clamp_before_cast_never_nan():
    # amax/448 then x/scale can round above 448; without the clamp torch casts >= 480 to NaN.
    x = torch.tensor([[448.0, -448.0, 1e-3, 447.9]], dtype=torch.float32)
    q, s = fp8.quantize_channel(x)
    assert not torch.isnan(q.float()).any()
    assert q.float().abs().max().item() == 448.0


def test_dequantize_roundtrip_error_small():
    x = _rand((257, 385), torch.bfloat16, 5)
    for fn in (fp8.quantize_channel, fp8.quantize_block):
        q, s = fn(x)
        err = (fp8.dequantize(q, s) - x.float()).norm() / x.float().norm()
        assert err < 0.05
