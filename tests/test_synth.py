"""fp8conv synth: every spec tensor present with the right shape and dtype, deterministic, sharding
with a consistent index, config round-trip, and safe folder handling."""

import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open

from fp8conv.cli import main
from fp8conv.config import PRESETS, load_config, tensor_specs
from fp8conv.errors import UserError
from fp8conv.synth import init_tensor, plan_shards, write_synthetic_checkpoint

TINY = PRESETS["tiny"]


def _read_all(folder):
    """name -> (tensor, file) over every safetensors file of the folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = (h.get_tensor(k), f.name)
    return out


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_every_spec_tensor_present(tmp_path, dtype, torch_dtype):
    out = write_synthetic_checkpoint(tmp_path / "ck", TINY, dtype=dtype, seed=3)
    tensors = _read_all(out)
    specs = tensor_specs(TINY)
    assert set(tensors) == set(specs)
    for name, shape in specs.items():
        t, _ = tensors[name]
        assert tuple(t.shape) == shape, name
        assert t.dtype == torch_dtype, name
        assert torch.isfinite(t.float()).all(), name
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    cfg = load_config(out)
    assert cfg == TINY.__class__(**{**TINY.__dict__, "torch_dtype": cfg.torch_dtype})
    assert cfg.torch_dtype == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert json.loads((out / "config.json").read_text())["model_type"] == "onerec_v2"


def test_deterministic_and_seed_dependent(tmp_path):
    a = write_synthetic_checkpoint(tmp_path / "a", TINY, seed=7)
    b = write_synthetic_checkpoint(tmp_path / "b", TINY, seed=7)
    c = write_synthetic_checkpoint(tmp_path / "c", TINY, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_values_do_not_depend_on_sharding(tmp_path):
    one = _read_all(write_synthetic_checkpoint(tmp_path / "one", TINY, seed=1))
    many = _read_all(write_synthetic_checkpoint(tmp_path / "many", TINY, seed=1, shard_size=300_000))
    assert set(one) == set(many)
    for name in one:
        assert torch.equal(one[name][0], many[name][0]), name


def test_sharded_index_is_consistent(tmp_path):
    shard = 700_001  # not a multiple of any tensor size
    out = write_synthetic_checkpoint(tmp_path / "ck", TINY, dtype="fp16", shard_size=shard)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _read_all(out)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert index["weight_map"] == {k: f for k, (_, f) in tensors.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t, _ in tensors.values())
    for f in files:  # every shard within the limit unless it holds one oversized tensor
        names = [k for k, (_, g) in tensors.items() if g == f]
        size = sum(tensors[k][0].numel() * 2 for k in names)
        assert size <= shard or len(names) == 1, f


def test_plan_shards_oversized_and_order():
    plan = plan_shards({"a": 5, "b": 20, "c": 3, "d": 4}, 10)
    assert plan == [["a"], ["b"], ["c", "d"]]
    with pytest.raises(UserError):
        plan_shards({"a": 1}, 0)


def test_init_scales_are_llm_like():
    """Figure 1 of the paper: OneRec-V2 / Qwen3 weights have variance < 0.1 and AbsMax about 2."""
    w = init_tensor("model.layers.0.self_attn.q_proj.weight", (389, 1031), seed=5)
    assert w.var().item() < 0.1
    assert 0.5 <= w.abs().max().item() <= 2.0
    assert abs(w.std().item() - 1 / math.sqrt(1031)) < 0.5 / math.sqrt(1031)
    norm = init_tensor("model.norm.weight", (300,), seed=5)
    assert abs(norm.mean().item() - 1.0) < 0.02
    router = init_tensor("model.layers.3.mlp.gate.weight", (53, 1408), seed=5)
    assert router.abs().max().item() < 0.1
    # per-name generators: same name same values, other name other values
    assert torch.equal(w, init_tensor("model.layers.0.self_attn.q_proj.weight", (389, 1031), seed=5))
    assert not torch.equal(w, init_tensor("model.layers.0.self_attn.k_proj.weight", (389, 1031), seed=5))


def test_existing_dir_needs_force(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        write_synthetic_checkpoint(out, TINY)
    assert (out / "keep.txt").exists()
    write_synthetic_checkpoint(out, TINY, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folders left behind


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    import fp8conv.synth as synth

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_replace_dir", boom)
    with pytest.raises(RuntimeError):
        write_synthetic_checkpoint(tmp_path / "ck", TINY)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "ck"), "--preset", "tiny", "--dtype", "fp16", "--seed", "2",
                 "--shard-size", "1MB", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params_total"] == sum(math.prod(s) for s in tensor_specs(TINY).values())
    assert len(summary["files"]) > 1
    assert main(["synth", str(tmp_path / "ck")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x"), "--shard-size", "lots"]) == 2
    assert "--shard-size" in capsys.readouterr().err


def test_out_below_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot create"):
        write_synthetic_checkpoint(tmp_path / "afile" / "ck", TINY)


def test_force_interrupted_at_the_rename_keeps_the_old_folder(tmp_path, monkeypatch):
    import os

    import fp8conv.atomic as atomic

    out = tmp_path / "ck"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace

    def interrupted(a, b):
        if os.path.basename(a).startswith(".ck.tmp-"):
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_checkpoint(out, TINY, force=True)
    assert (out / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_force_when_out_cannot_be_moved_leaves_no_trash(tmp_path, monkeypatch):
    import errno
    import os

    import fp8conv.atomic as atomic

    out = tmp_path / "ck"
    out.mkdir()
    real = os.replace

    def busy(a, b):
        if str(a) == str(out):
            raise OSError(errno.EBUSY, "Device or resource busy", str(a))
        return real(a, b)

    monkeypatch.setattr(atomic.os, "replace", busy)
    with pytest.raises(UserError, match="busy"):
        write_synthetic_checkpoint(out, TINY, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError: it was a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match="No space left on device"):
        write_synthetic_checkpoint(tmp_path / "ck", TINY)
    assert list(tmp_path.iterdir()) == []


def test_shard_size_overflow_is_a_user_error():
    from fp8conv.commands.synth import parse_size

    with pytest.raises(UserError, match="--shard-size"):
        parse_size("1e400")
    assert parse_size("1.5GB") == 1_500_000_000
