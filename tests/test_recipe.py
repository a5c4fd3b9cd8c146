"""fp8conv.recipe: schema, matching rules, built-ins (OneRec-V2, Qwen3, Qwen3-MoE), errors, CLI."""

from __future__ import annotations

from collections import Counter

import pytest
from click.testing import CliRunner

from fp8conv.commands.recipe import recipe as recipe_cmd
from fp8conv.config import preset, tensor_specs
from fp8conv.errors import UserError
from fp8conv.recipe import Recipe, builtin_names, load_recipe


def test_builtins_parse_and_round_trip():
    assert {"onerec_v2", "qwen3", "qwen3_moe"} <= set(builtin_names())
    for name in builtin_names():
        r = load_recipe(name)
        assert r.name == name and Recipe.from_toml(r.to_toml()) == r and Recipe.from_toml(r.text) == r
    assert load_recipe() == load_recipe("onerec_v2")


@pytest.mark.parametrize("name", ["tiny", "4b"])
def test_onerec_v2_on_the_spec(name):
    cfg = preset(name)
    specs = tensor_specs(cfg)
    r = load_recipe()
    assert r.unclaimed(specs) == []
    s = {n: r.scheme_for(n, shape) for n, shape in specs.items()}
    counts = Counter(s.values())
    routed = cfg.num_moe_layers * cfg.n_routed_experts * 3
    assert counts["block"] == routed
    dense_ffn = cfg.first_k_dense_replace * 3 + cfg.num_moe_layers * 3 * cfg.n_shared_experts
    assert counts["channel"] == cfg.num_hidden_layers * 6 + dense_ffn
    for n, scheme in s.items():
        if ".mlp.gate." in n or n.startswith(("context.", "lm_heads.", "model.embed_tokens")) or \
                len(specs[n]) == 1:
            assert scheme == "keep", n


QWEN3 = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
         "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_norm.weight",
         "model.layers.11.self_attn.o_proj.weight", "model.layers.3.mlp.gate_proj.weight",
         "model.layers.3.mlp.down_proj.weight", "model.layers.3.input_layernorm.weight"]
QWEN3_MOE = ["model.layers.2.mlp.gate.weight", "model.layers.2.mlp.experts.17.gate_proj.weight",
             "model.layers.2.mlp.experts.0.down_proj.weight", "model.layers.0.mlp.up_proj.weight"]


def _shape(n):
    return (64,) if "norm" in n else (64, 32)


def test_qwen3_recipes():
    q = load_recipe("qwen3")
    got = {n: q.scheme_for(n, _shape(n)) for n in QWEN3}
    assert got["model.embed_tokens.weight"] == got["lm_head.weight"] == "keep"
    assert got["model.layers.0.self_attn.q_proj.weight"] == got["model.layers.3.mlp.down_proj.weight"] == "channel"
    assert q.unclaimed({n: _shape(n) for n in QWEN3_MOE[1:2]}) == QWEN3_MOE[1:2]  # dense recipe: no experts
    m = load_recipe("qwen3_moe")
    got = {n: m.scheme_for(n, _shape(n)) for n in QWEN3 + QWEN3_MOE}
    assert got["model.layers.2.mlp.gate.weight"] == "keep"
    assert got["model.layers.2.mlp.experts.17.gate_proj.weight"] == "block"
    assert got["model.layers.0.mlp.up_proj.weight"] == "channel"
    assert got["model.layers.0.self_attn.q_proj.weight"] == "channel"


def test_matching_rules():
    r = Recipe.from_toml("""name = "m"
default = "error"
[[rules]]
pattern = "x.special.weight"
scheme = "keep"
[[rules]]
pattern = "x.*.weight"
scheme = "channel"
[[rules]]
pattern = 're:y\\.\\d+\\.w'
scheme = "block"
""")
    assert r.scheme_for("x.special.weight", (4, 4)) == "keep"  # first match wins
    assert r.scheme_for("x.a.b.weight", (4, 4)) == "channel"  # glob * crosses dots
    assert r.scheme_for("x.a.bias", (4, 4)) == "keep"  # not a .weight: always kept
    assert r.scheme_for("x.a.weight", (4,)) == "keep"  # not 2-D: always kept
    assert r.scheme_for("x.a.weight", (2, 3, 4)) == "keep"
    with pytest.raises(UserError, match="z.weight"):
        r.scheme_for("z.weight", (4, 4))
    # a regex must match the whole name: 'y\.\d+\.w' does not claim 'y.1.weight'
    assert r.unclaimed({"y.1.weight": (4, 4), "x.q.weight": (2, 2), "n.weight": (3,)}) == ["y.1.weight"]
    keep = Recipe.from_toml('name = "k"\ndefault = "keep"\n')
    assert keep.scheme_for("anything.weight", (4, 4)) == "keep" and keep.unclaimed({"a.weight": (2, 2)}) == []


@pytest.mark.parametrize("text,word", [
    ("[[rules]\n", "not valid TOML"),
    ("default = 'maybe'\n", "default"),
    ("[[rules]]\npattern = '*'\nscheme = 'int4'\n", "int4"),
    ("[[rules]]\npattern = 're:(['\nscheme = 'keep'\n", "regex"),
    ("[[rules]]\npattern = '*'\n", "exactly 'pattern' and 'scheme'"),
    ("colour = 'red'\n", "unknown key"),
    ("rules = 3\n", "array of tables"),
])
def test_malformed_recipe_names_the_file(tmp_path, text, word):
    p = tmp_path / "my-recipe.toml"
    p.write_text(text)
    with pytest.raises(UserError, match=word) as e:
        load_recipe(p)
    assert "my-recipe.toml" in str(e.value)


def test_unknown_recipe():
    with pytest.raises(UserError, match="neither a built-in"):
        load_recipe("no-such-recipe")


def test_recipe_cli(tmp_path):
    runner = CliRunner()
    out = runner.invoke(recipe_cmd, ["show"])
    assert out.exit_code == 0 and Recipe.from_toml(out.output) == load_recipe()
    out = runner.invoke(recipe_cmd, ["show", "qwen3_moe"])
    assert out.exit_code == 0 and Recipe.from_toml(out.output) == load_recipe("qwen3_moe")
    out = runner.invoke(recipe_cmd, ["list"])
    assert out.exit_code == 0 and "onerec_v2 (default)" in out.output and "qwen3" in out.output
    p = tmp_path / "r.toml"
    p.write_text("name = 'mine'\ndefault = 'keep'\n")
    out = runner.invoke(recipe_cmd, ["show", str(p)])
    assert out.exit_code == 0 and "mine" in out.output


def test_recipe_from_a_pipe(tmp_path):
    """--recipe <(fp8conv recipe show qwen3_moe | sed ...) hands fp8conv a pipe, not a regular file."""
    import os

    r, w = os.pipe()
    try:
        os.write(w, b'name = "piped"\n[[rules]]\npattern = "*"\nscheme = "keep"\n')
        os.close(w)
        assert load_recipe(f"/dev/fd/{r}").name == "piped"
    finally:
        os.close(r)
    with pytest.raises(UserError, match="neither a built-in"):
        load_recipe(tmp_path)  # a folder still is not a recipe


def test_toml_nested_too_deeply_is_a_user_error_naming_the_file():
    with pytest.raises(UserError, match=r"deep\.toml: not valid TOML \(nested too deeply\)"):
        Recipe.from_toml("x = " + "[" * 5000 + "]" * 5000, source="deep.toml")
