"""kernels/backend.py: TritonBackend dispatch (CPU, interpreter) and agreement with ReferenceBackend
on a model-like sequence of operators (CUDA)."""

import gc

import pytest
import torch

from fp8conv import metrics
from fp8conv import numerics as fp8
from fp8conv.kernels import act_quant
from fp8conv.kernels import grouped_gemm as gg
from fp8conv.kernels.backend import TritonBackend
from fp8conv.kernels.fp8_gemm import fp8_gemm_nt
from fp8conv.kernels.testing import TOL, TOL_CHAINED, check
from fp8conv.runtime.ops import Experts, Linear, ReferenceBackend, get_backend


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _lin(n, k, g, scheme="channel", name="w"):
    w = torch.randn(n, k, generator=g) * k ** -0.5
    dev = _dev()
    if scheme == "none":
        return Linear(w.to(torch.bfloat16).to(dev), None, name)
    q, s = fp8.quantize_channel(w) if scheme == "channel" else fp8.quantize_block(w)
    return Linear(q.to(dev), s.to(dev), name)


def _experts(e, i, d, g, quantized=True):
    def one(rows, cols):
        ws = [torch.randn(rows, cols, generator=g) * cols ** -0.5 for _ in range(e)]
        if not quantized:
            return torch.stack(ws).to(torch.bfloat16), None
        qs = [fp8.quantize_block(w) for w in ws]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    (gq, gs), (uq, us), (dq, ds) = one(i, d), one(i, d), one(d, i)
    mv = lambda t: None if t is None else t.to(_dev())  # noqa: E731
    return Experts(mv(gq), mv(uq), mv(dq), mv(gs), mv(us), mv(ds), "moe")


def test_get_backend_triton():
    assert isinstance(get_backend("triton"), TritonBackend)


