"""The OneRec-V2 checkpoint config (``config.json`` with ``"model_type": "onerec_v2"``).

One frozen dataclass, validated in ``__post_init__``; presets; and ``tensor_specs`` which names every
tensor of a checkpoint with its shape. docs/checkpoint-format.md is the prose version of this module;
keep them in step.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from fp8conv.errors import UserError

MODEL_TYPE = "onerec_v2"
# Context pathways of a user (the paper's static, short-term and long-term feature pathways).
PATHWAYS = ("static", "short_term", "long_term")


@dataclass(frozen=True)
class OneRecConfig:
    # decoder
    hidden_size: int = 1408
    num_hidden_layers: int = 14
    num_attention_heads: int = 11
    head_dim: int = 128
    num_key_value_heads: int = 1  # G_kv: KV groups of cross- and self-attention (GQA)
    intermediate_size: int = 3840  # dense SwiGLU width
    rms_norm_eps: float = 1e-6
    # MoE (DeepSeek-V3 style: sigmoid router with a correction bias, top-k, shared expert)
    first_k_dense_replace: int = 2  # layers [0, k) are dense, the rest MoE
    n_routed_experts: int = 53
    n_shared_experts: int = 1
    num_experts_per_tok: int = 3
    moe_intermediate_size: int = 1408
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # semantic IDs
    codebook_size: int = 8192  # K per level
    num_semantic_levels: int = 3
    # lazy context processor: d_ctx = kv_split * num_kv_sets * num_key_value_heads * head_dim
    num_kv_sets: int = 2  # L_kv
    kv_split: int = 2  # S_kv: 2 = separate keys and values, 1 = values are the keys
    context_vocab_size: int = 32768
    context_hidden_size: int = 1408
    num_context_pathways: int = len(PATHWAYS)
    max_context_length: int = 3000
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = [f.name for f in dataclasses.fields(self) if f.type in ("int", int)]
        for name in positive:
            v = getattr(self, name)
            minimum = 0 if name in ("n_shared_experts", "first_k_dense_replace", "n_routed_experts") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise UserError(f"config.json: '{name}' must be an integer >= {minimum}, got {v!r}")
        if self.kv_split not in (1, 2):
            raise UserError(f"config.json: 'kv_split' (S_kv) must be 1 or 2, got {self.kv_split}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_kv_sets > self.num_hidden_layers:
            raise UserError(f"config.json: num_kv_sets ({self.num_kv_sets}) exceeds num_hidden_layers "
                            f"({self.num_hidden_layers})")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise UserError("config.json: first_k_dense_replace exceeds num_hidden_layers")
        if self.num_moe_layers and not (0 < self.num_experts_per_tok <= self.n_routed_experts):
            raise UserError(f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                            f"[1, n_routed_experts={self.n_routed_experts}]")
        if self.n_shared_experts not in (0, 1):
            raise UserError("config.json: n_shared_experts must be 0 or 1")
        for name in ("rms_norm_eps", "routed_scaling_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise UserError(f"config.json: '{name}' must be a positive number, got {v!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise UserError(f"config.json: 'norm_topk_prob' must be true or false, got {self.norm_topk_prob!r}")
        if self.codebook_size ** self.num_semantic_levels >= 2**63:
            # beam search packs an item's IDs into one int64 key (fp8conv/runtime/beam.py)
            raise UserError(f"config.json: codebook_size ** num_semantic_levels "
                            f"({self.codebook_size}**{self.num_semantic_levels}) does not fit in int64")
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            raise UserError(f"config.json: torch_dtype must be bfloat16, float16 or float32, "
                            f"got {self.torch_dtype!r}")

    # derived sizes -------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def d_ctx(self) -> int:
        return self.kv_split * self.num_kv_sets * self.kv_size

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def kv_set_of_layer(self, layer: int) -> int:
        """Decoder layer l reads KV set floor(l * L_kv / n_layers) (DESIGN)."""
        return layer * self.num_kv_sets // self.num_hidden_layers

    # (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"model_type": MODEL_TYPE, "architectures": ["OneRecV2ForGenerativeRecommendation"]}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "OneRecConfig":
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected a JSON object")
        if d.get("model_type") != MODEL_TYPE:
            raise UserError(f"{source}: model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = names - {"rms_norm_eps", "routed_scaling_factor", "norm_topk_prob", "torch_dtype",
                            "max_context_length", "num_context_pathways"}
        missing = sorted(required - d.keys())
        if missing:
            raise UserError(f"{source}: missing keys: {', '.join(missing)}")
        known = {k: d[k] for k in names if k in d}
        extra = {k: v for k, v in d.items() if k not in names and k not in ("model_type", "architectures")}
        try:
            return cls(**known, extra=extra)
        except TypeError as e:  # pragma: no cover - defensive
            raise UserError(f"{source}: {e}") from None


def read_config_dict(ckpt_dir: str | Path, why: str = "a checkpoint folder holds config.json") -> dict:
    """A checkpoint's config.json as a dict (any model type); UserError naming the file otherwise."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found ({why})")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


