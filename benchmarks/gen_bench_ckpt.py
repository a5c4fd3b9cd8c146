"""A ~1.9 GB OneRec-named bf16 checkpoint in one file, in seconds (for quick speed runs; the 4b preset
of `fp8conv synth` is the reference): 12 MoE layers x 12 experts x 3 projections of 1408x1408, plus
attention and a norm per layer. Usage: python benchmarks/gen_bench_ckpt.py OUT_DIR"""

import json
import os
import sys

import torch
from safetensors.torch import save_file


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer in range(2, 14):
        for e in range(12):
            for p in ("gate_proj", "up_proj", "down_proj"):
                t[f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"] = \
                    (torch.randn(1408, 1408, generator=g) * 0.03).bfloat16()
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"model.layers.{layer}.self_attn.{p}.weight"] = (torch.randn(1408, 1408, generator=g) * 0.03).bfloat16()
        t[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(1408).bfloat16()
    save_file(t, f"{out}/model.safetensors", metadata={"format": "pt"})
    with open(f"{out}/config.json", "w") as f:
        json.dump({"model_type": "onerec_v2"}, f)
    print(f"{out}: {sum(v.numel() * 2 for v in t.values()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main(sys.argv[1])