def test_cpu_without_interpreter_opt_in_uses_reference():
    g = torch.Generator().manual_seed(0)
    be = TritonBackend()
    x = torch.randn(3, 64).to(torch.bfloat16)
    w = Linear(*fp8.quantize_channel(torch.randn(32, 64, generator=g)), "w")
    torch.testing.assert_close(be.linear(x, w), ReferenceBackend().linear(x, w))
    assert be.calls == {"linear.reference": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter dispatch test (CPU)")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dispatch_under_interpreter():
    g = torch.Generator().manual_seed(1)
    be, ref = TritonBackend(allow_interpreter=True), ReferenceBackend()
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16)
    norm_w = 1 + 0.1 * torch.randn(128, generator=g)
    lc, ln, lb = _lin(48, 128, g), _lin(48, 128, g, "none"), _lin(48, 128, g, "block")
    # exactly the kernels' composition ...
    q, s = act_quant.per_token_quant(x)
    torch.testing.assert_close(be.linear(x, lc), fp8_gemm_nt(q, s, lc.weight, lc.scale), rtol=0, atol=0)
    q, s = act_quant.rmsnorm_quant(x, norm_w, 1e-6)
    torch.testing.assert_close(be.norm_linear(x, norm_w, 1e-6, lc), fp8_gemm_nt(q, s, lc.weight, lc.scale),
                               rtol=0, atol=0)
    # ... and near the reference: the interpreter's FP8 cast differs from the hardware's in a few
    # elements (kernels/testing.py), which moves a K=128 dot product by several percent, so the CPU
    # bound is loose; the 1e-3 gate is the CUDA test below
    assert metrics.rel_error(be.linear(x, lc), ref.linear(x, lc)) < 0.15
    torch.testing.assert_close(be.linear(x, ln), ref.linear(x, ln))
    torch.testing.assert_close(be.linear(x, lb), ref.linear(x, lb))
    gate, up, down = _lin(96, 128, g), _lin(96, 128, g), _lin(128, 96, g)
    assert metrics.rel_error(be.swiglu_mlp(x, gate, up, down), ref.swiglu_mlp(x, gate, up, down)) < 0.15
    be.swiglu_mlp(x, gate, up, down)  # second call: the packed gate/up weight comes from the cache
    assert be.calls == {"linear.fp8": 2, "norm_linear.fp8": 1, "linear.reference": 2, "swiglu_mlp.fp8": 2}
    assert len(be._packed) == 1
    # q, k, v from one normalized input: one quantization, one GEMM over the weights side by side, the
    # same numbers as norm_linear per weight (same quantized x, same channels, same K order)
    lk, lv = _lin(16, 128, g), _lin(16, 128, g)
    outs = be.norm_linears(x, norm_w, 1e-6, (lc, lk, lv))
    for o, w in zip(outs, (lc, lk, lv)):
        torch.testing.assert_close(o, be.norm_linear(x, norm_w, 1e-6, w), rtol=0, atol=0)
    refs = ref.norm_linears(x, norm_w, 1e-6, (lc, lk, lv))
    assert [tuple(o.shape) for o in outs] == [tuple(r.shape) for r in refs] == [(5, 48), (5, 16), (5, 16)]
    assert be.calls["norm_linears.fp8"] == 1 and len(be._packed) == 2
    be.norm_linears(x, norm_w, 1e-6, (lc, ln))  # an unquantized weight: per-Linear dispatch
    assert be.calls["norm_linears.split"] == 1
    # a dense layer's MLP with its pre-norm: the norm fused into the quantization of x gives what the
    # Triton rms_norm then swiglu_mlp give (the same helpers, so the same normalized values), and stays
    # near the reference's rms_norm then swiglu_mlp
    norms = be.calls["rms_norm.triton"]
    y = be.norm_swiglu_mlp(x, norm_w, 1e-6, gate, up, down)
    assert be.calls["norm_swiglu_mlp.fp8"] == 1 and be.calls["rms_norm.triton"] == norms  # no separate norm
    torch.testing.assert_close(y, be.swiglu_mlp(be.rms_norm(x, norm_w, 1e-6), gate, up, down), rtol=0, atol=0)
    assert metrics.rel_error(y, ref.norm_swiglu_mlp(x, norm_w, 1e-6, gate, up, down)) < 0.15
    be.norm_swiglu_mlp(x, norm_w, 1e-6, gate, up, _lin(128, 96, g, "none"))
    assert be.calls["swiglu_mlp.split"] == 1  # an unquantized down: rms_norm, then the per-Linear path


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter dispatch test (CPU)")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_experts_dispatch_and_cache_under_interpreter(monkeypatch):
    g = torch.Generator().manual_seed(2)
    be = TritonBackend(allow_interpreter=True)
    x = torch.randn(6, 128, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)
    ex = _experts(4, 128, 128, g)
    out = be.experts(x, ids, w, ex)
    ref = ReferenceBackend().experts(x, ids, w, ex)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert metrics.rel_error(out, ref) < 0.15  # loose on the interpreter, see above
    plain = _experts(4, 128, 128, g, quantized=False)
    torch.testing.assert_close(be.experts(x, ids, w, plain), ReferenceBackend().experts(x, ids, w, plain))
    assert be.calls["experts.fp8"] == 1 and be.calls["experts.reference"] == 1
    assert be.calls["experts.sorted"] == 1  # aligned rows, no Gluon off Hopper: the tl.dot sorted layout
    assert len(be._packed) == 1
    # the packing is kept per layout: one that changes under the same experts (FP8CONV_GLUON toggled,
    # another device) gets its own packing, not the other layout's
    import fp8conv.kernels.backend as backend_mod

    monkeypatch.setattr(backend_mod, "expert_layout", lambda d, i, device=None: "gather")
    torch.testing.assert_close(be.experts(x, ids, w, ex), out, rtol=0.02, atol=0.02)
    assert be.calls["experts.gather"] == 1 and len(be._packed) == 2
    del ex
    gc.collect()
    assert len(be._packed) == 0  # the packed copies die with the Experts object
    assert all(src == "default" or isinstance(src, str) for src in be.config_sources.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter dispatch test (CPU)")
def test_rms_norm_dispatch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 136, generator=g).to(torch.bfloat16)
    w = 1 + 0.1 * torch.randn(136, generator=g)
    be = TritonBackend(allow_interpreter=True)
    torch.testing.assert_close(be.rms_norm(x, w, 1e-6), ReferenceBackend().rms_norm(x, w, 1e-6))
    be.rms_norm(x.double(), w, 1e-6)  # a dtype the kernel does not take
    assert be.calls == {"rms_norm.triton": 1, "rms_norm.reference": 1}
    cpu = TritonBackend()  # no interpreter opt-in: the reference
    cpu.rms_norm(x, w, 1e-6)
    assert cpu.calls == {"rms_norm.reference": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter dispatch test (CPU)")
def test_model_forward_norms_run_the_kernel():
    """Every RMSNorm of a model forward (context key/value norms, post-attention norms, final norm,
    the unquantized heads' and projections' norm_linear) goes through the Triton rms_norm; with
    unquantized weights nothing else differs from the reference backend."""
    from fp8conv.config import preset
    from fp8conv.runtime.inputs import synthetic_contexts
    from fp8conv.runtime.model import OneRecModel, random_state

    cfg = preset("tiny")
    g = torch.Generator().manual_seed(5)
    state = random_state(cfg, seed=5)
    for name, t in state.items():  # the init's norms are all ones
        if "norm" in name:
            state[name] = 1 + 0.2 * torch.randn(t.shape, generator=g)
    be = TritonBackend(allow_interpreter=True)
    fast = OneRecModel(cfg, state, dtype=torch.bfloat16, backend=be)
    ref = OneRecModel(cfg, state, dtype=torch.bfloat16, backend=ReferenceBackend())
    ctx = synthetic_contexts(cfg, 3, seed=5, max_len=12)
    items = torch.randint(0, cfg.codebook_size, (3, 3), generator=g)
    a = fast.forward_levels(ctx, items, torch.arange(3))
    b = ref.forward_levels(ctx, items, torch.arange(3))
    assert "rms_norm.reference" not in be.calls
    # context: its projection's norm and one per key/value chunk; per layer: cross-attention, self-attention
    # and post-attention norms; per level: the final norm and the head's
    norms = 1 + cfg.num_kv_sets * cfg.kv_split + 3 * cfg.num_hidden_layers + 2 * cfg.num_semantic_levels
    assert be.calls["rms_norm.triton"] == norms
    assert metrics.cosine(a, b) > 0.9999 and metrics.rel_error(a, b) < 1e-2


def _pair_lin(n, k, g):
    """The same weight as an FP8 channel Linear and as a bf16 Linear."""
    w = torch.randn(n, k, generator=g) * k ** -0.5
    q, s = fp8.quantize_channel(w)
    return Linear(q.cuda(), s.cuda(), "w"), Linear(w.to(torch.bfloat16).cuda(), None, "w")


def _pair_experts(e, i, d, g):
    def one(rows, cols):
        ws = [torch.randn(rows, cols, generator=g) * cols ** -0.5 for _ in range(e)]
        qs = [fp8.quantize_block(w) for w in ws]
        return (torch.stack(ws).to(torch.bfloat16).cuda(), torch.stack([q for q, _ in qs]).cuda(),
                torch.stack([s for _, s in qs]).cuda())

    (gb, gq, gs), (ub, uq, us), (db, dq, ds) = one(i, d), one(i, d), one(d, i)
    return Experts(gq, uq, dq, gs, us, ds, "moe"), Experts(gb, ub, db, name="moe")


@pytest.mark.cuda
def test_model_like_sequence_cuda():
    """One pre-norm block at the 4b preset's widths: attention projections, dense SwiGLU, MoE."""
    g = torch.Generator().manual_seed(3)
    d, inter, e, k, t = 1408, 3840, 53, 3, 300
    be, ref = TritonBackend(), ReferenceBackend()
    norm_w = (1 + 0.1 * torch.randn(d, generator=g)).cuda()
    (q, qb), (o, ob) = _pair_lin(d, d, g), _pair_lin(d, d, g)
    (gate, gb), (up, ub), (down, db) = _pair_lin(inter, d, g), _pair_lin(inter, d, g), _pair_lin(d, inter, g)
    ex, exb = _pair_experts(e, d, d, g)
    h = torch.randn(t, d, generator=g).cuda().to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).cuda()
    w = torch.rand(t, k, generator=g).cuda()

    def block(b, q, o, gate, up, down, ex):
        y = h + b.linear(b.norm_linear(h, norm_w, 1e-6, q), o)
        y = y + b.norm_swiglu_mlp(y, norm_w, 1e-6, gate, up, down)
        return y + b.experts(b.rms_norm(y, norm_w, 1e-6), ids, w, ex)

    # each op on the same input: the kernel gate where the op quantizes its input once (norm_linear,
    # linear); the chained gate where it quantizes a GEMM's output again (kernels/testing.py says why)
    for i, (name, fn, tol) in enumerate([
            ("norm_linear", lambda b: b.norm_linear(h, norm_w, 1e-6, q), TOL),
            ("norm_linears", lambda b: torch.cat(b.norm_linears(h, norm_w, 1e-6, (q, o)), dim=-1), TOL),
            ("linear", lambda b: b.linear(h, o), TOL),
            ("swiglu_mlp", lambda b: b.swiglu_mlp(h, gate, up, down), TOL_CHAINED),
            ("norm_swiglu_mlp", lambda b: b.norm_swiglu_mlp(h, norm_w, 1e-6, gate, up, down), TOL_CHAINED),
            ("experts", lambda b: b.experts(h, ids, w, ex), TOL_CHAINED)]):
        check(fn(be), fn(ref), tol=tol, what=name)
    # the whole block re-quantizes five times: the fast path must stay well inside FP8's own error,
    # i.e. closer to the FP8 reference than that reference is to the bf16 model
    y_fast = block(be, q, o, gate, up, down, ex)
    y_ref = block(ref, q, o, gate, up, down, ex)
    y_bf16 = block(ref, qb, ob, gb, ub, db, exb)
    fp8_err = metrics.mean_rel_error(y_ref, y_bf16)
    check(y_fast, y_ref, tol=0.6 * fp8_err, what=f"chained block (FP8 reference vs bf16: {fp8_err:.2e})")
    assert be.calls["experts.fp8"] == 2 and be.calls["swiglu_mlp.fp8"] == 1 and be.calls["norm_swiglu_mlp.fp8"] == 2
    # aligned rows: both GEMMs in Gluon on Hopper with Triton 3.6, else the tl.dot sorted layout
    assert be.calls[f"experts.{'gluon' if gg.gluon_ok(h.device) else 'sorted'}"] == 2


