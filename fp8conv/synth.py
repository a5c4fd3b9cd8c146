"""Random-initialised OneRec-V2 checkpoints (``fp8conv synth``): for trying the tool and for benchmarks.

Every tensor of ``config.tensor_specs`` is drawn with an LLM-like scale, so the weight statistics look
like the paper's Figure 1 for OneRec-V2 / Qwen3 (variance well below 0.1, AbsMax around 1-2):

- Linear weights [N, K]: normal, std 1/sqrt(K); a few input channels (about 1 in 256) scaled 3-8x, as
  trained LLMs have for their massive-activation channels; and two "super weights" of magnitude
  0.5-2.0. These make per-channel and per-block ranges realistic rather than Gaussian-tame.
- Embeddings: normal, std 0.02. Norm weights: 1 + N(0, 0.05). Router: std 0.01 (logits near 0, as a
  freshly balanced sigmoid router). Correction bias: N(0, 1e-3).

Determinism: each tensor has its own torch.Generator seeded from sha256(seed, name), so its values
depend only on (seed, name, shape, dtype), not on the order of generation or on the shard size.

Streaming: tensors are generated one shard at a time (at most one shard in memory) and each shard is
written before the next is drawn; the whole folder is written into a temporary sibling and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from fp8conv.atomic import replace_dir as _replace_dir  # a module name tests can patch
from fp8conv.atomic import temp_sibling, umask_modes
from fp8conv.config import OneRecConfig, tensor_specs
from fp8conv.errors import UserError

DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp16": (torch.float16, "float16"),
          "fp32": (torch.float32, "float32")}
DEFAULT_SHARD_SIZE = 2 * 10**9
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for one tensor (stable across Python runs, unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _kind(name: str, shape: tuple[int, ...]) -> str:
    if name.endswith("e_score_correction_bias"):
        return "bias"
    if len(shape) == 1:
        return "norm"
    if name.endswith(".mlp.gate.weight"):
        return "router"
    if "embed" in name:
        return "embedding"
    return "linear"


def init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The float32 values of one tensor (see the module docstring for the scales)."""
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    kind = _kind(name, shape)
    w = torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "bias":
        return w.mul_(1e-3)
    if kind == "norm":
        return w.mul_(0.05).add_(1.0)
    if kind == "router":
        return w.mul_(0.01)
    if kind == "embedding":
        return w.mul_(0.02)
    n, k = shape
    w.mul_(1.0 / math.sqrt(k))
    # Outlier input channels: the columns that meet LLMs' massive-activation channels.
    n_cols = max(1, k // 256)
    cols = torch.randint(0, k, (n_cols,), generator=g)
    mult = torch.empty(n_cols).uniform_(3.0, 8.0, generator=g)
    w[:, cols] *= mult
    # Super weights: a couple of single large entries that set AbsMax (about 2 in trained models).
    rows = torch.randint(0, n, (2,), generator=g)
    cols2 = torch.randint(0, k, (2,), generator=g)
    mag = torch.empty(2).uniform_(0.5, 2.0, generator=g)
    sign = torch.randint(0, 2, (2,), generator=g).float().mul_(2).sub_(1)
    w[rows, cols2] = mag * sign
    return w


def plan_shards(sizes: dict[str, int], shard_size: int) -> list[list[str]]:
    """Greedy, in spec order: a new shard starts when the next tensor would overflow this one.
    A tensor larger than shard_size gets a shard of its own."""
    if shard_size <= 0:
        raise UserError(f"--shard-size must be positive, got {shard_size}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_synthetic_checkpoint(out_dir: str | Path, cfg: OneRecConfig, dtype: str = "bf16", seed: int = 0,
                               shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False,
                               progress: bool = False) -> Path:
    """Write a random-initialised checkpoint of ``cfg`` to ``out_dir`` and return its path.

    One ``model.safetensors`` when everything fits in ``shard_size`` bytes, otherwise
    ``model-XXXXX-of-YYYYY.safetensors`` shards plus ``model.safetensors.index.json``.
    An existing ``out_dir`` is an error unless ``force``; then it is replaced only after the new one
    is complete.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype, dtype_name = DTYPES[dtype]
    out = Path(out_dir)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (use --force to replace it)")
    cfg = dataclasses.replace(cfg, torch_dtype=dtype_name)
    specs = tensor_specs(cfg)
    elem = torch.empty((), dtype=torch_dtype).element_size()
    sizes = {name: math.prod(shape) * elem for name, shape in specs.items()}
    shards = plan_shards(sizes, shard_size)
    files = shard_file_names(len(shards))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(out, "tmp")
    except OSError as e:  # a path component is a file, a read-only folder, ...
        raise UserError(f"{out.parent}: cannot create the output there ({e.strerror})") from None
    try:
        bar = _progress(progress, sum(sizes.values()))
        with bar as p:
            for fname, names in zip(files, shards):
                tensors = {n: init_tensor(n, specs[n], seed).to(torch_dtype) for n in names}
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                p.advance(sum(sizes[n] for n in names), info=fname)
                del tensors
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        umask_modes(tmp)
        _replace_dir(tmp, out)
    except (OSError, SafetensorError) as e:  # a full disk (safetensors reports it as its own error), ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: cannot write the checkpoint ({e}); nothing was written there") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _progress(enabled: bool, total: int):
    from fp8conv.ui import progress

    return progress("synth", total, "B", quiet=not enabled)
