"""Run-time look-up of tuned kernel configs (DESIGN, "Tuning cache").

For (kernel, N, K, M) on the current device and Triton version, in this order:

1. ``exact``        an entry of bucket(M) measured with this Triton version;
2. ``nearest``      the entry of the nearest bucket (in octaves; ties go to the larger bucket) measured
                    with this Triton version;
3. ``other-triton`` the nearest entry for this device measured with another Triton version (warned once:
                    a config that was fastest on another compiler is a guess, not a measurement);
4. ``default``      none: the caller uses the documented default (fp8conv.kernels.config.default_config).

Folders are searched in ``cache.search_dirs()`` order ($FP8CONV_TUNING_CACHE first, the shipped
tuning_cache/ last); at each level the first folder with a match wins. Every choice other than
``exact`` is reported once per (kernel, N, K, bucket) with a ``TuningFallbackWarning``: no fallback
is silent. A corrupt or foreign file is reported once and skipped.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from fp8conv.kernels.config import KernelConfig
from fp8conv.tuning import cache

LEVELS = ("exact", "nearest", "other-triton", "default")


class TuningFallbackWarning(UserWarning):
    """A kernel runs with a config that was not tuned for exactly this shape, GPU and Triton."""


@dataclass(frozen=True)
class Choice:
    kernel: str
    n: int
    k: int
    m: int
    bucket: int
    level: str  # one of LEVELS
    config: KernelConfig | None  # None: the documented default
    path: Path | None = None
    entry: cache.Entry | None = None
    reason: str = ""

    def describe(self) -> str:
        what = f"{self.kernel} N={self.n} K={self.k} M={self.m} (bucket {self.bucket})"
        if self.level == "default":
            return f"{what}: documented default ({self.reason})"
        e = self.entry
        return (f"{what}: {self.level} match, bucket {cache.bucket(e.m)} tuned at M={e.m} with Triton "
                f"{e.triton} on {e.date}, from {self.path}" + (f" ({self.reason})" if self.reason else ""))

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "N": self.n, "K": self.k, "M": self.m, "bucket": self.bucket,
                "level": self.level, "config": self.config.to_dict() if self.config else None,
                "path": str(self.path) if self.path else None,
                "tuned_at_m": self.entry.m if self.entry else None,
                "triton": self.entry.triton if self.entry else None, "reason": self.reason}


# -- environment ------------------------------------------------------------------------------------

def current_device() -> str | None:
    """The current CUDA device's name, or None without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


# -- reading, with per-file memo and once-only reports ----------------------------------------------

_lock = threading.Lock()
_reported: set = set()
_files: dict[Path, tuple[int, object]] = {}  # path -> (mtime_ns, CacheFile | CacheFileError)
_choices: dict[tuple, Choice] = {}


def _warn_once(key, msg: str) -> None:
    with _lock:
        if key in _reported:
            return
        _reported.add(key)
    warnings.warn(msg, TuningFallbackWarning, stacklevel=3)


def _load(path: Path):
    """The CacheFile at ``path``, None if absent; a corrupt/foreign file is warned once and skipped."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    got = _files.get(path)
    if got is None or got[0] != mtime:
        try:
            got = (mtime, cache.read(path))
        except cache.CacheFileError as exc:
            got = (mtime, exc)
        _files[path] = got
    if isinstance(got[1], cache.CacheFileError):
        _warn_once(("bad", path, mtime), f"tuning cache: skipping {got[1]}")
        return None
    return got[1]


def clear() -> None:
    """Forget memoised files, choices and reports (tests; `fp8conv tune` after writing)."""
    with _lock:
        _reported.clear()
    _files.clear()
    _choices.clear()


# -- the look-up ------------------------------------------------------------------------------------

def lookup(kernel: str, n: int, k: int, m: int, device: str | None = None, triton: str | None = None,
           dirs: list[Path | str] | None = None) -> Choice:
    """The config (kernel, N, K) at M tokens would use, with its level. ``device`` defaults to the
    current CUDA device, ``triton`` to the installed version, ``dirs`` to ``cache.search_dirs()``."""
    b = cache.bucket(m)
    device = device if device is not None else current_device()
    if device is None:
        return Choice(kernel, n, k, m, b, "default", None, reason="no CUDA device")
    triton = triton or triton_version()
    folders = [Path(d) for d in (dirs if dirs is not None else cache.search_dirs())]
    files = [(p, f) for p in (cache.cache_path(d, device, kernel, n, k) for d in folders)
             if (f := _load(p)) is not None]

    same = [(p, bk, e) for p, f in files for bk, e in f.entries.items() if e.triton == triton]
    for p, bk, e in same:
        if bk == b:
            return Choice(kernel, n, k, m, b, "exact", e.config, p, e)
    if same:
        p, bk, e = _nearest(same, b)
        return Choice(kernel, n, k, m, b, "nearest", e.config, p, e,
                      f"no entry for bucket {b}; nearest is {bk}")
    other = [(p, bk, e) for p, f in files for bk, e in f.entries.items()]
    if other:
        p, bk, e = _nearest(other, b)
        return Choice(kernel, n, k, m, b, "other-triton", e.config, p, e,
                      f"tuned with Triton {e.triton}, running {triton}")
    where = ", ".join(str(d) for d in folders)
    return Choice(kernel, n, k, m, b, "default", None,
                  reason=f"no tuned config for {cache.device_key(device)}/{cache.file_name(kernel, n, k)} "
                         f"in {where}")


def _nearest(cands: list, b: int):
    # nearest in octaves; on a tie the larger bucket (a config for more tokens wastes less than one
    # whose tiles were sized for fewer); then the first folder
    return min(cands, key=lambda c: (cache.bucket_distance(c[1], b), -c[1]))


def get_choice(kernel_name: str, n: int, k: int, m: int) -> Choice:
    """The full look-up result for the current device (memoised per bucket), with its ``level``, so a
    caller can record where a config came from; fallbacks are warned once."""
    key = (kernel_name, int(n), int(k), cache.bucket(m))
    choice = _choices.get(key)
    if choice is None:
        choice = lookup(kernel_name, n, k, m)
        _choices[key] = choice
    if choice.level != "exact":
        _warn_once(("level",) + key, f"tuning cache: {choice.describe()}")
    return choice


def get_config(kernel_name: str, n: int, k: int, m: int) -> KernelConfig | None:
    """What the Triton backend calls (fp8conv.kernels.config.resolve_config): the tuned config for
    ``kernel_name`` with an [N, K] weight at M tokens (rows per expert for the grouped GEMM) on the
    current device, or None for the documented default. Fallbacks are warned once; ``get_choice`` says
    which level answered."""
    return get_choice(kernel_name, n, k, m).config
