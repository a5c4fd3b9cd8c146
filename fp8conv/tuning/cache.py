"""The tuning cache on disk (DESIGN, "Tuning cache"; docs/tuning-cache.md is the prose version).

One human-readable JSON file per (device, kernel, weight shape)::

    <dir>/<DEVICE>/<kernel>_N<n>_K<k>.json      e.g. NVIDIA_H100_80GB_HBM3/fp8_gemm_N1408_K1408.json

(for "topk": N = the row length, K = k kept, and the buckets count rows)

holding a format tag and version, its key (which must match the file's name and folder), and entries
keyed by token-count bucket (a power of two, see ``bucket``). Each entry records the config, the Triton
and torch versions and date it was measured with, its time, its speed-up over the default config and
over the library baseline, and that its output was checked against the reference on that GPU.

Every write is atomic (a temp file in the same folder, fsync, ``os.replace``), so a crash mid-write
leaves the old file. A file that does not parse, has another format, or whose key does not match its
name ("foreign") raises ``CacheFileError``; readers report it and skip it, never trust it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fp8conv.kernels.config import KernelConfig

FORMAT = "fp8conv-tuning-cache"
FORMAT_VERSION = 1  # kernel names: shapes.TUNABLE writes them; any [a-z0-9_] name parses
ENV_VAR = "FP8CONV_TUNING_CACHE"

_FILE_RE = re.compile(r"^(?P<kernel>[a-z0-9_]+)_N(?P<n>\d+)_K(?P<k>\d+)\.json$")


class CacheFileError(ValueError):
    """A cache file that must not be trusted: unreadable, corrupt, another format, or foreign."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


# -- names ------------------------------------------------------------------------------------------

def device_key(device_name: str) -> str:
    """Folder name of a device: its CUDA name with every run of other characters turned into '_'
    ("NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3")."""
    key = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    if not key:
        raise ValueError(f"device name {device_name!r} gives an empty cache key")
    return key


def file_name(kernel: str, n: int, k: int) -> str:
    return f"{kernel}_N{int(n)}_K{int(k)}.json"


def cache_path(root: Path | str, device: str, kernel: str, n: int, k: int) -> Path:
    return Path(root) / device_key(device) / file_name(kernel, n, k)


def bucket(m: int) -> int:
    """Token-count bucket of M rows: the smallest power of two >= M (1, 2, 4, ..). A config tuned at
    M is filed under bucket(M) and serves every M' with the same bucket."""
    if m < 1:
        raise ValueError(f"token count must be >= 1, got {m}")
    return 1 << (int(m) - 1).bit_length()


def bucket_distance(a: int, b: int) -> float:
    """Distance of two buckets in octaves (log2), used for the nearest-bucket fallback."""
    return abs(math.log2(a) - math.log2(b))


# -- the file ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One tuned config for one bucket."""

    config: KernelConfig
    m: int  # the token count it was measured at
    triton: str
    torch: str
    date: str
    time_us: float
    default_time_us: float | None = None
    baseline: str | None = None  # e.g. "torch._scaled_mm"
    baseline_time_us: float | None = None
    checked: dict = field(default_factory=dict)  # {"metric", "value", "tolerance", "passed"}
    extra: dict = field(default_factory=dict)  # candidates tried / rejected, tuner version, ...

    @property
    def speedup_vs_default(self) -> float | None:
        return self.default_time_us / self.time_us if self.default_time_us else None

    @property
    def speedup_vs_baseline(self) -> float | None:
        return self.baseline_time_us / self.time_us if self.baseline_time_us else None

    def to_dict(self) -> dict:
        d = {"config": self.config.to_dict(), "m": self.m, "triton": self.triton, "torch": self.torch,
             "date": self.date, "time_us": round(self.time_us, 3),
             "default_time_us": _r(self.default_time_us),
             "speedup_vs_default": _r(self.speedup_vs_default, 4),
             "baseline": self.baseline, "baseline_time_us": _r(self.baseline_time_us),
             "speedup_vs_baseline": _r(self.speedup_vs_baseline, 4),
             "checked": self.checked}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        if not isinstance(d, dict):
            raise ValueError("entry is not an object")
        checked = d.get("checked")
        if not isinstance(checked, dict) or not checked.get("passed"):
            raise ValueError("entry's output was not checked against the reference")
        known = {"config", "m", "triton", "torch", "date", "time_us", "default_time_us", "baseline",
                 "baseline_time_us", "checked", "speedup_vs_default", "speedup_vs_baseline"}
        return cls(config=KernelConfig.from_dict(d["config"]), m=int(d["m"]), triton=str(d["triton"]),
                   torch=str(d["torch"]), date=str(d["date"]), time_us=float(d["time_us"]),
                   default_time_us=_f(d.get("default_time_us")), baseline=d.get("baseline"),
                   baseline_time_us=_f(d.get("baseline_time_us")), checked=dict(d["checked"]),
                   extra={k: v for k, v in d.items() if k not in known})


