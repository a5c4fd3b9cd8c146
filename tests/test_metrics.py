"""fp8conv.metrics on edge cases: exact, orthogonal, non-finite."""

import math

import torch

from fp8conv import metrics


def test_exact_and_known_values():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(7, 83, generator=g)
    assert metrics.sqnr_db(r, r) == math.inf and metrics.rel_error(r, r) == 0.0
    noisy = r + 0.1 * torch.randn(7, 83, generator=g)
    sq = metrics.sqnr_db(noisy, r)
    rel = metrics.rel_error(noisy, r)
    assert abs(sq - (-20 * math.log10(rel))) < 1e-9  # SQNR = -20 log10(rel error)
    assert 0 < metrics.gemm_diff(noisy, r) < 0.01
    assert abs(metrics.cosine(2 * r, r) - 1.0) < 1e-12


def test_non_finite_outputs_never_look_good():
    r = torch.randn(5, 9)
    bad = r.clone()
    bad[0, 0] = math.inf
    assert metrics.sqnr_db(bad, r) == -math.inf
    bad[0, 0] = math.nan
    assert math.isnan(metrics.sqnr_db(bad, r))
    assert math.isnan(metrics.mean_rel_error(bad, r))
