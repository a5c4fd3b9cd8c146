"""Builders for the verify tests (no tests here): tiny REF checkpoints, FP8 candidates written by
``fp8conv quantize`` (with any recipe), and in-place tensor edits for the sabotages the gate must catch."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from fp8conv.config import preset

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
