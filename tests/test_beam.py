"""Beam search: exact against brute force, one context K/V per user, catalogue constraint, metrics."""

import dataclasses
import math

import pytest
import torch

from fp8conv.config import preset
from fp8conv.errors import UserError
from fp8conv.runtime import ops
from fp8conv.runtime.beam import BeamResult, Catalogue, beam_search, ndcg_at_k, recall_at_k
from fp8conv.runtime.inputs import synthetic_contexts
from fp8conv.runtime.model import OneRecModel, random_state

K = 6  # a codebook small enough to enumerate all K^3 triples
CFG = dataclasses.replace(preset("tiny"), codebook_size=K)


class CountingBackend(ops.ReferenceBackend):
    def __init__(self):
        self.cross_calls = []

    def cross_attention(self, q, k, v, ctx_lens):
        self.cross_calls.append((tuple(q.shape), tuple(k.shape)))
        return super().cross_attention(q, k, v, ctx_lens)


@pytest.fixture(scope="module")
def model():
    # sharper logits than the init gives, so that the best triples are well separated
    state = random_state(CFG, seed=11)
    for i in range(3):
        state[f"lm_heads.{i}.proj.weight"] *= 4
    return OneRecModel(CFG, state, backend=CountingBackend())


@pytest.fixture(scope="module")
def ctx():
    return synthetic_contexts(CFG, 4, seed=5, min_len=1, max_len=40)


def _brute_force(model, ctx):
    """Every triple's summed log-probability: (U, K^3), triples in lexicographic order."""
    triples = torch.cartesian_prod(*[torch.arange(K)] * 3)  # (K^3, 3)
    u = ctx.num_users
    items = triples.repeat(u, 1)
    logits = model.forward_levels(ctx, items, torch.arange(u).repeat_interleave(len(triples)))
    logp = torch.log_softmax(logits, -1).gather(2, items[..., None]).squeeze(2).sum(1)
    return triples, logp.view(u, -1)


def test_wide_beam_is_exact(model, ctx):
    triples, logp = _brute_force(model, ctx)
    r = beam_search(model, ctx, beam_width=K * K, top_n=10)
    best = torch.topk(logp, 10, dim=1)
    assert r.items.shape == (4, 10, 3) and r.scores.dtype == torch.float32
    assert torch.equal(r.items, triples[best.indices])
    torch.testing.assert_close(r.scores, best.values, rtol=1e-5, atol=1e-5)
    narrow = beam_search(model, ctx, beam_width=2, top_n=10)  # approximate, never better
    assert (narrow.scores <= r.scores + 1e-5).all()


def test_context_kv_computed_once_per_user(model, ctx):
    model.backend.cross_calls.clear()
    with model.recording() as rec:
        beam_search(model, ctx, beam_width=16, top_n=5)
    assert [t.shape[0] for t in rec["context.kv.0"]] == [4]  # one encode for all steps and beams
    qs = model.backend.cross_calls
    assert len(qs) == 3 * CFG.num_hidden_layers
    # every call: (U, beams x positions, H, D) queries against (U, S, G, D), never a context per beam
    assert all(q[0] == 4 and k[0] == 4 for q, k in qs)
    # one new decoder position per step (self-attention K/V of earlier positions kept per beam)
    assert [q[1] for q, _ in qs[::CFG.num_hidden_layers]] == [1, K, 16]
    assert [x.shape[0] for x in rec["lm_heads.2"]] == [4 * 16]
    assert [x.shape[:2] for x in rec["model.layers.0"]] == [(4, 1), (4 * K, 1), (4 * 16, 1)]


def test_incremental_decode_matches_full_recompute(model, ctx):
    kv = model.encode_context(ctx)
    prefix = torch.randint(0, K, (8, 2), generator=torch.Generator().manual_seed(3))
    users = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    past = None
    for t in range(3):
        step, past = model.decode_step(kv, prefix[:, :t], users, past)
        torch.testing.assert_close(step, model.forward_logits(None, prefix[:, :t], users, kv=kv),
                                   rtol=1e-5, atol=1e-5)
        assert past[0][0].shape == (8, t + 1, CFG.num_key_value_heads, CFG.head_dim)


def test_batch_equals_user_by_user(model, ctx):
    r = beam_search(model, ctx, beam_width=8, top_n=5)
    for u in range(ctx.num_users):
        one = beam_search(model, ctx.select([u]), beam_width=8, top_n=5)
        assert torch.equal(one.items[0], r.items[u])
        torch.testing.assert_close(one.scores[0], r.scores[u], rtol=1e-5, atol=1e-5)


def test_catalogue_constrains_and_pads(model, ctx):
    g = torch.Generator().manual_seed(2)
    cat_items = torch.unique(torch.randint(0, K, (25, 3), generator=g), dim=0)
    cat = Catalogue(cat_items, K)
    r = beam_search(model, ctx, beam_width=4, top_n=10, catalogue=cat)
    found = torch.isfinite(r.scores)  # a narrow beam may find fewer than top_n catalogue items
    assert found[:, 0].all() and cat.contains(r.items)[found].all() and (r.items[~found] == -1).all()
    triples, logp = _brute_force(model, ctx)
    ok = cat.contains(triples)
    wide = beam_search(model, ctx, beam_width=K * K, top_n=10, catalogue=cat_items)  # a tensor works too
    best = torch.topk(logp.masked_fill(~ok, -math.inf), 10, dim=1)
    assert torch.equal(wide.items, triples[best.indices])
    small = beam_search(model, ctx, beam_width=4, top_n=5, catalogue=cat_items[:3])
    assert (small.items[:, 3:] == -1).all() and torch.isinf(small.scores[:, 3:]).all()
    assert cat.contains(small.items[:, :3]).all()


def test_catalogue_validation(model, ctx):
    with pytest.raises(UserError, match="codes"):
        Catalogue(torch.tensor([[0, 1, K]]), K)
    with pytest.raises(UserError, match="int64"):
        Catalogue(torch.zeros(3, 3, dtype=torch.int32), K)
    with pytest.raises(UserError, match="cat.safetensors: items have 2 semantic IDs each, the model 3"):
        beam_search(model, ctx, beam_width=4, top_n=2,  # was an IndexError at the last step
                    catalogue=Catalogue(torch.tensor([[0, 1], [1, 2]]), K, source="cat.safetensors"))


def test_recall_and_ndcg_exact_match():
    items = torch.tensor([[[1, 2, 3], [4, 5, 6]], [[1, 2, 4], [1, 2, 3]], [[0, 0, 0], [9, 9, 9]]])
    labels = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    r = BeamResult(items, torch.zeros(3, 2))
    assert recall_at_k(r, labels, 2) == pytest.approx(2 / 3)
    assert recall_at_k(r, labels, 1) == pytest.approx(1 / 3)  # a 2-ID match is not a hit
    assert ndcg_at_k(r, labels, 2) == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert ndcg_at_k(items, labels, 1) == pytest.approx(1 / 3)