# -- top-k: configs from the tuning cache, as the GEMMs' ---------------------------------------------------

def _topk_cache(root, device, c, k, cfg, m=32):
    """A tuning-cache file holding ``cfg`` for top-k over rows of c, keeping k, at m rows."""
    from fp8conv.tuning import cache, lookup

    e = cache.Entry(cfg, m, lookup.triton_version(), "2.11.0", "2026-11-24", 10.0, 12.0, "torch.topk", 40.0,
                    {"metric": "exact", "value": 0.0, "tolerance": 1e-3, "passed": True})
    cache.write(root, cache.CacheFile(device, "topk", c, k, {m: e}))


TOPK_TUNED = {"BLOCK_N": 16384, "BLOCK_K": 1024, "num_warps": 4, "BLOCK_M": 1, "GROUP_M": 1, "num_stages": 1}


@pytest.mark.usefixtures("isolated_tuning_cache")
def test_topk_launches_with_the_tuned_config(tmp_path, monkeypatch):
    """TritonBackend.topk looks its config up by (rows, C, k), records the source, and passes it on."""
    from fp8conv.kernels import backend as be_mod
    from fp8conv.kernels.config import KernelConfig, default_config
    from fp8conv.tuning import cache, lookup

    dev = "NVIDIA H100 80GB HBM3"
    tuned = KernelConfig(**TOPK_TUNED)
    _topk_cache(tmp_path, dev, 8192, 512, tuned)
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(lookup, "current_device", lambda: dev)
    seen = []
    monkeypatch.setattr(be_mod, "radix_topk", lambda s, k, config=None: seen.append((k, config)) or "out")

    class Scores:  # what TritonBackend.topk reads of a CUDA tensor (the kernel itself is replaced)
        is_cuda = True

        def __init__(self, r, c):
            self.shape = (r, c)

        def dim(self):
            return 2

        def stride(self, d):
            return 1

    be = TritonBackend()
    assert be.topk(Scores(20, 8192), 512) == "out"  # 20 rows: bucket 32, exact
    assert seen == [(512, tuned)] and be.config_sources[("topk", 20, 8192, 512, None)] == "tuned"
    with pytest.warns(lookup.TuningFallbackWarning, match="documented default"):
        be.topk(Scores(20, 8192), 10)  # another k: no entry
    assert seen[-1] == (10, default_config("topk", 20, 8192, 10))
    assert be.config_sources[("topk", 20, 8192, 10, None)] == "default"
    assert be.calls["topk.triton"] == 2


@pytest.mark.cuda
@pytest.mark.usefixtures("isolated_tuning_cache")
def test_topk_with_a_tuned_config_cuda(tmp_path, monkeypatch):
    from fp8conv.kernels.config import KernelConfig
    from fp8conv.tuning import cache

    _topk_cache(tmp_path, torch.cuda.get_device_name(), 8192, 512, KernelConfig(**TOPK_TUNED))
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(32, 8192, device="cuda", generator=g).log_softmax(-1)
    be = TritonBackend()
    v, i = be.topk(scores, 512)
    assert be.config_sources[("topk", 32, 8192, 512, None)] == "tuned"
    assert torch.equal(v, torch.topk(scores, 512).values) and torch.equal(scores.gather(1, i), v)
