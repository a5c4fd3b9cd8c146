"""fp8conv inspect: statistics against independent float64/numpy references, FP8 risk flags on planted
outliers, FP8 checkpoints dequantized with their scales, activations through the runtime, the CLI."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8conv import inspect_stats as ins
from fp8conv.cli import main
from fp8conv.config import PRESETS, tensor_specs
from fp8conv.errors import UserError
from fp8conv.synth import write_synthetic_checkpoint

TINY = PRESETS["tiny"]
SHAPES = [(1, 7), (83, 389), (257, 130)]


def _np_ref(w: torch.Tensor) -> tuple[float, float, float]:
    a = w.double().numpy().ravel()
    return a.var(), np.abs(a).max(), np.percentile(np.abs(a), 99, method="inverted_cdf")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_basic_stats_match_numpy(shape, dtype):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = (torch.randn(shape, generator=g) * 0.03).to(dtype)
    s = ins.source_stats("model.layers.0.self_attn.q_proj.weight", w)
    var, amax, p99 = _np_ref(w.float())
    assert s.variance == pytest.approx(var, rel=1e-9)
    assert s.absmax == pytest.approx(amax, rel=1e-7)
    assert s.absp99 == pytest.approx(p99, rel=1e-7)
    assert s.scheme == "channel" and s.finite and s.risks == ()


@pytest.mark.parametrize("n", [1, 99, 100, 101, 200, 1000])
def test_p99_nearest_rank_at_round_sizes(n):
    a = torch.randperm(n, generator=torch.Generator().manual_seed(n)).float() + 1  # values 1..n
    assert ins.abs_p99(a) == float(-(-99 * n // 100))  # the value at rank ceil(0.99 n)
    assert ins.abs_p99(a) == np.percentile(a.numpy(), 99, method="inverted_cdf")


def test_p99_kthvalue_path_agrees(monkeypatch):
    a = torch.randn(10_007, generator=torch.Generator().manual_seed(1)).abs()
    ref = ins.abs_p99(a)
    monkeypatch.setattr(ins, "EXACT_KTH_LIMIT", 10)
    assert ins.abs_p99(a) == ref
    assert ref == pytest.approx(np.percentile(a.numpy(), 99, method="inverted_cdf"))


def _zero_ref(w: torch.Tensor) -> float:
    """Nonzero weights whose |w|/scale rounds to FP8 zero (<= 2^-10), scale = row amax / 448."""
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    r = (w / scale).abs()
    nz = w != 0
    return ((r <= 2.0**-10) & nz).sum().item() / nz.sum().item()


def test_underflow_flagged_for_channel():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(37, 389, generator=g) * 1e-3
    w[:, 5] = 1e3  # an outlier column: every row's scale is set by it, the rest flush to zero
    s = ins.source_stats("model.layers.0.mlp.up_proj.weight", w)
    assert s.zero_frac == pytest.approx(_zero_ref(w), abs=1e-12)
    assert s.zero_frac > 0.5
    assert s.worst_group_small > 0.9
    assert any("flush to zero" in r for r in s.risks) and any("zero/subnormal" in r for r in s.risks)


def test_block_scheme_isolates_an_outlier_block():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=g) * 0.02
    w[3, 7] = 1e4  # only block (0, 0) gets a huge scale
    blk = ins.source_stats("model.layers.1.mlp.experts.3.down_proj.weight", w)
    assert blk.scheme == "block"
    assert blk.worst_group_small > 0.99  # block (0,0) is all zero/subnormal ...
    assert blk.zero_frac < 0.5  # ... but it is one of 6 blocks (an edge block among them)
    assert any("block group" in r for r in blk.risks)
    clean = ins.source_stats("model.layers.1.mlp.experts.3.down_proj.weight", w.clamp(-1, 1))
    assert clean.risks == () and clean.worst_group_small < 0.05


def test_keep_tensors_and_nonfinite():
    w = torch.randn(50, 60)
    s = ins.source_stats("model.embed_tokens.weight", w)
    assert s.scheme == "keep" and s.zero_frac is None and s.sqnr_db is None
    w[3, 4] = float("nan")
    bad = ins.source_stats("model.layers.0.self_attn.o_proj.weight", w)
    assert not bad.finite and "non-finite values" in bad.risks


def _fp8_checkpoint(src, dst):
    """Quantize a synthetic checkpoint with the contract (independently of fp8conv quantize)."""
    from fp8conv import numerics as fp8

    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        scheme = ins.default_scheme(name, tuple(t.shape))
        if scheme == "keep":
            out[name] = t
            continue
        q, s = (fp8.quantize_channel if scheme == "channel" else fp8.quantize_block)(t)
        out[name], out[name + "_scale"] = q, s
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return tensors, out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    src = write_synthetic_checkpoint(root / "src", TINY, seed=11)
    source, quant = _fp8_checkpoint(src, root / "fp8")
    return src, root / "fp8", source, quant


def test_fp8_checkpoint_dequantized_first(ckpts):
    src, dst, source, quant = ckpts
    from fp8conv import numerics as fp8

    stats = {s.name: s for s in ins.iter_checkpoint_stats(dst)}
    assert set(stats) == set(tensor_specs(TINY))  # scales folded into their weights
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.experts.4.up_proj.weight"):
        s = stats[name]
        deq = fp8.dequantize(quant[name], quant[name + "_scale"])
        var, amax, p99 = _np_ref(deq)
        assert s.dtype == "float8_e4m3fn" and s.variance == pytest.approx(var, rel=1e-9)
        assert s.absmax == pytest.approx(amax, rel=1e-7) and s.absp99 == pytest.approx(p99, rel=1e-7)
        assert s.zero_frac == pytest.approx((quant[name].float() == 0).double().mean().item(), rel=1e-12)
    assert stats["model.layers.0.self_attn.q_proj.weight"].scheme == "channel"
    assert stats["model.layers.2.mlp.experts.4.up_proj.weight"].scheme == "block"
    assert stats["model.embed_tokens.weight"].dtype == "bfloat16"


def test_fp8_without_scale_is_an_error(tmp_path, ckpts):
    _, _, _, quant = ckpts
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = {k: v for k, v in quant.items() if k != name + "_scale"}
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=name):
        list(ins.iter_checkpoint_stats(tmp_path))


def test_summary_means(ckpts):
    src = ckpts[0]
    stats = list(ins.iter_checkpoint_stats(src))
    sm = ins.summarize(stats)
    assert sm.tensors == len(tensor_specs(TINY))
    assert sm.mean_variance == pytest.approx(np.mean([s.variance for s in stats]))
    q = [s for s in stats if s.scheme != "keep"]
    assert sm.quantized_tensors == len(q) == 90
    assert sm.quantized_mean_absmax == pytest.approx(np.mean([s.absmax for s in q]))
    # the paper's Figure 1 regime for OneRec-V2 / Qwen3: variance < 0.1, AbsMax around 2
    assert sm.quantized_mean_variance < 0.1 and 0.5 < sm.quantized_mean_absmax < 3 and sm.risky == 0


def test_cli_json_flags_planted_tensor(tmp_path, capsys, ckpts):
    src, _, source, _ = ckpts
    bad = dict(source)
    w = bad["model.layers.1.self_attn.v_proj.weight"].float()
    w[:, 0] = 5e4
    bad["model.layers.1.self_attn.v_proj.weight"] = w.bfloat16()
    bad["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(TINY.kv_size, TINY.hidden_size,
                                                                dtype=torch.bfloat16)  # SQNR inf
    (tmp_path / "ck").mkdir()
    save_file(bad, str(tmp_path / "ck" / "model.safetensors"))
    (tmp_path / "ck" / "config.json").write_text((src / "config.json").read_text())
    assert main(["inspect", str(tmp_path / "ck"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    zero = [t for t in rep["tensors"] if t["name"] == "model.layers.2.self_attn.k_proj.weight"][0]
    assert zero["sqnr_db"] == "inf" and zero["zero_frac"] == 0.0
    assert rep["summary"]["risky"] == 1
    flagged = [t for t in rep["tensors"] if t["risks"]]
    assert [t["name"] for t in flagged] == ["model.layers.1.self_attn.v_proj.weight"]
    assert main(["inspect", str(tmp_path / "ck"), "--top", "3"]) == 0
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.v_proj.weight" in err and "risky tensors: 1" in err


def test_schemes_follow_the_recipe(tmp_path, ckpts, capsys):
    from fp8conv.recipe import load_recipe

    src = ckpts[0]
    rec = ins.recipe_for(src)
    assert rec is not None and rec.name == "onerec_v2"  # chosen by config.json's model_type
    for s in ins.iter_checkpoint_stats(src, rec):
        assert s.scheme == rec.scheme_for(s.name, s.shape), s.name
    # a recipe that leaves the routed experts unclaimed: reported, not refused
    recipe = tmp_path / "partial.toml"
    recipe.write_text(
        "name = 'partial'\ndefault = 'error'\n"
        "[[rules]]\npattern = 're:.*\\.(self_attn|cross_attn|mlp)\\.[a-z]+_proj\\.weight'\nscheme = 'channel'\n"
        "[[rules]]\npattern = 're:(model\\.embed_tokens|context\\..*|lm_heads\\..*|.*\\.gate)\\.weight'\n"
        "scheme = 'keep'\n")
    stats = list(ins.iter_checkpoint_stats(src, load_recipe(str(recipe))))
    unclaimed = [s for s in stats if any("no rule of recipe" in r for r in s.risks)]
    assert unclaimed and all(".mlp.experts." in s.name or "shared_experts" in s.name for s in unclaimed)
    assert main(["inspect", str(src), "--recipe", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == "partial"


def test_cli_bad_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_activations_through_runtime(ckpts, capsys):
    from fp8conv.inspect_activations import activation_stats

    src, dst, _, _ = ckpts
    acts = {a.name: a for a in activation_stats(src, users=3, items_per_user=2)}
    for n in range(TINY.num_hidden_layers):
        for lin in ("self_attn.q_proj", "self_attn.o_proj", "cross_attn.q_proj", "cross_attn.o_proj"):
            a = acts[f"model.layers.{n}.{lin}"]
            assert a.tokens == 3 * 2 * (TINY.num_semantic_levels - 1 + 1) and a.variance > 0
    assert acts["context.proj"].scheme == "keep"
    assert acts["model.layers.0.mlp.down_proj"].scheme == "channel"
    assert any(k.startswith("model.layers.1.mlp.experts.") and v.scheme == "block" for k, v in acts.items())
    fp8_acts = {a.name: a for a in activation_stats(dst, users=3, items_per_user=2)}
    assert fp8_acts["model.layers.0.self_attn.q_proj"].scheme == "channel"
    # the context path has no quantized weight before it: its inputs are the same in both models
    assert fp8_acts["context.proj"].absmax == pytest.approx(acts["context.proj"].absmax, rel=1e-6)
    assert main(["inspect", str(src), "--activations", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["activations"]["summary"]["linears"] > 0


def test_fp8conv_quantize_output_agrees_with_source_prediction(tmp_path, ckpts):
    """inspect on a source checkpoint predicts what quantize does: on quantize's real output the FP8
    figures (read from the stored codes) are the same, tensor by tensor."""
    from fp8conv.quantize import quantize_checkpoint

    src = ckpts[0]
    dst = tmp_path / "q"
    quantize_checkpoint(src, dst, progress=False)
    before = {s.name: s for s in ins.iter_checkpoint_stats(src, ins.recipe_for(src))}
    after = {s.name: s for s in ins.iter_checkpoint_stats(dst, ins.recipe_for(dst))}
    assert set(before) == set(after)
    n_fp8 = 0
    for name, b in before.items():
        a = after[name]
        assert a.scheme == b.scheme, name
        if b.scheme == "keep":
            assert (a.variance, a.absmax, a.absp99) == (b.variance, b.absmax, b.absp99), name
            continue
        n_fp8 += 1
        assert a.dtype == "float8_e4m3fn"
        # synth weights have no exact zeros, so "nonzero weights that flush" == "zero codes"
        assert a.zero_frac == pytest.approx(b.zero_frac, abs=1e-12), name
        assert (a.subnormal_frac, a.worst_group_small) == (b.subnormal_frac, b.worst_group_small), name
        assert a.absmax == pytest.approx(b.absmax, rel=1e-6), name  # amax -> 448 * amax / 448
    assert n_fp8 == 90


def test_worst_group_small_counts_edge_blocks_by_their_real_size():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(130, 200, generator=g) * 0.02  # blocks: rows 128 + 2, cols 128 + 72
    edge = w[128:, 128:]  # the 2 x 72 corner block
    edge[:] = 1e-6  # far below its amax: subnormal or zero ...
    edge[0, :] = 0.05  # ... except its first row, half of it (these set the amax)
    s = ins.source_stats("model.layers.1.mlp.experts.0.up_proj.weight", w)
    assert s.worst_group_small == pytest.approx(72 / 144)  # padding would make it 72 / 16384
    w[128:, 128:] = 0.0  # an all-zero block loses nothing
    assert ins.source_stats("model.layers.1.mlp.experts.0.up_proj.weight", w).worst_group_small < 0.05


@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_scale_underflow_is_flagged(scheme):
    """An F32 row whose amax / 448 underflows to 0 gave NaN SQNR and a negative zero_frac, unflagged."""
    w = torch.randn(130, 140) * 0.05
    w[:128, :128] = 0
    w[1] = 0
    w[1, 2] = 1e-44
    s = ins.source_stats("m.experts.0.up_proj.weight", w, scheme)
    assert any("underflows" in r for r in s.risks)
    assert s.zero_frac is None and s.sqnr_db is None
