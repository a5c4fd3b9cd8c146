"""The ``quantization_config`` that fp8conv writes into config.json (compressed-tensors, "float-quantized").

Built from what the converter actually did (module -> scheme), never from the recipe text, so the
config and the tensors always agree. One config group per scheme used:

- channel: weights float8 per output channel (static), input activations per token (dynamic);
- block:   weights float8 in 128x128 blocks (static), input activations in 1x128 groups (dynamic).

Targets. compressed-tensors (``compressed_tensors.utils.match``) and vLLM match a target against a
module name (exact, or ``re:<regex>`` with ``re.match``) or a layer class name ("Linear"). Class names
cannot tell a routed expert from a dense projection (both are Linear), so fp8conv names modules: each
module name is generalised by replacing its numeric components (layer, expert, head index) with
``\\d+``, names that then differ only in their last component are merged into one alternation, and
every regex ends with ``$``. A generalised pattern that would also match a module with another scheme
(say a recipe that keeps layer 0's experts) is not used: those modules are listed by exact name. The
``ignore`` list is built the same way from the 2-D weights that were kept.

No runtime dependency on compressed-tensors: tests/test_quantize_qconfig.py validates the output with
its pydantic models and its own matcher.
"""

from __future__ import annotations

import re

QUANTIZED = ("channel", "block")

_FLOAT8 = {"num_bits": 8, "type": "float", "symmetric": True}
WEIGHTS = {
    "channel": {**_FLOAT8, "group_size": None, "strategy": "channel", "dynamic": False},
    "block": {**_FLOAT8, "group_size": None, "strategy": "block", "block_structure": [128, 128],
              "dynamic": False},
}
INPUT_ACTIVATIONS = {
    "channel": {**_FLOAT8, "group_size": None, "strategy": "token", "dynamic": True},
    "block": {**_FLOAT8, "group_size": 128, "strategy": "group", "dynamic": True},
}


def module_name(tensor_name: str) -> str:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def build_quantization_config(schemes: dict[str, str]) -> dict | None:
    """``schemes``: module name -> "channel" | "block" | "keep" for every 2-D weight of the checkpoint.
    Returns None when nothing was quantized (then config.json gets no quantization_config)."""
    used = [s for s in QUANTIZED if s in schemes.values()]
    if not used:
        return None
    groups = {}
    for i, scheme in enumerate(used):
        groups[f"group_{i}"] = {
            "targets": targets_for(schemes, scheme),
            "weights": dict(WEIGHTS[scheme]),
            "input_activations": dict(INPUT_ACTIVATIONS[scheme]),
            "output_activations": None,
            "format": "float-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": targets_for(schemes, "keep"),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _template(module: str) -> tuple[str, ...]:
    return tuple(r"\d+" if part.isdigit() else re.escape(part) for part in module.split("."))


def targets_for(schemes: dict[str, str], scheme: str) -> list[str]:
    """Sorted compressed-tensors targets matching exactly the modules with ``scheme`` among ``schemes``."""
    mine = sorted(m for m, s in schemes.items() if s == scheme)
    others_templates = {_template(m) for m, s in schemes.items() if s != scheme}
    exact: list[str] = []
    by_parent: dict[tuple[str, ...], set[str]] = {}
    for m in mine:
        t = _template(m)
        if t in others_templates:  # the generalisation would claim another scheme's module
            exact.append(m)
        else:
            by_parent.setdefault(t[:-1], set()).add(t[-1])
    regexes = []
    for parent, lasts in by_parent.items():
        last = next(iter(lasts)) if len(lasts) == 1 else "(" + "|".join(sorted(lasts)) + ")"
        regexes.append("re:" + r"\.".join(parent + (last,)) + "$")
    return sorted(regexes) + exact


def scheme_by_config(qconfig: dict | None, module: str) -> str:
    """What a consumer following compressed-tensors' matching makes of ``module`` (for tests and docs):
    the strategy of the group whose target matches (exact names before regexes), "keep" if ignored."""
    if not qconfig:
        return "keep"

    def hit(target: str) -> bool:
        if target.startswith("re:"):
            return re.match(target[3:], module) is not None
        return target == module

    if any(hit(t) for t in qconfig.get("ignore") or []):
        return "keep"
    matches = []
    for group in qconfig["config_groups"].values():
        for t in group["targets"]:
            if hit(t):
                matches.append((t.startswith("re:"), t, group["weights"]["strategy"]))
    return sorted(matches)[0][2] if matches else "keep"
