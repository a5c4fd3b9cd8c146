"""Terminal output shared by every command: rich progress on a terminal, plain log lines in CI logs
(stdout not a TTY), and one JSON document on stdout with --json (all human output then goes to stderr).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Iterator


def is_tty() -> bool:
    return sys.stderr.isatty()


def console():
    """A rich Console on stderr (stdout stays clean for --json)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


class _PlainProgress:
    """Plain lines, at most one every `every` seconds, plus the last one (none when quiet)."""

    def __init__(self, desc: str, total: float, unit: str, every: float = 2.0, quiet: bool = False):
        self.desc, self.total, self.unit, self.every, self.quiet = desc, total, unit, every, quiet
        self.done, self.t0, self.last = 0.0, time.monotonic(), 0.0

    def advance(self, n: float = 1, info: str = "") -> None:
        self.done += n
        if self.quiet:
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            log(f"{self.desc}: {self.done:.0f}/{self.total:.0f} {self.unit} "
                f"({rate:.1f} {self.unit}/s, eta {eta:.0f}s) {info}".rstrip())


class _RichProgress:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def advance(self, n: float = 1, info: str = "") -> None:
        self._p.update(self._t, advance=n, info=info)


@contextmanager
def progress(desc: str, total: float, unit: str = "items", quiet: bool = False) -> Iterator:
    """``with progress("quantize", total_bytes, "B") as p: p.advance(n, info=name)``."""
    if quiet:
        yield _PlainProgress(desc, total, unit, quiet=True)
        return
    if not is_tty():
        yield _PlainProgress(desc, total, unit)
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn, MofNCompleteColumn)

    cols = [TextColumn("{task.description}"), BarColumn()]
    cols += [DownloadColumn(), TransferSpeedColumn()] if unit == "B" else [MofNCompleteColumn()]
    cols += [TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console(), transient=False) as p:
        yield _RichProgress(p, p.add_task(desc, total=total, info=""))
