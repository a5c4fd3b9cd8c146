"""OneRecConfig: validation with errors naming config.json, presets against DESIGN's numbers, the
tensor spec's invariants."""

import json
import math

import pytest

from fp8conv.config import (PRESETS, OneRecConfig, count_params, load_config, preset, tensor_specs)
from fp8conv.errors import UserError

TINY = PRESETS["tiny"]


def _write(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def test_roundtrip_every_preset(tmp_path):
    for name, cfg in PRESETS.items():
        d = cfg.to_dict()
        assert d["model_type"] == "onerec_v2"
        folder = tmp_path / name
        folder.mkdir()
        assert load_config(_write(folder, d)) == cfg


def test_unknown_keys_are_kept(tmp_path):
    d = {**TINY.to_dict(), "quantization_config": {"quant_method": "compressed-tensors"}}
    cfg = load_config(_write(tmp_path, d))
    assert cfg.extra["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg.to_dict()["quantization_config"] == d["quantization_config"]


@pytest.mark.parametrize("key", ["hidden_size", "num_kv_sets", "kv_split", "codebook_size",
                                 "first_k_dense_replace", "n_routed_experts"])
def test_missing_key_is_named(tmp_path, key):
    d = TINY.to_dict()
    del d[key]
    with pytest.raises(UserError, match=rf"config\.json: missing keys: .*{key}"):
        load_config(_write(tmp_path, d))


def test_optional_keys_default(tmp_path):
    d = TINY.to_dict()
    for k in ("rms_norm_eps", "torch_dtype", "max_context_length", "num_context_pathways"):
        del d[k]
    cfg = load_config(_write(tmp_path, d))
    assert cfg.rms_norm_eps == 1e-6 and cfg.torch_dtype == "bfloat16" and cfg.num_context_pathways == 3


@pytest.mark.parametrize("change,pattern", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": 12.5}, "hidden_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"kv_split": 3}, "kv_split"),
    ({"num_attention_heads": 5}, "num_key_value_heads"),       # 5 heads over 2 KV heads
    ({"num_kv_sets": 9}, "num_kv_sets"),                      # more sets than layers
    ({"first_k_dense_replace": 5}, "first_k_dense_replace"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok"),      # top-7 of 6 experts
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"model_type": "llama"}, "model_type"),
])
def test_inconsistent_values_name_the_key(tmp_path, change, pattern):
    d = {**TINY.to_dict(), **change}
    with pytest.raises(UserError) as e:
        load_config(_write(tmp_path, d))
    assert "config.json" in str(e.value) and pattern in str(e.value)


def test_all_dense_model_needs_no_valid_topk():
    cfg = OneRecConfig(**{**TINY.__dict__, "first_k_dense_replace": 4, "n_routed_experts": 0,
                          "num_experts_per_tok": 1})
    assert cfg.num_moe_layers == 0
    assert not any(".experts." in k or ".gate." in k for k in tensor_specs(cfg))


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        load_config(tmp_path)


def test_preset_lookup():
    assert preset("tiny") is TINY
    with pytest.raises(UserError, match="unknown preset"):
        preset("70b")


def test_4b_matches_design():
    """DESIGN: about 4.1B total, 0.55B active; d 1408, 14 layers (0-1 dense, 2-13 MoE), 11 heads of 128,
    dense width 3840, 53 routed + 1 shared of width 1408, top-3, K 8192; GEMM dims multiples of 128."""
    cfg = PRESETS["4b"]
    total, active = count_params(cfg)
    assert 4.05e9 <= total <= 4.15e9, total
    assert 0.53e9 <= active <= 0.57e9, active
    assert [cfg.is_moe_layer(n) for n in range(14)] == [False] * 2 + [True] * 12
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) == (1408, 11, 128, 3840)
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok) == (53, 1, 3)
    assert (cfg.moe_intermediate_size, cfg.codebook_size) == (1408, 8192)
    for name, shape in tensor_specs(cfg).items():
        if len(shape) == 2 and "embed" not in name and not name.endswith("mlp.gate.weight"):
            assert shape[0] % 128 == 0 and shape[1] % 128 == 0, (name, shape)


def test_count_params_by_hand():
    c = TINY
    d, I, E, k = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok
    total, active = count_params(c)
    assert total == sum(math.prod(s) for s in tensor_specs(c).values())
    assert total - active == c.num_moe_layers * (E - k) * 3 * d * I


