"""Interop (issue 2 §5): what fp8conv writes loads through compressed-tensors as a consumer would.

The test builds small Qwen3 / Qwen3-MoE checkpoints with transformers (random init, bf16 safetensors),
converts them with fp8conv's quantize_checkpoint and the built-in "qwen3" / "qwen3_moe" recipes, then:

- validates quantization_config with compressed-tensors' own pydantic models and matcher, and checks
  that its compressor decompresses every FP8 weight to exactly our dequantized weight (and compresses
  that back to our bytes), for the channel and the 128x128 block scheme;
- loads the dense Qwen3 with AutoModelForCausalLM, both ways transformers offers: dequantize=True
  (weights dequantized at load: logits must equal the original architecture running our dequantized
  weights) and the default compressed route (compressed-tensors decompresses on the first forward and
  fake-quantizes activations per token): logits close to the original model.

transformers 5.24 cannot load the block-quantized routed experts of Qwen3-MoE (its fused-experts
loader multiplies each FP8 expert by its scale without expanding 128x128 block scales); that is
recorded as a strict xfail so we notice when it is fixed. vLLM and SGLang load block FP8 experts.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from safetensors import safe_open  # noqa: E402

from fp8conv import numerics as fp8  # noqa: E402
from fp8conv.metrics import cosine  # noqa: E402

pytestmark = pytest.mark.slow

QWEN3 = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=256, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=128)
# Qwen3-MoE: layer 0 dense, layer 1 MoE; expert width 192 is not a multiple of 128 (edge blocks).
QWEN3_MOE = dict(QWEN3, moe_intermediate_size=192, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0],
                 decoder_sparse_step=1)


def _build(root, kind: str):
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    from fp8conv.quantize import quantize_checkpoint

    torch.manual_seed(1234)
    cfg = Qwen3Config(**QWEN3) if kind == "qwen3" else Qwen3MoeConfig(**QWEN3_MOE)
    cfg.initializer_range = 0.05  # wider than the 0.02 default: logits with real top-1 margins
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    src, dst = root / f"{kind}-bf16", root / f"{kind}-fp8"
    model.save_pretrained(src)
    quantize_checkpoint(src, dst, recipe=kind, progress=False)
    return model.float().eval(), src, dst


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("interop"), "qwen3")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("interop"), "qwen3_moe")


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _ct_config(folder):
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    return QuantizationConfig.model_validate(qc)


def _scheme_of(ct_cfg, module: str):
    """The config group compressed-tensors' matcher assigns to ``module`` (None if ignored/unmatched)."""
    from compressed_tensors.utils.match import match_name

    if any(match_name(module, t) for t in ct_cfg.ignore or []):
        return None
    hits = [g for g in ct_cfg.config_groups.values() if any(match_name(module, t) for t in g.targets)]
    assert len(hits) <= 1, f"{module} matched by {len(hits)} config groups"
    return hits[0] if hits else None


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_compressed_tensors_decompresses_our_weights(kind, request):
    from compressed_tensors.compressors import BaseCompressor

    _, src, dst = request.getfixturevalue("dense" if kind == "qwen3" else "moe")
    ct_cfg = _ct_config(dst)
    assert ct_cfg.format == "float-quantized" and ct_cfg.quantization_status == "compressed"
    tensors, source = _tensors(dst), _tensors(src)
    seen = set()
    for name, t in tensors.items():
        if not name.endswith(".weight") or t.dim() != 2:
            continue
        module = name[: -len(".weight")]
        scheme = _scheme_of(ct_cfg, module)
        if t.dtype != torch.float8_e4m3fn:  # kept: the config must not claim it, bytes unchanged
            assert scheme is None, f"{name} is kept but config group claims it"
            assert torch.equal(t, source[name]), name
            continue
        assert scheme is not None, f"{name} is FP8 but no config group targets {module}"
        scale = tensors[name + "_scale"]
        strategy = scheme.weights.strategy
        assert strategy == ("block" if ".experts." in name else "channel"), name
        seen.add(strategy)
        ours = fp8.dequantize(t, scale)
        comp = BaseCompressor.get_value_from_registry(scheme.format or ct_cfg.format)
        theirs = comp.decompress({"weight": t, "weight_scale": scale}, scheme)["weight"]
        assert torch.equal(theirs.float(), ours), f"{name}: compressed-tensors decompresses differently"
        back = comp.compress({"weight": ours, "weight_scale": scale}, scheme)["weight"]
        assert torch.equal(back.view(torch.uint8), t.view(torch.uint8)), f"{name}: recompression differs"
    assert seen == ({"channel"} if kind == "qwen3" else {"channel", "block"})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _load(dst, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, **kw).eval()


def test_transformers_dequantized_load_is_exact(dense):
    from transformers.utils.quantization_config import CompressedTensorsConfig

    ref, src, dst = dense
    loaded = _load(dst, quantization_config=CompressedTensorsConfig(dequantize=True))
    tensors = _tensors(dst)
    # the reference architecture running exactly our dequantized weights
    expect = {k: (fp8.dequantize(v, tensors[k + "_scale"]) if v.dtype == torch.float8_e4m3fn else v.float())
              for k, v in tensors.items() if not k.endswith("_scale")}
    state = loaded.state_dict()
    n_fp8 = 0
    for k, v in expect.items():
        assert torch.equal(state[k], v), f"{k}: transformers loaded other values than we dequantize"
        n_fp8 += tensors[k].dtype == torch.float8_e4m3fn
    assert n_fp8 == 2 * 7  # q k v o gate up down per layer
    ids = torch.randint(0, QWEN3["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(5))
    twin = type(ref)(ref.config).float().eval()
    twin.load_state_dict(expect)
    got, want, orig = _logits(loaded, ids), _logits(twin, ids), _logits(ref, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert cosine(got, orig) > 0.995
    assert (got.argmax(-1) == orig.argmax(-1)).float().mean().item() >= 0.8


def test_transformers_compressed_route_runs_fp8(dense):
    """Default route: weights stay FP8 until compressed-tensors decompresses them on the first
    forward; input activations are fake-quantized per token (our "channel" group's dynamic args)."""
    ref, src, dst = dense
    loaded = _load(dst)
    ids = torch.randint(0, QWEN3["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(6))
    got, orig = _logits(loaded, ids), _logits(ref, ids)
    assert torch.isfinite(got).all()
    assert cosine(got, orig) > 0.99
    assert (got.argmax(-1) == orig.argmax(-1)).float().mean().item() >= 0.75
    q = loaded.model.layers[1].self_attn.q_proj
    assert q.quantization_scheme.input_activations.strategy == "token"
    assert q.quantization_scheme.input_activations.dynamic is True


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="transformers 5.24 CompressedTensorsDequantize multiplies FP8 fused experts by "
                          "their weight_scale without expanding 128x128 block scales")
def test_transformers_loads_block_experts(moe):
    from transformers.utils.quantization_config import CompressedTensorsConfig

    ref, src, dst = moe
    loaded = _load(dst, quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, QWEN3["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(7))
    assert cosine(_logits(loaded, ids), _logits(ref, ids)) > 0.99
