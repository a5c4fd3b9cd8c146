"""The reference runtime: checkpoint loading and its errors, determinism, padding, grouping, MoE math,
FP8 checkpoints (quantized here with fp8conv.numerics, independent of the quantizer)."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from fp8conv import numerics as fp8
from fp8conv.config import preset
from fp8conv.errors import UserError
from fp8conv.metrics import cosine
from fp8conv.runtime.inputs import ContextBatch, load_contexts, save_contexts, synthetic_contexts
from fp8conv.runtime.loader import write_checkpoint
from fp8conv.runtime.model import OneRecModel, load_model, random_state

CFG = dataclasses.replace(preset("tiny"), torch_dtype="float16")


@pytest.fixture(scope="module")
def state():
    return random_state(CFG, seed=3)


@pytest.fixture(scope="module")
def model(state):
    return OneRecModel(CFG, state, dtype=torch.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, state):
    d = tmp_path_factory.mktemp("ckpt") / "fp16"
    return write_checkpoint(d, CFG, {k: v.half() for k, v in state.items()})


def _ctx(n=5, seed=0, min_len=2, max_len=30):
    return synthetic_contexts(CFG, n, seed=seed, min_len=min_len, max_len=max_len)


def _items(n, seed=0):
    return torch.randint(0, CFG.codebook_size, (n, 3), generator=torch.Generator().manual_seed(seed))


# -- loading --------------------------------------------------------------------------------------
def test_load_fp16_checkpoint(ckpt, state):
    m = load_model(ckpt, dtype="float32")
    assert m.dtype == torch.float32 and not m.quantized
    assert load_model(ckpt).dtype == torch.float16  # config torch_dtype by default
    lin = m.linears()["model.layers.0.self_attn.q_proj"]
    assert torch.equal(lin.weight, state["model.layers.0.self_attn.q_proj.weight"].half().float())
    ex = m.experts()["model.layers.1.mlp.experts"]
    assert ex.gate.shape == (CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.hidden_size)
    assert torch.equal(ex.down[2], state["model.layers.1.mlp.experts.2.down_proj.weight"].half().float())


def _rewrite(tmp_path, state, **changes):
    tensors = {k: v.half() for k, v in state.items()}
    for k, v in changes.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    return write_checkpoint(tmp_path / "bad", CFG, tensors)


@pytest.mark.parametrize("name", ["model.layers.2.mlp.experts.4.up_proj.weight", "lm_heads.1.proj.weight"])
def test_missing_tensor_is_named(tmp_path, state, name):
    d = _rewrite(tmp_path, state, **{name: None})
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_model(d)


def test_wrong_shape_is_named(tmp_path, state):
    name = "model.layers.0.cross_attn.q_proj.weight"
    d = _rewrite(tmp_path, state, **{name: torch.zeros(CFG.q_size, CFG.hidden_size + 1, dtype=torch.half)})
    with pytest.raises(UserError, match=rf"model\.safetensors.*{name}.*\[128, 129\]"):
        load_model(d)


def test_unexpected_and_bad_fp8_tensors(tmp_path, state):
    d = _rewrite(tmp_path, state, **{"model.layers.0.mlp.gate_proj.input_scale": torch.ones(1)})
    with pytest.raises(UserError, match="unexpected.*input_scale"):
        load_model(d)
    name = "model.layers.0.mlp.up_proj.weight"
    q, _ = fp8.quantize_channel(state[name])
    d = write_checkpoint(tmp_path / "noscale", CFG, {**{k: v.half() for k, v in state.items()}, name: q})
    with pytest.raises(UserError, match=f"{name}_scale' is missing"):
        load_model(d)
    d = write_checkpoint(tmp_path / "badscale", CFG, {**{k: v.half() for k, v in state.items()}, name: q,
                                                      name + "_scale": torch.ones(5, 1)})
    with pytest.raises(UserError, match=f"{name}_scale.*shape"):
        load_model(d)


def test_sharded_checkpoint_and_broken_index(tmp_path, state, ckpt):
    from safetensors.torch import save_file

    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    names = sorted(state)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, part in halves.items():
        save_file({k: state[k].half() for k in part}, str(d / fname))
    index = {"weight_map": {k: f for f, part in halves.items() for k in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    ref = load_model(ckpt, dtype="float32")
    got = load_model(d, dtype="float32")
    ctx = _ctx()
    assert torch.equal(ref.forward_levels(ctx, _items(5), torch.arange(5)),
                       got.forward_levels(ctx, _items(5), torch.arange(5)))
    for bad in ([], {names[0]: 5}):  # a list, a file "name" that is a number: were tracebacks
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
        with pytest.raises(UserError, match="index.json.*weight_map"):
            load_model(d)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "b.safetensors").unlink()
    with pytest.raises(UserError, match=r"b\.safetensors, which does not exist"):
        load_model(d)


def test_contexts_file_roundtrip_and_errors(tmp_path):
    ctx = _ctx()
    ctx = ContextBatch(ctx.tokens, ctx.pathways, ctx.lengths, _items(5))
    save_contexts(ctx, tmp_path / "c.safetensors")
    back = load_contexts(tmp_path / "c.safetensors", CFG)
    assert all(torch.equal(a, b) for a, b in zip(ctx.to_dict().values(), back.to_dict().values()))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="bad.safetensors"):
        load_contexts(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="lengths"):
        ContextBatch(ctx.tokens, ctx.pathways, ctx.lengths + 100)
    big = ContextBatch(ctx.tokens + CFG.context_vocab_size, ctx.pathways, ctx.lengths)
    with pytest.raises(UserError, match="token ids"):
        big.check_config(CFG)


# -- forward ----------------------------------------------------------------------------------
def test_forward_deterministic_and_causal(model):
    ctx, items = _ctx(), _items(5)
    a = model.forward_levels(ctx, items, torch.arange(5))
    b = model.forward_levels(ctx, items, torch.arange(5))
    assert a.shape == (5, 3, CFG.codebook_size) and a.dtype == torch.float32 and torch.equal(a, b)
    for t in range(3):  # the step function sees only the prefix: same logits as teacher forcing
        step = model.forward_logits(ctx, items[:, :t], torch.arange(5))
        torch.testing.assert_close(step, a[:, t], rtol=1e-5, atol=1e-5)


def test_padding_never_leaks(model):
    ctx, items = _ctx(6, seed=1, min_len=1, max_len=40), _items(6, 1)
    batched = model.forward_levels(ctx, items, torch.arange(6))
    for u in range(6):
        one = model.forward_levels(ctx.select([u]), items[u:u + 1], torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(one[0], batched[u], rtol=1e-5, atol=1e-5)
    pad = torch.arange(ctx.max_len)[None] >= ctx.lengths[:, None]
    noisy = ContextBatch(ctx.tokens.masked_fill(pad, 7), ctx.pathways.masked_fill(pad, 2), ctx.lengths)
    assert torch.equal(model.forward_levels(noisy, items, torch.arange(6)), batched)


def test_uneven_user_rows_match_row_by_row(model):
    ctx = _ctx(4, seed=2)
    user_index = torch.tensor([2, 0, 2, 3, 2, 0])  # unsorted, uneven, user 1 absent
    prefix = _items(6, 2)[:, :2]
    got = model.forward_logits(ctx, prefix, user_index)
    kv = model.encode_context(ctx)
    for r in range(6):
        one = model.forward_logits(None, prefix[r:r + 1], user_index[r:r + 1], kv=kv)
        torch.testing.assert_close(got[r], one[0], rtol=1e-5, atol=1e-5)


def test_moe_matches_independent_implementation(model, state):
    layer = 2
    p = f"model.layers.{layer}.mlp"
    x = torch.randn(9, CFG.hidden_size, generator=torch.Generator().manual_seed(5))
    got = model._moe(x[None], model.layers[layer].mlp, layer)[0]
    bias = torch.randn(CFG.n_routed_experts, generator=torch.Generator().manual_seed(6)) * 0.1
    m2 = OneRecModel(CFG, {**state, f"{p}.gate.e_score_correction_bias": bias})
    got_b = m2._moe(x[None], m2.layers[layer].mlp, layer)[0]

    def mlp(v, pre):
        return (F.silu(v @ state[f"{pre}.gate_proj.weight"].t()) * (v @ state[f"{pre}.up_proj.weight"].t())) \
            @ state[f"{pre}.down_proj.weight"].t()

    for b, out in ((torch.zeros(CFG.n_routed_experts), got), (bias, got_b)):
        for t in range(9):  # token by token, DeepSeek-V3's formula written out
            s = torch.sigmoid(state[f"{p}.gate.weight"] @ x[t])
            chosen = sorted(range(CFG.n_routed_experts), key=lambda e: -(s[e] + b[e]).item())[:2]
            w = s[chosen] / s[chosen].sum() * CFG.routed_scaling_factor
            ref = sum(w[j] * mlp(x[t], f"{p}.experts.{e}") for j, e in enumerate(chosen))
            ref = ref + mlp(x[t], f"{p}.shared_experts")
            torch.testing.assert_close(out[t], ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, got_b)  # the bias changes the choice, not only the weights


def test_recording_names_follow_checkpoint_prefixes(model):
    ctx = _ctx(3)
    with model.recording() as rec:
        model.forward_levels(ctx, _items(3), torch.arange(3))
    assert {f"model.layers.{n}" for n in range(CFG.num_hidden_layers)} <= rec.keys()
    assert {f"context.kv.{j}" for j in range(4)} | {"lm_heads.0", "lm_heads.2"} <= rec.keys()
    assert rec["model.layers.1"][0].shape == (3, 3, CFG.hidden_size)
    with model.recording():
        pass
    assert model._rec is None


def test_bf16_activations_run_and_agree(ckpt):
    ref = load_model(ckpt, dtype="float32")
    bf = load_model(ckpt, dtype="bf16")
    ctx, items = _ctx(), _items(5)
    out = bf.forward_levels(ctx, items, torch.arange(5))
    assert cosine(out, ref.forward_levels(ctx, items, torch.arange(5))) > 0.995  # bf16 keeps 8 mantissa bits


# -- FP8 ----------------------------------------------------------------------------------------
def _fp8_state(state):
    out = {}
    for name, w in state.items():
        if ".experts." in name:
            out[name], out[name + "_scale"] = fp8.quantize_block(w)
        elif name.endswith(("_proj.weight",)) and name.startswith("model.layers."):
            out[name], out[name + "_scale"] = fp8.quantize_channel(w)
        else:
            out[name] = w.half()
    return out


def test_fp8_checkpoint_close_to_fp16(tmp_path, state, ckpt):
    qcfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}
    d = write_checkpoint(tmp_path / "fp8", CFG, _fp8_state(state), config_extra=qcfg)
    q = load_model(d, dtype="float32")
    ref = load_model(ckpt, dtype="float32")
    assert q.quantized
    assert q.linears()["model.layers.0.self_attn.o_proj"].scheme == "channel"
    assert q.linears()["lm_heads.0.proj"].scheme == "none"
    e = q.experts()["model.layers.3.mlp.experts"]
    assert e.gate.dtype == torch.float8_e4m3fn and e.gate_scale.shape == (CFG.n_routed_experts, 2, 1)
    assert e.down_scale.shape == (CFG.n_routed_experts, 1, 2)
    ctx, items = _ctx(8, seed=4), _items(8, 4)
    a = q.forward_levels(ctx, items, torch.arange(8))
    b = ref.forward_levels(ctx, items, torch.arange(8))
    assert not torch.equal(a, b)
    assert cosine(a, b) > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    sd = q.state_dict()  # round trip keeps the FP8 bytes and scales
    assert sd["model.layers.3.mlp.experts.5.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.3.mlp.experts.5.down_proj.weight_scale" in sd
