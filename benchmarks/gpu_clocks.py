"""SM clock and board power while a benchmark runs, read through NVML (libnvidia-ml, the library
nvidia-smi uses, by ctypes: no Python package needed) by a background thread every few milliseconds.

    with ClockSampler() as cs:
        with cs.phase("fp8 gate/up"):
            time_us(...)
    cs.summary("fp8 gate/up")  # {"mhz": median SM clock, "w": median power, "samples": n} or None

Why: an H100 at its 700 W cap runs the large grouped GEMMs at 1200-1980 MHz (2026-11-25, median ~1500), so
a kernel's time moves with the clock the card allows it, and A/B sides timed at different moments see
different clocks. The summary says what clock each side ran at. Power is NVML's reading (on Hopper an
average over a short window), the clock is the current SM clock. Unavailable NVML (no driver, another
OS) gives None summaries, never an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import threading
import time

_NVML_CLOCK_SM = 1


class ClockSampler:
    def __init__(self, index: int = 0, period_s: float = 0.005):
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []  # (time, MHz, mW)
        self.phases: dict[str, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = None
        self._lib = self._handle = None
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return
            handle = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
                return
            self._lib, self._handle = lib, handle
        except (OSError, AttributeError):
            pass

    @property
    def available(self) -> bool:
        return self._lib is not None

    def _read(self):
        mhz, mw = ctypes.c_uint(), ctypes.c_uint()
        if self._lib.nvmlDeviceGetClockInfo(self._handle, _NVML_CLOCK_SM, ctypes.byref(mhz)) != 0:
            return None
        if self._lib.nvmlDeviceGetPowerUsage(self._handle, ctypes.byref(mw)) != 0:
            return None
        return mhz.value, mw.value

    def _run(self):
        while not self._stop.is_set():
            r = self._read()
            if r is not None:
                self.samples.append((time.perf_counter(), *r))
            time.sleep(self.period_s)

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases.setdefault(name, []).append((t0, time.perf_counter()))

    def summary(self, name: str):
        spans = self.phases.get(name, [])
        got = [(mhz, mw) for t, mhz, mw in self.samples if any(a <= t <= b for a, b in spans)]
        if not got:
            return None
        return {"mhz": statistics.median(m for m, _ in got), "w": round(statistics.median(w for _, w in got) / 1000, 1),
                "samples": len(got)}
