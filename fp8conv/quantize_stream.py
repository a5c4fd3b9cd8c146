"""One shard through the converter: reader thread -> quantize (worker pool) -> writer thread.

Bounded queues (in bytes) between the stages keep a few tensors in memory at a time. Any stage's
error stops the others and is re-raised in the calling thread; KeyboardInterrupt (Ctrl-C, or SIGTERM
through ``interrupt_on_sigterm``) does the same.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8conv.checkpoint import StreamWriter, read_into, torch_dtype
from fp8conv.errors import UserError
from fp8conv.numerics import BLOCK, FP8_DTYPE
from fp8conv.quantize_math import combine, quantize_block_chunk, quantize_channel_chunk, row_chunks
from fp8conv.quantize_plan import SCALE_SUFFIX, FilePlan, TensorPlan, scale_shape

QUEUE_BYTES = 64 * 1024 * 1024  # per queue; a larger tensor still passes, alone. Enough to overlap stages
_END = object()


class _Stopped(Exception):
    """Another stage failed or the run was interrupted."""


class _ByteQueue:
    def __init__(self, budget: int, stop: threading.Event):
        self._items: collections.deque = collections.deque()
        self._bytes, self._budget, self._stop = 0, budget, stop
        self._cond = threading.Condition()

    def put(self, item, nbytes: int) -> None:
        with self._cond:
            while self._items and self._bytes + nbytes > self._budget:
                if self._stop.is_set():
                    raise _Stopped
                self._cond.wait(0.1)
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()

    def get(self):
        with self._cond:
            while not self._items:
                if self._stop.is_set():
                    raise _Stopped
                self._cond.wait(0.1)
            item, nbytes = self._items.popleft()
            self._bytes -= nbytes
            self._cond.notify_all()
            return item


class _Stage(threading.Thread):
    """A daemon thread that records its exception and stops the pipeline."""

    def __init__(self, target, stop: threading.Event, name: str):
        super().__init__(daemon=True, name=name)
        self._fn, self._stop_event, self.error = target, stop, None

    def run(self) -> None:
        try:
            self._fn()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            self.error = e
            self._stop_event.set()


def convert_file(fplan: FilePlan, out_path: Path, device: str, threads: int, stats: dict, progress) -> str:
    """Write ``out_path`` from ``fplan``; fills ``stats[name]`` for quantized tensors; returns the
    sha256 of the source file (hashed as it is read: the tensors tile it, so nothing is read twice)."""
    stop = threading.Event()
    inq, outq = _ByteQueue(QUEUE_BYTES, stop), _ByteQueue(QUEUE_BYTES, stop)
    sha = hashlib.sha256()
    writer = StreamWriter(out_path, fplan.out_entries(), fplan.header.metadata)
    reader_t = _Stage(lambda: _read(fplan, inq, sha), stop, "fp8conv-reader")
    writer_t = _Stage(lambda: _write(writer, outq, stats), stop, "fp8conv-writer")
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="fp8conv-quant")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallelism comes from the pool; one thread per op keeps sums in order
    reader_t.start()
    writer_t.start()
    try:
        progress.advance(fplan.header.data_start, info=fplan.name)
        for i, t in enumerate(fplan.tensors, 1):
            buf = _get(inq)
            # the writer waits for the chunks while this loop already submits the next tensor's
            outq.put(_submit(fplan, t, buf, device, pool), buf.numel() + _nbytes_out(t))
            progress.advance(buf.numel(), info=f"{fplan.name} {i}/{len(fplan.tensors)} {t.name}")
            del buf
        outq.put(_END, 0)
        writer_t.join()
        for stage in (reader_t, writer_t):
            if stage.error is not None:
                raise stage.error
        writer.close()
        return sha.hexdigest()
    except _Stopped:
        for stage in (reader_t, writer_t):
            if stage.error is not None:
                raise stage.error from None
        raise
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        reader_t.join()
        writer_t.join()
        writer.abort()
        torch.set_num_threads(prev_threads)


def _get(q: _ByteQueue):
    item = q.get()
    if item is _END:  # internal invariant: the reader ends after the last planned tensor
        raise RuntimeError("reader ended early")
    return item


def _read(fplan: FilePlan, q: _ByteQueue, sha) -> None:
    h = fplan.header
    fd = os.open(h.path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        sha.update(os.pread(fd, h.data_start, 0))
        for info in h.tensors:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            read_into(fd, h, info, buf.numpy())
            sha.update(buf.numpy())
            q.put(buf, info.nbytes)
    finally:
        os.close(fd)


def _write(writer: StreamWriter, q: _ByteQueue, stats: dict) -> None:
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, _Pending):
            item = item.finish(stats)
        for name, data in item:
            writer.write(name, data)


def _nbytes_out(t: TensorPlan) -> int:
    return sum(e.nbytes for e in t.out_entries())


def _as_bytes(t: torch.Tensor):
    return t.reshape(-1).view(torch.uint8).numpy()


@dataclass
class _Pending:
    """A tensor being quantized on the pool: the writer thread finishes it, in file order."""

    path: Path
    t: TensorPlan
    source: torch.Tensor  # keeps the source bytes alive until every chunk is done
    q: torch.Tensor
    s: torch.Tensor
    results: list  # futures of ChunkStats, or ChunkStats

    def finish(self, stats: dict) -> list:
        st = combine([r.result() if hasattr(r, "result") else r for r in self.results])
        if not math.isfinite(st["amax"]):
            raise UserError(f"{self.path}: tensor {self.t.name!r} holds NaN or Inf values; "
                            f"it cannot be quantized")
        if bool((self.s == 0).any()):  # amax / 448 underflowed: x / 0 would write NaN codes
            raise UserError(f"{self.path}: tensor {self.t.name!r} has a row or block whose largest |value| "
                            f"is below 448 * 2^-149 (float32 subnormal): its scale amax / 448 is 0 and it "
                            f"cannot be quantized; keep it in the recipe")
        # 4 significant digits: the sums' last bits depend on the device's summation order (CPU:
        # float32 row dots, ~1e-9 relative; GPU: float64), and the manifest should be byte-identical
        # whether the conversion ran on the CPU or a GPU (6 digits differed in 1 of ~2000 tensors)
        stats[self.t.name] = {"amax": st["amax"], "rel_error": _round(st["rel_error"]),
                              "sqnr_db": _round(st["sqnr_db"])}
        q, s = self.q.cpu(), self.s.cpu()
        return [(self.t.name, _as_bytes(q)), (self.t.name + SCALE_SUFFIX, _as_bytes(s))]


def _submit(fplan: FilePlan, t: TensorPlan, buf: torch.Tensor, device: str, pool):
    if t.scheme == "keep":
        return [(t.name, buf.numpy())]  # the source bytes, untouched
    n, k = t.shape
    w = buf.view(torch_dtype(t.dtype)).view(n, k)
    if device != "cpu":  # one synchronous whole-tensor pass on the GPU
        w = w.to(device)
    q, s, jobs = _chunk_jobs(w, t.scheme)
    results = [pool.submit(j) for j in jobs] if device == "cpu" else [j() for j in jobs]
    return _Pending(fplan.header.path, t, buf, q, s, results)


def _chunk_jobs(w: torch.Tensor, scheme: str):
    n, k = w.shape
    q = torch.empty((n, k), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(scale_shape(scheme, (n, k)), dtype=torch.float32, device=w.device)
    if scheme == "channel":
        jobs = [functools.partial(quantize_channel_chunk, w[a:b], q[a:b], s[a:b])
                for a, b in row_chunks(scheme, n, k, w.device.type)]
    else:
        jobs = [functools.partial(quantize_block_chunk, w[a:b], q[a:b], s[a // BLOCK: -(-b // BLOCK)])
                for a, b in row_chunks(scheme, n, k, w.device.type)]
    return q, s, jobs


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


def quantize_tensor(w: torch.Tensor, scheme: str, device: str = "cpu", pool=None):
    """w [N, K] -> (q fp8 [N, K], scale float32, stats), returned on the CPU; chunks run on ``pool``."""
    if device != "cpu":
        w = w.to(device)
    q, s, jobs = _chunk_jobs(w, scheme)
    results = list(pool.map(lambda j: j(), jobs)) if pool is not None else [j() for j in jobs]
    return q.cpu(), s.cpu(), combine(results)


@contextmanager
def interrupt_on_sigterm():
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread (like Ctrl-C), so the same
    cleanup runs. A no-op outside the main thread (signals can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
