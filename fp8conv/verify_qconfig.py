"""Does CAND's ``config.json`` ``quantization_config`` describe CAND's tensors?

Serving stacks (vLLM, SGLang, transformers) quantize exactly what the compressed-tensors config says and
read the scales with the layout its groups name; a config that disagrees with the tensors loads without
an error and serves garbage. So each Linear's scheme by the config must equal its scheme on disk.

Matching follows compressed-tensors (``compressed_tensors.utils.match``): a target or ignore entry is a
module name, ``re:<regex>`` (``re.match`` against the module name) or a layer class name; the only class
in a OneRec-V2 checkpoint is ``Linear`` (every ``*_proj`` / ``proj`` module; embeddings, norms and the
router are not Linear layers).
"""

from __future__ import annotations

import re

_WEIGHT = ".weight"
_SCALE = ".weight_scale"


def _is_linear(module: str) -> bool:
    return module.rsplit(".", 1)[-1].endswith("proj")


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    if target == "Linear":
        return _is_linear(module)
    return target == module


def _group_problems(name: str, group: dict) -> list[str]:
    """Format checks of one config group (weights and activations as DESIGN's two schemes need)."""
    w, a = group.get("weights"), group.get("input_activations")
    w, a = (w if isinstance(w, dict) else {}), (a if isinstance(a, dict) else {})
    out = []
    if w.get("num_bits") != 8 or w.get("type") != "float":
        out.append(f"group {name}: weights must be num_bits 8, type float")
    strategy = w.get("strategy")
    if strategy == "channel":
        if a and (a.get("strategy") != "token" or not a.get("dynamic")):
            out.append(f"group {name}: channel weights need dynamic per-token activations")
    elif strategy == "block":
        if list(w.get("block_structure") or []) != [128, 128]:
            out.append(f"group {name}: block weights need block_structure [128, 128]")
        if a and (a.get("strategy") != "group" or a.get("group_size") != 128 or not a.get("dynamic")):
            out.append(f"group {name}: block weights need dynamic group-128 activations")
    else:
        out.append(f"group {name}: weight strategy {strategy!r} is neither 'channel' nor 'block'")
    return out


def check_quantization_config(config: dict, cand, ref_names: list[str]) -> list[tuple[str, str]]:
    """(subject, problem) pairs; ``cand`` is a verify_weights.Checkpoint (names and scale shapes)."""
    qc = config.get("quantization_config")
    modules = [n[: -len(_WEIGHT)] for n in ref_names if n.endswith(_WEIGHT)]
    quantized = [m for m in modules if m + _SCALE in cand]
    if not qc:
        return [("config.json", f"{len(quantized)} quantized tensors but no quantization_config")] \
            if quantized else []
    if not isinstance(qc, dict):
        return [("config.json", f"quantization_config is not an object ({type(qc).__name__})")]
    out = []
    for key, want in (("quant_method", "compressed-tensors"), ("format", "float-quantized"),
                      ("quantization_status", "compressed")):
        if qc.get(key) != want:
            out.append(("config.json", f"quantization_config.{key} is {qc.get(key)!r}, expected {want!r}"))
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        return out + [("config.json", "quantization_config.config_groups is not an object")]
    for gname, group in groups.items():
        out += [("config.json", p) for p in _group_problems(gname, group if isinstance(group, dict) else {})]
    ignore = _names(qc.get("ignore"))
    for m in modules:
        if m + _WEIGHT not in cand:  # reported as missing by the caller
            continue
        strategies = {(g.get("weights") if isinstance(g.get("weights"), dict) else {}).get("strategy")
                      for g in groups.values()
                      if isinstance(g, dict) and any(_matches(m, t) for t in _names(g.get("targets")))}
        if any(_matches(m, t) for t in ignore):
            strategies = set()
        if len(strategies) > 1:
            out.append((m + _WEIGHT, f"quantization_config matches it with several strategies "
                                     f"{sorted(map(str, strategies))}"))
            continue
        by_config = strategies.pop() if strategies else "keep"
        on_disk = _scheme_on_disk(cand, m)
        if by_config != on_disk:
            out.append((m + _WEIGHT, f"quantization_config says {by_config!r}, the tensor on disk is "
                                     f"{on_disk!r}"))
    return out


def _names(x) -> list[str]:
    """A target or ignore list; anything else (a bare string, a number) matches nothing."""
    return [t for t in x if isinstance(t, str)] if isinstance(x, list) else []


def _scheme_on_disk(cand, module: str) -> str:
    if module + _SCALE not in cand:
        return "keep"
    scale, weight = cand.shape(module + _SCALE), cand.shape(module + _WEIGHT)
    return "channel" if len(scale) == 2 and scale[1] == 1 and scale[0] == weight[0] else "block"