def load_config(ckpt_dir: str | Path) -> OneRecConfig:
    d = read_config_dict(ckpt_dir, "a OneRec-V2 checkpoint folder holds config.json")
    return OneRecConfig.from_dict(d, source=str(Path(ckpt_dir) / "config.json"))


PRESETS: dict[str, OneRecConfig] = {
    # ~4.1B total / ~0.55B active: DESIGN's production-like numbers.
    "4b": OneRecConfig(),
    # A few MB, for tests. Dimensions deliberately not multiples of 128 in places (K of the
    # MoE experts, the codebook) so edge blocks are exercised.
    "tiny": OneRecConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
        num_key_value_heads=2, intermediate_size=320, first_k_dense_replace=1,
        n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=192,
        codebook_size=200, num_semantic_levels=3, num_kv_sets=2, kv_split=2,
        context_vocab_size=500, context_hidden_size=96, max_context_length=64,
    ),
}


def preset(name: str) -> OneRecConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# tensor names and shapes ------------------------------------------------------------------

def tensor_specs(cfg: OneRecConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a OneRec-V2 checkpoint in the source precision: name -> shape.

    Linear weights are [out_features, in_features] (PyTorch / Hugging Face layout).
    """
    d, kv, q = cfg.hidden_size, cfg.kv_size, cfg.q_size
    specs: dict[str, tuple[int, ...]] = {
        # BOS is row 0; code c of level l is row 1 + l * codebook_size + c.
        "model.embed_tokens.weight": (1 + cfg.num_semantic_levels * cfg.codebook_size, d),
        "context.token_embed.weight": (cfg.context_vocab_size, cfg.context_hidden_size),
        "context.pathway_embed.weight": (cfg.num_context_pathways, cfg.context_hidden_size),
        "context.norm.weight": (cfg.context_hidden_size,),
        "context.proj.weight": (cfg.d_ctx, cfg.context_hidden_size),
    }
    for j in range(cfg.kv_split * cfg.num_kv_sets):
        specs[f"context.kv_norms.{j}.weight"] = (cfg.head_dim,)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        specs[f"{p}.cross_attn_layernorm.weight"] = (d,)
        specs[f"{p}.cross_attn.q_proj.weight"] = (q, d)
        specs[f"{p}.cross_attn.o_proj.weight"] = (d, q)
        specs[f"{p}.self_attn_layernorm.weight"] = (d,)
        specs[f"{p}.self_attn.q_proj.weight"] = (q, d)
        specs[f"{p}.self_attn.k_proj.weight"] = (kv, d)
        specs[f"{p}.self_attn.v_proj.weight"] = (kv, d)
        specs[f"{p}.self_attn.o_proj.weight"] = (d, q)
        specs[f"{p}.post_attention_layernorm.weight"] = (d,)
        if not cfg.is_moe_layer(n):
            _swiglu(specs, f"{p}.mlp", d, cfg.intermediate_size)
            continue
        specs[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, d)
        specs[f"{p}.mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        for e in range(cfg.n_routed_experts):
            _swiglu(specs, f"{p}.mlp.experts.{e}", d, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            _swiglu(specs, f"{p}.mlp.shared_experts", d, cfg.moe_intermediate_size)
    specs["model.norm.weight"] = (d,)
    for i in range(cfg.num_semantic_levels):
        specs[f"lm_heads.{i}.norm.weight"] = (d,)
        specs[f"lm_heads.{i}.proj.weight"] = (cfg.codebook_size, d)
    return specs


def _swiglu(specs: dict, prefix: str, d: int, width: int) -> None:
    specs[f"{prefix}.gate_proj.weight"] = (width, d)
    specs[f"{prefix}.up_proj.weight"] = (width, d)
    specs[f"{prefix}.down_proj.weight"] = (d, width)


def count_params(cfg: OneRecConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts."""
    import math

    specs = tensor_specs(cfg)
    total = sum(math.prod(s) for s in specs.values())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = cfg.num_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - inactive