@pytest.mark.parametrize("name", list(PRESETS))
def test_spec_invariants(name):
    c = PRESETS[name]
    s = tensor_specs(c)
    assert s["model.embed_tokens.weight"] == (1 + c.num_semantic_levels * c.codebook_size, c.hidden_size)
    assert s["context.proj.weight"] == (c.kv_split * c.num_kv_sets * c.num_key_value_heads * c.head_dim,
                                        c.context_hidden_size)
    assert sum(k.startswith("context.kv_norms.") for k in s) == c.kv_split * c.num_kv_sets
    assert sum(k.startswith("lm_heads.") and k.endswith("proj.weight") for k in s) == c.num_semantic_levels
    # no per-layer K/V projections of the context (the "lazy" decoder)
    assert not any("cross_attn.k_proj" in k or "cross_attn.v_proj" in k for k in s)
    experts = [k for k in s if ".mlp.experts." in k]
    assert len(experts) == c.num_moe_layers * c.n_routed_experts * 3


def test_kv_set_of_layer():
    c = PRESETS["4b"]
    assert [c.kv_set_of_layer(n) for n in range(14)] == [0] * 7 + [1] * 7
    c1 = OneRecConfig(**{**TINY.__dict__, "num_hidden_layers": 5, "num_kv_sets": 3,
                         "first_k_dense_replace": 1})
    assert [c1.kv_set_of_layer(n) for n in range(5)] == [0, 0, 1, 1, 2]


# docs/checkpoint-format.md must specify every tensor's name and shape exactly (issue 2 §2) -------

_DOC = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "checkpoint-format.md"


def _doc_rows():
    """(name regex, shape formula, 4b shape, scheme) of the doc's tensor table."""
    import re

    rows = []
    for line in _DOC.read_text().splitlines():
        m = re.match(r"\| `([^`]+)`[^|]*\| (\[[^\]]*\]) \| (\[[^\]]*\]) \| ([a-z]+)", line)
        if m:
            name = re.escape(m.group(1))
            for var in ("n", "e", "j", "i"):
                name = name.replace(re.escape("{" + var + "}"), r"\d+")
            rows.append((re.compile(name + "$"), m.group(2), m.group(3), m.group(4)))
    return rows


def _eval_shape(formula: str, c) -> tuple[int, ...]:
    env = {"d": c.hidden_size, "D": c.head_dim, "H": c.num_attention_heads, "G": c.num_key_value_heads,
           "E": c.n_routed_experts, "I": c.moe_intermediate_size, "F": c.intermediate_size,
           "K": c.codebook_size, "V": c.num_semantic_levels, "d_c": c.context_hidden_size,
           "P": c.num_context_pathways, "d_ctx": c.d_ctx, "context_vocab_size": c.context_vocab_size}
    return tuple(int(eval(part, {"__builtins__": {}}, env))  # formulas from our own doc
                 for part in formula.strip("[]").split(","))


@pytest.mark.parametrize("name", list(PRESETS))
def test_doc_tensor_table_matches_spec(name):
    from fp8conv.recipe import load_recipe

    c, rows = PRESETS[name], _doc_rows()
    assert len(rows) >= 25
    recipe = load_recipe("onerec_v2")
    for tensor, shape in tensor_specs(c).items():
        hits = [r for r in rows if r[0].match(tensor)]
        assert len(hits) == 1, f"{tensor}: {len(hits)} rows of docs/checkpoint-format.md match"
        _, formula, shape_4b, scheme = hits[0]
        assert _eval_shape(formula, c) == shape, (tensor, formula)
        if name == "4b":
            assert _eval_shape(shape_4b, c) == shape, (tensor, shape_4b)
        assert recipe.scheme_for(tensor, shape) == scheme, tensor


@pytest.mark.parametrize("key,value", [("rms_norm_eps", "abc"), ("rms_norm_eps", -1.0),
                                       ("routed_scaling_factor", None), ("norm_topk_prob", 1),
                                       ("codebook_size", 2**22)])
def test_scalar_fields_validated(key, value):
    from fp8conv.config import PRESETS, OneRecConfig
    from fp8conv.errors import UserError

    d = PRESETS["tiny"].to_dict()
    d[key] = value
    with pytest.raises(UserError, match=key if key != "codebook_size" else "codebook_size"):
        OneRecConfig.from_dict(d)


def test_deeply_nested_config_json_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(UserError, match="config.json"):
        load_config(tmp_path)
