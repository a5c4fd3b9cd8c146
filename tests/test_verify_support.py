"""Builders for the verify tests (no tests here): tiny REF checkpoints, FP8 candidates written by
``fp8conv quantize`` (with any recipe), and in-place tensor edits for the sabotages the gate must catch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fp8conv import numerics as fp8
from fp8conv.config import preset

def quantization_config(groups_targets: dict[str, list[str]]) -> dict:
    groups = {}
    if groups_targets.get("channel"):
        groups["group_0"] = {"targets": groups_targets["channel"],
                             "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                         "symmetric": True, "dynamic": False},
                             "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                   "symmetric": True, "dynamic": True}}
    if groups_targets.get("block"):
        groups["group_1"] = {"targets": groups_targets["block"],
                             "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                         "block_structure": [128, 128], "symmetric": True, "dynamic": False},
                             "input_activations": {"num_bits": 8, "type": "float", "strategy": "group",
                                                   "group_size": 128, "symmetric": True, "dynamic": True}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": [], "config_groups": groups}


ROUTER_RECIPE = """name = "router_too"
default = "error"

[[rules]]
pattern = 're:model\\.layers\\.\\d+\\.mlp\\.gate\\.weight'
scheme = "channel"
"""


def recipe_text(name: str = "default") -> str:
    """The built-in OneRec-V2 recipe, or ("router") the same with the router quantized first."""
    from fp8conv.recipe import builtin_text

    text = builtin_text("onerec_v2")
    if name == "router":  # a rule before the built-in ones wins (first match)
        rules = text[text.index("[[rules]]"):]
        return ROUTER_RECIPE + "\n" + rules
    return text


def write_fp8(ref: Path, out: Path, recipe: str = "default", manifest: bool = True) -> Path:
    """An FP8 candidate of ``ref`` written by ``fp8conv quantize`` with the recipe named (see
    recipe_text); without its manifest (as another tool would write it) unless ``manifest``."""
    from fp8conv.quantize import quantize_checkpoint
    from fp8conv.recipe import Recipe

    rec = Recipe.from_toml(recipe_text(recipe), source=recipe)
    quantize_checkpoint(ref, out, recipe=rec, progress=False)
    if not manifest:
        (out / "fp8conv.json").unlink()
    return out


def edit_tensors(ckpt: Path, fn) -> None:
    """Rewrite ``ckpt``'s single safetensors file with ``fn(dict) -> None`` applied."""
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def tiny_ref(path: Path, seed: int = 0, dtype: str = "bf16") -> Path:
    from fp8conv.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(path, preset("tiny"), dtype=dtype, seed=seed)
