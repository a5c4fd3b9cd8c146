"""Shared by the test_quantize* / test_checkpoint tests: small checkpoints written with safetensors,
header surgery for bad inputs, and an FP8 reference independent of torch's cast."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
# Shapes of the tests' own checkpoints: unaligned on purpose (1, 7, 83, 129, 300, 3884-ish).
UNALIGNED = {"a.q_proj.weight": (83, 300), "a.k_proj.weight": (1, 7), "a.o_proj.weight": (257, 129),
             "b.experts.0.up_proj.weight": (300, 83), "b.experts.1.up_proj.weight": (129, 257),
             "b.experts.2.up_proj.weight": (128, 128)}
RECIPE = """name = "test"
default = "keep"
[[rules]]
pattern = "*.experts.*.weight"
scheme = "block"
[[rules]]
pattern = 're:a\\..*_proj\\.weight'
scheme = "channel"
"""


def make_tensors(shapes: dict, dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.05
        if len(shape) == 2 and shape[0] > 3:
            t[2] = 0  # an all-zero row: scale 1
            t[3, : shape[1] // 2] *= 40  # a row with a large range
        out[name] = t.to(dtype)
    return out


def write_ckpt(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None,
               extra_files: dict[str, str] | None = None) -> Path:
    """A HF-style folder: config.json plus one safetensors file, or ``shards`` shards and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    config = config or {"model_type": "test", "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    for rel, text in (extra_files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit(header_dict)`` to a safetensors file's JSON header, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def run_cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fp8conv.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def read_raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def tensor_bytes(path: Path, name: str) -> bytes:
    header, data = read_raw(path)
    b, e = header[name]["data_offsets"]
    return data[b:e]


# -- an FP8 reference that shares nothing with torch's cast or fp8conv.numerics ---------------------

def _e4m3_table() -> tuple[np.ndarray, np.ndarray]:
    """All finite non-negative e4m3fn values (from the bit layout) and their codes, ascending."""
    vals, codes = [], []
    for code in range(0x7F):  # 0x7F is NaN
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
        codes.append(code)
    return np.array(vals, dtype=np.float64), np.array(codes, dtype=np.uint8)


_VALS, _CODES = _e4m3_table()


def ref_cast_e4m3(y: np.ndarray) -> np.ndarray:
    """float32 values already in [-448, 448] -> e4m3fn codes, round to nearest, ties to the even code."""
    a = np.abs(y.astype(np.float64))
    hi = np.clip(np.searchsorted(_VALS, a), 1, len(_VALS) - 1)
    lo = hi - 1
    dlo, dhi = a - _VALS[lo], _VALS[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (_CODES[hi] % 2 == 0))
    pick_hi |= a >= _VALS[-1]
    code = np.where(pick_hi, _CODES[hi], _CODES[lo])
    code = np.where(a == 0, 0, code).astype(np.uint8)
    return code | np.where(np.signbit(y), 0x80, 0).astype(np.uint8)


def ref_quantize(w: torch.Tensor, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [N, K], scale float32) by DESIGN's contract, in numpy float32."""
    x = w.float().numpy().astype(np.float32)
    n, k = x.shape
    if scheme == "channel":
        amax = np.abs(x).max(axis=1, keepdims=True)
        scale = np.where(amax == 0, np.float32(1), amax / np.float32(448)).astype(np.float32)
        full = scale
    else:
        nb, kb = -(-n // 128), -(-k // 128)
        scale = np.ones((nb, kb), dtype=np.float32)
        for i in range(nb):
            for j in range(kb):
                amax = np.abs(x[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max()
                scale[i, j] = 1 if amax == 0 else np.float32(amax) / np.float32(448)
        full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:n, :k]
    y = np.clip(x / full, np.float32(-448), np.float32(448)).astype(np.float32)
    return ref_cast_e4m3(y), scale


# -- a moderately large checkpoint (memory bound, interruption), built once per session ------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def big_ckpt(tmp_path_factory) -> Path:
    """~400 MB of bf16 OneRec-named weights in 2 shards (names the built-in recipe claims)."""
    folder = tmp_path_factory.getbasetemp() / "quantize-big-ckpt"
    if (folder / "config.json").exists():
        return folder
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for i in range(12):
        q = torch.randn(2048, 4096, generator=g) * 0.02
        up = torch.randn(2000, 4000, generator=g) * 0.02
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = q.bfloat16()
        tensors[f"model.layers.{i}.mlp.experts.0.up_proj.weight"] = up.bfloat16()
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(4096).bfloat16()
    write_ckpt(folder, tensors, shards=2)
    return folder
