"""fp8conv.checkpoint: header parsing without reading data, index checks, pread, the streaming writer."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8conv.checkpoint import (OutEntry, StreamWriter, build_header, check_index, read_header, read_index,
                                read_into, torch_dtype)
from fp8conv.errors import UserError
from quantize_helpers import make_tensors, rewrite_header

SHAPES = {"a.weight": (83, 300), "b.weight": (1, 7), "c.bias": (129,), "d.scalar": (), "e.weight": (3, 0, 5)}


@pytest.fixture
def st_file(tmp_path):
    tensors = make_tensors({k: v for k, v in SHAPES.items()})
    tensors["i.ids"] = torch.arange(11, dtype=torch.int64)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_header_matches_safetensors(st_file):
    path, tensors = st_file
    h = read_header(path)
    assert h.metadata == {"format": "pt"} and h.file_size == path.stat().st_size
    assert set(h.names()) == set(tensors)
    with safe_open(str(path), "pt") as f, open(path, "rb") as raw:
        for info in h.tensors:
            assert list(info.shape) == f.get_slice(info.name).get_shape()
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            read_into(raw.fileno(), h, info, buf.numpy())
            got = buf.view(torch_dtype(info.dtype)).view(info.shape) if info.nbytes else buf
            want = f.get_tensor(info.name)
            assert got.numel() == want.numel() and torch.equal(got.reshape(-1), want.reshape(-1))


def test_header_read_touches_only_the_header(st_file, monkeypatch):
    import fp8conv.checkpoint as ck

    path, _ = st_file
    got = []

    class Counting:
        def __init__(self, *a):
            self.f = open(*a)

        def read(self, n=-1):
            data = self.f.read(n)
            got.append(len(data))
            return data

        def fileno(self):
            return self.f.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ck, "open", Counting, raising=False)
    read_header(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert sum(got) == 8 + n < path.stat().st_size


@pytest.mark.parametrize("cut,word", [(4, "truncated"), (20, "does not fit"), (-1, "truncated")])
def test_truncated(st_file, cut, word):
    path, _ = st_file
    raw = path.read_bytes()
    path.write_bytes(raw[:cut] if cut > 0 else raw[:cut])
    with pytest.raises(UserError, match=word) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_trailing_bytes(st_file):
    path, _ = st_file
    path.write_bytes(path.read_bytes() + b"xx")
    with pytest.raises(UserError, match="unexpected bytes"):
        read_header(path)


@pytest.mark.parametrize("edit,word", [
    (lambda h: h["a.weight"].update(dtype="F4"), "unsupported dtype"),
    (lambda h: h["a.weight"].update(shape=[83, -1]), "non-negative"),
    (lambda h: h["a.weight"].update(data_offsets=[5, 1]), "begin <= end"),
    (lambda h: h["a.weight"].update(extra=1), "exactly dtype"),
    (lambda h: h.update({"__metadata__": {"x": 1}}), "__metadata__"),
    (lambda h: h["b.weight"].update(shape=[2, 7]), "needs"),
])
def test_bad_entries(st_file, edit, word):
    path, _ = st_file
    rewrite_header(path, edit)
    with pytest.raises(UserError, match=word):
        read_header(path)


def test_index_checks(tmp_path, st_file):
    path, tensors = st_file
    h = {path.name: read_header(path)}
    good = {n: path.name for n in tensors}
    check_index(tmp_path / "i.json", good, h)
    with pytest.raises(UserError, match="missing from the index"):
        check_index(tmp_path / "i.json", {k: v for k, v in good.items() if k != "a.weight"}, h)
    with pytest.raises(UserError, match="does not hold it"):
        check_index(tmp_path / "i.json", {**good, "ghost": path.name}, h)
    bad = tmp_path / "bad.json"
    for text, word in [("{", "not valid JSON"), ('{"weight_map": []}', "weight_map"),
                       ('{"weight_map": {"a": "../x"}}', "plain file name")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=word):
            read_index(bad)


def test_stream_writer_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(83, 300, generator=g).to(torch.float8_e4m3fn),
               "w_scale": torch.rand(83, 1, generator=g), "n": torch.randn(7, generator=g).bfloat16(),
               "s": torch.tensor(3.0)}
    dtypes = {"w": "F8_E4M3", "w_scale": "F32", "n": "BF16", "s": "F32"}
    entries = [OutEntry(k, dtypes[k], tuple(v.shape)) for k, v in tensors.items()]
    path = tmp_path / "out.safetensors"
    w = StreamWriter(path, entries, {"format": "pt"})
    for k, v in tensors.items():
        w.write(k, v.reshape(-1).view(torch.uint8).numpy())
    w.close()
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (8 + n) % 8 == 0  # data aligned like safetensors' own files
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k).reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    assert read_header(path).names() == list(tensors)  # written in plan order


def test_stream_writer_refuses_out_of_plan(tmp_path):
    w = StreamWriter(tmp_path / "o.safetensors", [OutEntry("a", "F32", (2,))], None)
    with pytest.raises(RuntimeError):
        w.write("b", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError):
        w.close()  # closed before every planned tensor came
    assert build_header([], None)[:8] == struct.pack("<Q", len(build_header([], None)) - 8)


def test_deeply_nested_json_is_a_user_error(tmp_path):
    """json.loads raises RecursionError (not ValueError) on [[[[...]]]]: it was a traceback."""
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(UserError, match="model.safetensors"):
        read_header(p)
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_bytes(deep)
    with pytest.raises(UserError, match="index.json"):
        read_index(idx)


def test_stream_writer_closes_its_file_when_the_header_fails(tmp_path, monkeypatch):
    import errno
    import os

    import fp8conv.checkpoint as ck

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(ck.os, "write", full)
    for i in range(5):
        with pytest.raises(OSError):
            StreamWriter(tmp_path / f"o{i}.safetensors", [OutEntry("a", "F32", (2,))], None)
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before