@dataclass
class CacheFile:
    device: str  # the device name as CUDA reports it
    kernel: str
    n: int
    k: int
    entries: dict[int, Entry] = field(default_factory=dict)  # bucket -> entry

    @property
    def key(self) -> dict:
        return {"device": device_key(self.device), "kernel": self.kernel, "N": self.n, "K": self.k}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "key": self.key,
                "device_name": self.device,
                "entries": {str(b): self.entries[b].to_dict() for b in sorted(self.entries)}}

    def path(self, root: Path | str) -> Path:
        return cache_path(root, self.device, self.kernel, self.n, self.k)


def parse(d: object, path: Path | str) -> CacheFile:
    """A CacheFile from the JSON object read at ``path``; CacheFileError if it must not be trusted."""
    path = Path(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CacheFileError(path, f"not a tuning-cache file (format is not {FORMAT!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise CacheFileError(path, f"format_version {d.get('format_version')!r}, this fp8conv reads "
                                   f"{FORMAT_VERSION}")
    key, name = d.get("key"), _FILE_RE.match(path.name)
    want = None
    if name:
        want = {"device": path.parent.name, "kernel": name["kernel"], "N": int(name["n"]),
                "K": int(name["k"])}
    if want is None or key != want or device_key(str(d.get("device_name", ""))) != want["device"]:
        raise CacheFileError(path, f"foreign file: its key {key!r} does not match its name "
                                   f"(expected {want!r})")
    entries, raw = {}, d.get("entries")
    if not isinstance(raw, dict):
        raise CacheFileError(path, "'entries' is not an object")
    for b, e in raw.items():
        try:
            bk = int(b)
            if bk != bucket(bk):
                raise ValueError(f"{bk} is not a power of two")
            entries[bk] = Entry.from_dict(e)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # any malformed value
            raise CacheFileError(path, f"entry {b!r}: {exc}") from None
    return CacheFile(str(d["device_name"]), want["kernel"], want["N"], want["K"], entries)


def read(path: Path | str) -> CacheFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CacheFileError(path, f"unreadable ({exc.strerror or exc})") from None
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[...]]]] nested too deeply
        raise CacheFileError(path, f"corrupt JSON ({exc})") from None
    return parse(d, path)


def write(root: Path | str, cf: CacheFile) -> Path:
    """Write ``cf`` atomically under ``root``; returns its path."""
    path = cf.path(root)
    atomic_write_text(path, json.dumps(cf.to_dict(), indent=2) + "\n")
    return path


def atomic_write_text(path: Path | str, text: str) -> None:
    """Temp file in the target folder, fsync, os.replace (POSIX atomic): readers see the old file or
    the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def scan(root: Path | str) -> tuple[list[tuple[Path, CacheFile]], list[CacheFileError]]:
    """Every cache file under ``root`` (all devices): (good files, problems). Temp files are skipped."""
    root, good, bad = Path(root), [], []
    if not root.is_dir():
        return good, bad
    for path in sorted(root.glob("*/*.json")):
        if path.name.startswith("."):
            continue
        try:
            good.append((path, read(path)))
        except CacheFileError as exc:
            bad.append(exc)
    return good, bad


# -- where caches live ------------------------------------------------------------------------------

def shipped_dir() -> Path:
    """The tuning_cache/ shipped in the package (fp8conv.tuning_cache)."""
    import fp8conv.tuning_cache as pkg

    return Path(pkg.__file__).resolve().parent


def user_dir() -> Path:
    """Where ``fp8conv tune`` writes by default: $XDG_CACHE_HOME/fp8conv/tuning_cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fp8conv" / "tuning_cache"


def search_dirs(extra: list[Path | str] | None = None) -> list[Path]:
    """Folders searched at run time, first wins on a tie: ``extra`` (e.g. --cache), $FP8CONV_TUNING_CACHE,
    the user cache, the shipped package folder."""
    dirs: list[Path] = [Path(p) for p in (extra or [])]
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [user_dir(), shipped_dir()]
    seen, out = set(), []
    for d in dirs:
        r = d.resolve() if d.exists() else d.absolute()
        if r not in seen:
            seen.add(r)
            out.append(d)
    return out


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _f(x) -> float | None:
    return None if x is None else float(x)
