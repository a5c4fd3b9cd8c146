"""The written quantization_config, checked with compressed-tensors' own pydantic models and matcher:
it validates, its groups are the library's FP8_DYNAMIC / FP8_BLOCK presets, and every module's scheme by
the config equals its scheme on disk (also when a recipe makes the numeric generalisation ambiguous)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from fp8conv.compressed_tensors import build_quantization_config, scheme_by_config
from fp8conv.config import preset
from fp8conv.quantize import quantize_checkpoint
from fp8conv.recipe import Recipe, load_recipe
from fp8conv.synth import write_synthetic_checkpoint

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig  # noqa: E402
from compressed_tensors.quantization.quant_scheme import FP8_BLOCK, FP8_DYNAMIC  # noqa: E402
from compressed_tensors.utils.match import match_name  # noqa: E402


def _ct_scheme(qc: dict, module: str) -> str:
    """compressed-tensors' matching: ignored -> keep; else the group whose target matches."""
    if any(match_name(module, t) for t in qc["ignore"]):
        return "keep"
    hits = {g["weights"]["strategy"] for g in qc["config_groups"].values()
            if any(match_name(module, t) for t in g["targets"])}
    assert len(hits) <= 1, (module, hits)
    return hits.pop() if hits else "keep"


def _on_disk(dst) -> dict[str, str]:
    out = {}
    for p in dst.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            names = set(f.keys())
            for n in names:
                if n.endswith(".weight") and len(f.get_slice(n).get_shape()) == 2:
                    scale = n + "_scale"
                    if scale not in names:
                        out[n[:-7]] = "keep"
                    else:
                        out[n[:-7]] = "channel" if f.get_slice(scale).get_shape()[1] == 1 and \
                            f.get_slice(scale).get_shape()[0] == f.get_slice(n).get_shape()[0] else "block"
    return out


# Keeps layer 1's expert 0 and the dense layer's down_proj: generalised regexes would be ambiguous.
TRICKY = load_recipe().to_toml().replace("[[rules]]", """[[rules]]
pattern = 're:model\\.layers\\.1\\.mlp\\.experts\\.0\\..*'
scheme = "keep"

[[rules]]
pattern = "model.layers.0.mlp.down_proj.weight"
scheme = "keep"

[[rules]]""", 1)


@pytest.mark.parametrize("recipe_text", [None, TRICKY], ids=["onerec_v2", "ambiguous"])
def test_config_validates_and_matches_disk(tmp_path, recipe_text):
    src = write_synthetic_checkpoint(tmp_path / "src", preset("tiny"), seed=1)
    recipe = Recipe.from_toml(recipe_text) if recipe_text else None
    quantize_checkpoint(src, tmp_path / "dst", recipe=recipe, progress=False)
    qc = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "float-quantized" and parsed.quantization_status == "compressed"
    want = {"channel": FP8_DYNAMIC, "block": FP8_BLOCK}
    for g in parsed.config_groups.values():
        preset_args = want[g.weights.strategy]
        assert g.weights == preset_args["weights"]
        assert g.input_activations == preset_args["input_activations"]
    disk = _on_disk(tmp_path / "dst")
    assert set(disk.values()) == {"channel", "block", "keep"}
    for module, scheme in disk.items():
        assert _ct_scheme(qc, module) == scheme, module
        assert scheme_by_config(qc, module) == scheme, module
    if recipe_text:  # the ambiguous modules are named exactly
        targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
        assert "model.layers.1.mlp.experts.1.up_proj" in targets
        assert "model.layers.1.mlp.experts.0.up_proj" in qc["ignore"]


def test_only_used_groups():
    assert build_quantization_config({"a.proj": "keep"}) is None
    qc = build_quantization_config({"l.0.q_proj": "channel", "l.1.q_proj": "channel", "head": "keep"})
    assert list(qc["config_groups"]) == ["group_0"]
    assert qc["config_groups"]["group_0"]["targets"] == [r"re:l\.\d+\.q_proj$"]
    assert qc["ignore"] == [r"re:head$"]
    QuantizationArgs.model_validate(qc["config_groups"]["group_0"]["weights"])
