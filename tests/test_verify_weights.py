"""Step 1 of fp8conv verify on tiny checkpoints: every sabotage is named, a clean candidate is clean.

Both modes: ``bit-exact`` (CAND carries an fp8conv manifest) and ``dequantized`` (no manifest: a
checkpoint from another tool). No model runs here (see test_verify_cli.py for the command end to end).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fp8conv import numerics as fp8
from fp8conv.verify_weights import Checkpoint, check_weights, design_keep_reason, read_manifest
from fp8conv.compressed_tensors import build_quantization_config
from test_verify_support import edit_tensors, tiny_ref, write_fp8

L = "model.layers.2"  # a MoE layer of the tiny preset (layer 0 is dense)
MODES = [True, False]  # with / without the manifest


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return tiny_ref(tmp_path_factory.mktemp("ref") / "ref")


@pytest.fixture(scope="module")
def built(ref, tmp_path_factory):
    """(recipe, manifest) -> a pristine candidate, built once; tests sabotage copies of it."""
    root, cache = tmp_path_factory.mktemp("cands"), {}

    def get(recipe: str, manifest: bool):
        if (recipe, manifest) not in cache:
            cache[recipe, manifest] = write_fp8(ref, root / f"{recipe}-{manifest}", recipe, manifest)
        return cache[recipe, manifest]
    return get


@pytest.fixture
def fp8_cand(built, tmp_path):
    """fp8_cand(manifest=True, recipe="default") -> a fresh copy of a pristine candidate."""
    def make(manifest: bool = True, recipe: str = "default"):
        return shutil.copytree(built(recipe, manifest), tmp_path / "cand")
    return make


def run(ref_dir, cand_dir):
    cand = Checkpoint(cand_dir, "CAND")
    cfg = json.loads((cand_dir / "config.json").read_text())
    return check_weights(Checkpoint(ref_dir, "REF"), cand, cfg, read_manifest(cand_dir), min_sqnr_db=20.0)


def subjects(report) -> set[str]:
    return {f.tensor for f in report.findings}


@pytest.mark.parametrize("manifest", MODES)
def test_clean_candidate_has_no_findings(ref, fp8_cand, manifest):
    rep = run(ref, fp8_cand(manifest))
    assert rep.findings == ()
    assert rep.mode == ("bit-exact" if manifest else "dequantized")
    assert rep.quantized == 90  # 4 layers x 6 attention + 1 dense FFN x 3 + 3 MoE x (6 + 1) x 3
    assert min(rep.sqnr_db.values()) > 25.0  # E4M3: ~31 dB on LLM-like weights


@pytest.mark.parametrize("manifest", MODES)
def test_scale_times_1_5_is_named(ref, fp8_cand, manifest):
    cand = fp8_cand(manifest)
    name = f"{L}.self_attn.q_proj.weight"
    edit_tensors(cand, lambda t: t[name + "_scale"].mul_(1.5))
    rep = run(ref, cand)
    assert subjects(rep) == {name + "_scale"} if manifest else {name}
    text = " ".join(f.problem for f in rep.findings)
    assert ("ratio 1.5..1.5" in text) if manifest else ("SQNR 6.0 dB" in text)


@pytest.mark.parametrize("manifest", MODES)
def test_swapped_experts_are_named(ref, fp8_cand, manifest):
    cand = fp8_cand(manifest)

    def swap(t):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for suffix in ("", "_scale"):
                a, b = f"{L}.mlp.experts.1.{proj}.weight{suffix}", f"{L}.mlp.experts.4.{proj}.weight{suffix}"
                t[a], t[b] = t[b].clone(), t[a].clone()

    edit_tensors(cand, swap)
    named = {s.replace("_scale", "") for s in subjects(run(ref, cand))}
    assert named == {f"{L}.mlp.experts.{e}.{p}.weight" for e in (1, 4)
                     for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("manifest", MODES)
def test_transposed_nonsquare_block_scale_is_named(ref, fp8_cand, manifest):
    cand = fp8_cand(manifest)
    name = f"{L}.mlp.experts.2.down_proj.weight_scale"  # weight [128, 192] -> grid [1, 2]
    edit_tensors(cand, lambda t: t.__setitem__(name, t[name].t().contiguous()))
    rep = run(ref, cand)
    assert subjects(rep) == {name}
    assert rep.structural
    if manifest:
        assert "transposed block grid" in rep.findings[0].problem


@pytest.mark.parametrize("manifest", MODES)
def test_transposed_square_block_scale_is_named(tmp_path, manifest):
    """A 2x2 grid keeps its shape when transposed; the values give it away. The weight's blocks get
    different ranges (as trained experts' do), so the swap of the off-diagonal scales matters."""
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[:128, 128:] *= 8.0  # block (0, 1) has 8x the range of block (1, 0)
    ref = tmp_path / "ref"
    ref.mkdir()
    save_file({name: w.to(torch.bfloat16)}, str(ref / "model.safetensors"))
    q, s = fp8.quantize_block(w.to(torch.bfloat16))
    cand = tmp_path / "cand"
    cand.mkdir()
    save_file({name: q, name + "_scale": s.t().contiguous()}, str(cand / "model.safetensors"))
    (cand / "config.json").write_text(json.dumps({"quantization_config": build_quantization_config(
        {name[: -len(".weight")]: "block"})}))
    if manifest:
        write_manifest_for(ref, cand)
    rep = run(ref, cand)
    assert subjects(rep) == ({name + "_scale"} if manifest else {name})
    if not manifest:
        assert "dB < 20 dB" in rep.findings[0].problem


def write_manifest_for(ref, cand):
    import hashlib

    from test_verify_support import recipe_text

    digest = hashlib.sha256((ref / "model.safetensors").read_bytes()).hexdigest()
    (cand / "fp8conv.json").write_text(json.dumps({
        "tool": "fp8conv", "recipe": {"name": "onerec_v2", "toml": recipe_text()},
        "source": {"files": {"model.safetensors": digest}}, "tensors": {}}))


@pytest.mark.parametrize("manifest", MODES)
def test_quantized_router_is_named_whatever_the_recipe(ref, fp8_cand, manifest):
    rep = run(ref, fp8_cand(manifest, "router"))
    routers = {f"model.layers.{n}.mlp.gate.weight" for n in (1, 2, 3)}
    assert subjects(rep) == routers  # consistent with its own recipe, but DESIGN keeps the router
    assert all("DESIGN keeps the router" in f.problem for f in rep.findings)


def test_candidate_that_disagrees_with_its_manifest_recipe(ref, fp8_cand):
    cand = fp8_cand(True, "router")
    m = json.loads((cand / "fp8conv.json").read_text())
    write_manifest_for(ref, cand)  # now claims the built-in recipe, which keeps the router
    assert json.loads((cand / "fp8conv.json").read_text())["recipe"]["toml"] != m["recipe"]["toml"]
    problems = {f.tensor: f.problem for f in run(ref, cand).findings}
    assert "the manifest's recipe keeps it, but CAND quantized it" in " ".join(problems.values())
    assert set(problems) == {f"model.layers.{n}.mlp.gate.weight" for n in (1, 2, 3)}


def test_source_hash_mismatch_is_named(ref, fp8_cand, tmp_path):
    cand = fp8_cand()
    other = tmp_path / "ref2"
    shutil.copytree(ref, other)
    edit_tensors(other, lambda t: t["model.norm.weight"].mul_(1.01))
    subj = subjects(run(other, cand))
    assert "model.safetensors" in subj  # the source file
    assert "model.norm.weight" in subj  # and the kept tensor that differs


@pytest.mark.parametrize("manifest", MODES)
def test_changed_kept_tensor_is_named(ref, fp8_cand, manifest):
    cand = fp8_cand(manifest)
    edit_tensors(cand, lambda t: t["lm_heads.1.proj.weight"].mul_(-1))
    assert subjects(run(ref, cand)) == {"lm_heads.1.proj.weight"}


def test_quantization_config_that_disagrees_with_the_tensors(ref, fp8_cand):
    cand = fp8_cand()
    cfg = json.loads((cand / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append(f"{L}.self_attn.o_proj")  # a server would not dequantize it
    (cand / "config.json").write_text(json.dumps(cfg))
    rep = run(ref, cand)
    assert subjects(rep) == {f"{L}.self_attn.o_proj.weight"}
    assert "quantization_config says 'keep'" in rep.findings[0].problem


@pytest.mark.parametrize("manifest", MODES)
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_non_finite_scale_is_named(ref, fp8_cand, manifest, bad):
    """Without the manifest an inf scale made the SQNR raise (math domain error) and a NaN one gave a
    NaN SQNR that passed the threshold; both now name the weight."""
    cand = fp8_cand(manifest)
    edit_tensors(cand, lambda t: t[f"{L}.self_attn.q_proj.weight_scale"].__setitem__(0, bad))
    rep = run(ref, cand)
    assert f"{L}.self_attn.q_proj.weight" in subjects(rep)
    assert any("not finite" in f.problem for f in rep.findings)
    assert subjects(rep) <= {f"{L}.self_attn.q_proj.weight", f"{L}.self_attn.q_proj.weight_scale"}


@pytest.mark.parametrize("qc", [5, "x", {"quant_method": "compressed-tensors", "format": "float-quantized",
                                       "quantization_status": "compressed", "ignore": "lm_heads",
                                       "config_groups": {"g": {"weights": None, "targets": ["Linear"]}}}],
                         ids=["int", "str", "null weights"])
def test_malformed_quantization_config_is_a_finding_not_a_crash(ref, fp8_cand, qc):
    cand = fp8_cand()
    cfg = json.loads((cand / "config.json").read_text())
    cfg["quantization_config"] = qc
    (cand / "config.json").write_text(json.dumps(cfg))
    rep = run(ref, cand)
    assert "config.json" in subjects(rep)


def test_missing_and_extra_tensors_are_structural(ref, fp8_cand):
    cand = fp8_cand(False)

    def edit(t):
        t.pop(f"{L}.mlp.shared_experts.up_proj.weight")
        t["model.layers.9.stray.weight"] = torch.zeros(2, 2)

    edit_tensors(cand, edit)
    rep = run(ref, cand)
    assert {f"{L}.mlp.shared_experts.up_proj.weight", "model.layers.9.stray.weight"} <= subjects(rep)
    assert rep.structural


@pytest.mark.parametrize("name, why", [
    ("model.embed_tokens.weight", "embedding"), ("context.proj.weight", "context processor"),
    ("model.layers.3.mlp.gate.weight", "router"), ("model.layers.3.mlp.gate.e_score_correction_bias", "router"),
    ("model.layers.0.self_attn_layernorm.weight", "norm"), ("lm_heads.2.proj.weight", "output head"),
    ("model.layers.3.mlp.gate_proj.weight", None), ("model.layers.3.mlp.experts.0.gate_proj.weight", None),
    ("model.layers.0.cross_attn.q_proj.weight", None),
])
def test_design_keep_list(name, why):
    assert design_keep_reason(name) == why


def test_sqnr_of_clean_block_and_channel_weights_is_finite(ref, fp8_cand):
    rep = run(ref, fp8_cand(False))
    assert all(math.isfinite(v) for v in rep.sqnr_db.values())


def test_sharded_checkpoints_are_read_through_the_index(tmp_path):
    from fp8conv.config import preset
    from fp8conv.quantize import quantize_checkpoint
    from fp8conv.synth import write_synthetic_checkpoint

    ref = write_synthetic_checkpoint(tmp_path / "ref", preset("tiny"), dtype="fp16", shard_size=10**6)
    assert (ref / "model.safetensors.index.json").is_file()
    cand = tmp_path / "cand"
    quantize_checkpoint(ref, cand, progress=False)
    rep = run(ref, cand)
    assert rep.mode == "bit-exact" and rep.findings == () and rep.quantized == 90


@pytest.mark.parametrize("weight_map", [[], "x", {"a": 5}, "deep"], ids=["list", "str", "int file", "deep"])
def test_malformed_index_is_a_user_error_naming_it(ref, fp8_cand, weight_map):
    from fp8conv.errors import UserError

    cand = fp8_cand()
    text = "[" * 100_000 + "]" * 100_000 if weight_map == "deep" else json.dumps({"weight_map": weight_map})
    (cand / "model.safetensors.index.json").write_text(text)
    with pytest.raises(UserError, match="model.safetensors.index.json"):  # were AttributeError / TypeError
        Checkpoint(cand, "CAND")
