"""fp8conv quantize: the written files, bit for bit (fp8conv.numerics and an independent reference),
byte-identical kept tensors, index/config/manifest, determinism, and the memory bound."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fp8conv import numerics
from fp8conv.config import preset
from fp8conv.quantize import quantize_checkpoint
from fp8conv.quantize_math import combine, quantize_block_chunk, quantize_channel_chunk, row_chunks
from fp8conv.recipe import Recipe
from fp8conv.synth import write_synthetic_checkpoint
from quantize_helpers import big_ckpt  # noqa: F401 - a fixture
from quantize_helpers import RECIPE, UNALIGNED, make_tensors, read_raw, ref_quantize, tensor_bytes, write_ckpt

SHAPES = [(1, 7), (83, 300), (257, 1408), (129, 3884), (128, 128), (300, 129)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _chunked(w: torch.Tensor, scheme: str):
    n, k = w.shape
    q = torch.empty(n, k, dtype=numerics.FP8_DTYPE)
    s = torch.empty((n, 1) if scheme == "channel" else (-(-n // 128), -(-k // 128)))
    stats = []
    for a, b in row_chunks(scheme, n, k):
        if scheme == "channel":
            stats.append(quantize_channel_chunk(w[a:b], q[a:b], s[a:b]))
        else:
            stats.append(quantize_block_chunk(w[a:b], q[a:b], s[a // 128: -(-b // 128)]))
    return q, s, combine(stats)


@pytest.mark.parametrize("shape,dtype,scheme", list(itertools.product(SHAPES, DTYPES, ["channel", "block"])))
def test_chunked_math_is_bit_exact(shape, dtype, scheme):
    g = torch.Generator().manual_seed(hash((shape, str(dtype), scheme)) % 2**31)
    w = (torch.randn(shape, generator=g) * 0.05)
    w[0, : max(1, shape[1] // 3)] *= 300  # wide range: subnormal FP8 codes appear in the row
    if shape[0] > 2:
        w[2] = 0
    w = w.to(dtype)
    q, s, st = _chunked(w, scheme)
    q_ref, s_ref = (numerics.quantize_channel if scheme == "channel" else numerics.quantize_block)(w)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)
    codes, scale = ref_quantize(w, scheme)
    assert np.array_equal(q.view(torch.uint8).numpy(), codes)
    assert np.array_equal(s.numpy(), scale)
    from fp8conv.metrics import rel_error, sqnr_db

    deq = numerics.dequantize(q_ref, s_ref)
    assert st["rel_error"] == pytest.approx(rel_error(deq, w), rel=1e-5)
    assert st["sqnr_db"] == pytest.approx(sqnr_db(deq, w), rel=1e-5)
    assert st["amax"] == w.float().abs().max().item()


def _check_output(src: Path, dst: Path, recipe: Recipe):
    """Every tensor of DST against SRC: quantized ones bit-exact twice over, kept ones byte-identical."""
    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        sorted(p.name for p in src.glob("*.safetensors"))
    assert sorted(p.name for p in dst.glob("*.safetensors")) == files
    manifest = json.loads((dst / "fp8conv.json").read_text())
    for fname in files:
        with safe_open(str(src / fname), "pt") as fs, safe_open(str(dst / fname), "pt") as fd:
            out_names = set(fd.keys())
            for name in fs.keys():
                w = fs.get_tensor(name)
                scheme = recipe.scheme_for(name, tuple(w.shape))
                entry = manifest["tensors"][name]
                assert (entry["scheme"], entry["shape"]) == (scheme, list(w.shape))
                if scheme == "keep":
                    assert name + "_scale" not in out_names
                    assert tensor_bytes(dst / fname, name) == tensor_bytes(src / fname, name)
                    continue
                q, s = fd.get_tensor(name), fd.get_tensor(name + "_scale")
                assert q.dtype == numerics.FP8_DTYPE and s.dtype == torch.float32
                codes, scale = ref_quantize(w, scheme)
                assert np.array_equal(q.view(torch.uint8).numpy(), codes), name
                assert np.array_equal(s.numpy(), scale), name
                assert entry["amax"] == w.float().abs().max().item()
                assert 0 < entry["rel_error"] < 0.1 and entry["sqnr_db"] > 20
    return manifest


def test_unaligned_checkpoint_bit_exact(tmp_path):
    tensors = make_tensors({**UNALIGNED, "a.norm.weight": (300,), "a.embed.weight": (11, 300)})
    src = write_ckpt(tmp_path / "src", tensors)
    recipe = Recipe.from_toml(RECIPE)
    report = quantize_checkpoint(src, tmp_path / "dst", recipe=recipe, progress=False)
    _check_output(src, tmp_path / "dst", recipe)
    assert report["tensors"] == {"channel": 3, "block": 3, "keep": 2}


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory):
    src = tmp_path_factory.mktemp("tiny") / "src"
    write_synthetic_checkpoint(src, preset("tiny"), dtype="bf16", seed=3, shard_size=1_500_000)
    (src / "tokenizer.json").write_text('{"vocab": {}}\n')
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept as is\n")
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (src / "consolidated.safetensors").write_bytes(b"weights the index does not name")
    return src


def test_sharded_onerec_output(tiny_sharded, tmp_path):
    dst = tmp_path / "fp8"
    from fp8conv.recipe import load_recipe

    recipe = load_recipe()
    report = quantize_checkpoint(tiny_sharded, dst, progress=False)
    manifest = _check_output(tiny_sharded, dst, recipe)
    # index: same shards, every output tensor (scales included) mapped to the file that holds it
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for fname in {p.name for p in dst.glob("*.safetensors")}:
        header, data = read_raw(dst / fname)
        header.pop("__metadata__", None)
        assert {n for n, f in index["weight_map"].items() if f == fname} == set(header)
    total = sum(len(read_raw(dst / f)[1]) for f in set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == total
    # other files copied byte for byte, pickle weights left out
    assert (dst / "tokenizer.json").read_bytes() == (tiny_sharded / "tokenizer.json").read_bytes()
    assert (dst / "extra" / "notes.txt").read_text() == "kept as is\n"
    assert report["skipped"] == ["consolidated.safetensors", "pytorch_model.bin"]
    assert not (dst / "pytorch_model.bin").exists() and not (dst / "consolidated.safetensors").exists()
    # manifest: tool, recipe text that parses back, source hashes
    assert manifest["tool"] == "fp8conv" and Recipe.from_toml(manifest["recipe"]["toml"]) == recipe
    for fname, digest in manifest["source"]["files"].items():
        assert hashlib.sha256((tiny_sharded / fname).read_bytes()).hexdigest() == digest
    # config.json: the source's keys plus quantization_config
    src_cfg = json.loads((tiny_sharded / "config.json").read_text())
    cfg = json.loads((dst / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    assert cfg["quantization_config"]["format"] == "float-quantized"
    assert report["tensors"]["block"] == 54 and report["tensors"]["channel"] == 36


def _digest_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_across_runs_and_threads(tiny_sharded, tmp_path):
    quantize_checkpoint(tiny_sharded, tmp_path / "a", progress=False, threads=2)
    quantize_checkpoint(tiny_sharded, tmp_path / "b", progress=False, threads=1)
    assert _digest_tree(tmp_path / "a") == _digest_tree(tmp_path / "b")


def test_cli_json_report(tiny_sharded, tmp_path):
    from quantize_helpers import run_cli

    r = run_cli("quantize", str(tiny_sharded), str(tmp_path / "o"), "--json", "--threads", "2")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["bytes_in"] > report["bytes_out"] > 0
    assert len(report["worst"]) == 5 and report["worst"][0]["rel_error"] >= report["worst"][-1]["rel_error"]
    r = run_cli("quantize", str(tiny_sharded), str(tmp_path / "p"))
    assert r.returncode == 0 and "channel" in r.stderr and "worst" in r.stderr


@pytest.mark.cuda
def test_cuda_gives_the_same_bytes(tiny_sharded, tmp_path):
    quantize_checkpoint(tiny_sharded, tmp_path / "cpu", progress=False)
    quantize_checkpoint(tiny_sharded, tmp_path / "gpu", progress=False, device="cuda")
    assert _digest_tree(tmp_path / "cpu") == _digest_tree(tmp_path / "gpu")


def _peak_rss(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()
    return usage.ru_maxrss * 1024


def test_memory_does_not_grow_with_the_checkpoint(big_ckpt, tmp_path):
    """~400 MB of weights: the converter's peak RSS above a bare `import torch, fp8conv.quantize`
    must stay well under the checkpoint size (a few tensors in flight, no mmap)."""
    size = sum(p.stat().st_size for p in big_ckpt.glob("*.safetensors"))
    base = _peak_rss([sys.executable, "-c", "import torch, numpy, fp8conv.quantize"])
    peak = _peak_rss([sys.executable, "-m", "fp8conv.cli", "quantize", str(big_ckpt), str(tmp_path / "o"),
                      "--json"])
    growth = peak - base
    assert growth < 0.5 * size, f"peak RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_cuda_math_matches_cpu_bit_for_bit(scheme):
    from fp8conv.quantize_stream import quantize_tensor

    vals = torch.arange(0, 127, dtype=torch.uint8).view(numerics.FP8_DTYPE).float()
    ties = torch.cat([(vals[1:] + vals[:-1]) / 2, -(vals[1:] + vals[:-1]) / 2])  # round-half-even cases
    assert torch.equal(ties.to(numerics.FP8_DTYPE).view(torch.uint8),
                       ties.cuda().to(numerics.FP8_DTYPE).cpu().view(torch.uint8))
    for (shape, dtype) in itertools.product(SHAPES, DTYPES):
        w = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.03).to(dtype)
        q1, s1, a = quantize_tensor(w, scheme)
        q2, s2, b = quantize_tensor(w, scheme, "cuda")
        assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2), (shape, dtype)
        assert f"{a['rel_error']:.4g}" == f"{b['rel_error']:.4g}", (shape, dtype)


def test_bundled_example_folder_quantizes_and_data_files_are_copied(tmp_path):
    # `fp8conv example` writes model.safetensors beside contexts.safetensors and catalogue.safetensors:
    # only model.safetensors holds weights; the others are data and must come through byte for byte.
    import shutil
    from importlib.resources import files

    src = tmp_path / "ex"
    shutil.copytree(str(files("fp8conv.data") / "onerec_example"), src)
    dst = tmp_path / "ex8"
    quantize_checkpoint(src, dst, progress=False)
    for name in ("contexts.safetensors", "catalogue.safetensors"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith(".weight_scale") for k in keys)
    assert not (dst / "model.safetensors.index.json").exists()
