"""Safetensors checkpoints without loading them: header parsing, shard index checks, reading one tensor
at a time, and a streaming writer.

Why not ``safetensors.safe_open``: it maps the file, and mapped pages count in RSS, so converting an
8 GB checkpoint would "use" 8 GB. Here every tensor is read with ``os.preadv`` into a buffer we own and
dropped when done; headers are parsed and checked (lengths, dtypes, shapes, offsets against the file
size and each other) before anything is written.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data; offsets are relative to the end of the header and the tensors tile the data with no gap.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from fp8conv.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
# A header larger than this is not a checkpoint header (safetensors itself refuses > 100 MB).
MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype -> bytes per element
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0")
FLOAT_DTYPES = ("F16", "BF16", "F32")  # what fp8conv quantizes


def torch_dtype(st_dtype: str):
    import torch

    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
            "F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
            "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}[st_dtype]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    begin: int  # data offsets, relative to the end of the header
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # 8 + header length: file offset of the first tensor byte
    tensors: tuple[TensorInfo, ...]  # in data-offset order (the order of the bytes in the file)
    metadata: dict | None
    file_size: int

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


def read_header(path: str | Path) -> Header:
    """Parse and check one safetensors header; reads only the header bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: truncated: {size} bytes, not even a safetensors header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: header length {n} does not fit the file ({size} bytes): "
                                f"truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: header is not valid JSON ({e})") from None
    except RecursionError:  # e.g. [[[[...]]]] nested deeper than the JSON parser recurses
        raise UserError(f"{path}: header is not a safetensors header (JSON nested too deeply)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise UserError(f"{path}: __metadata__ must map strings to strings")
    tensors = sorted((_tensor_info(path, k, v) for k, v in obj.items()), key=lambda t: (t.begin, t.end))
    _check_tiling(path, tensors, size - 8 - n)
    return Header(path, 8 + n, tuple(tensors), metadata, size)


def _tensor_info(path: Path, name: str, entry) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise UserError(f"{where}: header entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEMSIZE:
        raise UserError(f"{where}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise UserError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    if info.nbytes != info.numel * ITEMSIZE[dtype]:
        raise UserError(f"{where}: data_offsets span {info.nbytes} bytes but {dtype}{list(shape)} needs "
                        f"{info.numel * ITEMSIZE[dtype]}")
    return info


def _check_tiling(path: Path, tensors: list[TensorInfo], data_size: int) -> None:
    """The tensors must tile [0, data_size) exactly: no overlap, no gap, nothing past the end."""
    pos = 0
    for t in tensors:
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else f"leaves a gap at byte {pos}"
            raise UserError(f"{path}: tensor {t.name!r} data_offsets {[t.begin, t.end]} {what}")
        pos = t.end
    if pos > data_size:
        raise UserError(f"{path}: truncated: the header needs {pos} data bytes, the file has {data_size}")
    if pos < data_size:
        raise UserError(f"{path}: {data_size - pos} unexpected bytes after the last tensor")


def read_index(path: str | Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a shard index, checked for shape only."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{path}: not a shard index (JSON nested too deeply)") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise UserError(f"{path}: 'weight_map' must map tensor names to shard file names")
    for f in set(wm.values()):
        if "/" in f or "\\" in f or f in ("", ".", ".."):
            raise UserError(f"{path}: shard name {f!r} is not a plain file name")
    return wm


def check_index(index_path: Path, weight_map: dict[str, str], headers: dict[str, Header]) -> None:
    """Index and shards must agree: every listed tensor in its shard, every shard tensor listed."""
    problems = []
    for name, fname in weight_map.items():
        if fname in headers and name not in headers[fname].names():
            problems.append(f"tensor {name!r} is listed in {fname} but that shard does not hold it")
    for fname, h in headers.items():
        for name in h.names():
            if weight_map.get(name) != fname:
                where = f"listed in {weight_map[name]}" if name in weight_map else "missing from the index"
                problems.append(f"tensor {name!r} of shard {fname} is {where}")
    if problems:
        raise UserError(f"{index_path}: does not match the shards:\n  " + "\n  ".join(problems[:20])
                        + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def read_into(fd: int, header: Header, info: TensorInfo, out) -> None:
    """Read one tensor's bytes into ``out`` (a writable buffer of ``info.nbytes`` bytes)."""
    view = memoryview(out).cast("B")
    pos, off = 0, header.data_start + info.begin
    while pos < info.nbytes:
        n = os.preadv(fd, [view[pos:]], off + pos)
        if n == 0:
            raise UserError(f"{header.path}: truncated while reading tensor {info.name!r}")
        pos += n


@dataclass(frozen=True)
class OutEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def build_header(entries: list[OutEntry], metadata: dict | None) -> bytes:
    """The header bytes (length prefix included) for tensors written in ``entries`` order.

    Padded with spaces to a multiple of 8 bytes, as safetensors does, so data stays aligned."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    pos = 0
    for e in entries:
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


class StreamWriter:
    """Writes a safetensors file front to back: the header (computed from the plan) first, then each
    tensor's bytes in ``entries`` order. ``close`` checks that every byte the header promised came."""

    def __init__(self, path: Path, entries: list[OutEntry], metadata: dict | None):
        self.path, self.entries = path, entries
        self._next = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            self._write(build_header(entries, metadata))
        except BaseException:  # a full disk already at the header: do not leak the descriptor
            self.abort()
            raise

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def write(self, name: str, data) -> None:
        e = self.entries[self._next]
        size = memoryview(data).nbytes
        if e.name != name or size != e.nbytes:  # internal invariant: the plan and the data disagree
            raise RuntimeError(f"{self.path}: expected {e.name} ({e.nbytes} B), got {name} ({size} B)")
        self._write(data)
        self._next += 1

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)
        if self._next != len(self.entries):
            raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self.entries)} tensors")

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
