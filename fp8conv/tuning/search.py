"""The search loop: check, time, keep the fastest correct config; and the run over many shapes.

Device-agnostic: the GPU work sits behind a ``Bench`` (fp8conv.tuning.gpu.GpuBench on CUDA; the tests
use a fake one) and a ``timer`` (CUDA events there, a fake clock in the tests), so the loop runs on the
CPU in the tests exactly as on the GPU.

For one problem, ``search`` takes the candidates in cost-model order (the default first):
1. run the candidate once and compare its output with the reference (mean |out-ref| / mean |ref| below
   ``tol``, NaN never passes); a candidate that fails to compile or launch, or whose output is wrong,
   is recorded and never timed;
2. time it (the timer's median);
3. stop early after ``patience`` timed candidates in a row that beat the best by less than ``min_gain``,
   or at the problem's deadline (the default is always measured).

``run_targets`` tunes a list of problems and writes each finished problem's entry to the cache at once
(atomically), so an interrupted run resumes where it stopped: entries already measured on this device
with this Triton and torch at the same M are skipped unless ``force``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from fp8conv.kernels.config import KernelConfig
from fp8conv.tuning import cache
from fp8conv.tuning.shapes import Problem

TOL = 1e-3  # the kernels' correctness gate (issue 4): mean |out - ref| / mean |ref|
METRIC = "mean|out-ref|/mean|ref|"  # what ``error`` measures, unless the bench names its own ``metric``


class Bench(Protocol):
    """What the search needs from a device for one problem at a time."""

    baseline_name: str | None
    # optional: ``metric`` (str or None), what ``error`` measures for the problem set up (default METRIC),
    # and ``tol`` (float or None), the gate for it (default: search's ``tol``)

    def setup(self, problem: Problem) -> None: ...
    def run(self, config: KernelConfig): ...  # launch once, return the output (poisoned beforehand)
    def error(self, output) -> float: ...  # mean |out - ref| / mean |ref|; NaN if any NaN
    def launcher(self, config: KernelConfig) -> Callable[[], object]: ...  # one launch, for the timer
    def baseline(self) -> Callable[[], object] | None: ...  # the library baseline, or None
    def teardown(self) -> None: ...


Timer = Callable[[Callable[[], object]], float]  # median seconds of one call


@dataclass
class Trial:
    config: KernelConfig
    status: str  # "ok", "wrong" (output check failed), "error" (compile / launch failed)
    error: float | None = None
    time_us: float | None = None
    message: str = ""

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "status": self.status,
                "error": None if self.error is None or math.isnan(self.error) else self.error,
                "time_us": self.time_us, "message": self.message}


@dataclass
class Result:
    problem: Problem
    trials: list[Trial] = field(default_factory=list)
    baseline_name: str | None = None
    baseline_us: float | None = None
    stopped: str = "exhausted"  # "exhausted", "early" (patience), "deadline"
    seconds: float = 0.0
    metric: str = METRIC
    tol: float = TOL  # the gate the trials were held to (the bench's own, where it names one)

    @property
    def best(self) -> Trial | None:
        ok = [t for t in self.trials if t.status == "ok"]
        return min(ok, key=lambda t: t.time_us) if ok else None

    @property
    def default(self) -> Trial | None:
        return self.trials[0] if self.trials else None

    @property
    def default_us(self) -> float | None:
        d = self.default
        return d.time_us if d is not None and d.status == "ok" else None

    def entry(self, triton: str, torch: str, tol: float | None = None) -> cache.Entry | None:
        b = self.best
        if b is None:
            return None
        return cache.Entry(
            config=b.config, m=self.problem.m, triton=triton, torch=torch,
            date=time.strftime("%Y-%m-%d", time.gmtime()), time_us=b.time_us,
            default_time_us=self.default_us, baseline=self.baseline_name, baseline_time_us=self.baseline_us,
            checked={"metric": self.metric, "value": b.error, "tolerance": self.tol if tol is None else tol,
                     "passed": True},
            extra={"rows": self.problem.rows, "experts": self.problem.experts, "swiglu": self.problem.swiglu,
                   "candidates": len(self.trials),
                   "rejected": sum(t.status != "ok" for t in self.trials), "stopped": self.stopped,
                   "seconds": round(self.seconds, 2)})


def search(problem: Problem, configs: list[KernelConfig], bench: Bench, timer: Timer, *, tol: float = TOL,
           patience: int = 8, min_gain: float = 0.01, deadline: float | None = None,
           clock: Callable[[], float] = time.monotonic,
           on_trial: Callable[[Result, Trial], None] | None = None) -> Result:
    """Tune one problem over ``configs`` (the default first). See the module docstring."""
    t0 = clock()
    res = Result(problem)
    bench.setup(problem)
    res.baseline_name = bench.baseline_name
    res.metric = getattr(bench, "metric", None) or METRIC
    # a bench may hold its problem to its own gate (fp8_gemm_swiglu: two GEMM outputs multiplied)
    res.tol = tol = getattr(bench, "tol", None) or tol
    try:
        base = bench.baseline()
        if base is not None:
            try:
                res.baseline_us = timer(base) * 1e6
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                res.baseline_name = f"{bench.baseline_name} (failed: {type(exc).__name__}: {exc})"
        best, since = math.inf, 0
        for i, cfg in enumerate(configs):
            if i > 0 and deadline is not None and clock() >= deadline:
                res.stopped = "deadline"
                break
            trial = _try(cfg, bench, timer, tol)
            res.trials.append(trial)
            if trial.status == "ok":
                if trial.time_us < best * (1 - min_gain):
                    since = 0
                else:
                    since += 1
                best = min(best, trial.time_us)
            if on_trial is not None:
                on_trial(res, trial)
            if since >= patience:
                res.stopped = "early"
                break
    finally:
        bench.teardown()
    res.seconds = clock() - t0
    return res


def _try(cfg: KernelConfig, bench: Bench, timer: Timer, tol: float) -> Trial:
    try:
        out = bench.run(cfg)
        err = float(bench.error(out))
        del out
    except Exception as exc:  # noqa: BLE001 - Triton raises many types (OutOfResources, compile errors)
        return Trial(cfg, "error", message=f"{type(exc).__name__}: {str(exc)[:200]}")
    if not err < tol:  # NaN compares False
        return Trial(cfg, "wrong", error=err, message=f"output error {err:.3e} >= {tol:.0e}")
    try:
        t = timer(bench.launcher(cfg))
    except Exception as exc:  # noqa: BLE001
        return Trial(cfg, "error", error=err, message=f"timing failed: {type(exc).__name__}: {exc}")
    return Trial(cfg, "ok", error=err, time_us=t * 1e6)


# -- many problems, resumable --------------------------------------------------------------------------

@dataclass
class Outcome:
    problem: Problem
    status: str  # "tuned", "resumed" (already in the cache), "failed" (no correct candidate), "skipped"
    entry: cache.Entry | None = None
    result: Result | None = None
    path: Path | None = None

    def to_dict(self) -> dict:
        d = {"problem": self.problem.to_dict(), "status": self.status,
             "path": str(self.path) if self.path else None,
             "entry": self.entry.to_dict() if self.entry else None}
        if self.result is not None:
            d["trials"] = [t.to_dict() for t in self.result.trials]
        return d


def existing_entry(root: Path, device: str, p: Problem, triton: str, torch: str) -> cache.Entry | None:
    path = cache.cache_path(root, device, p.kernel, p.n, p.k)
    if not path.exists():
        return None
    try:
        e = cache.read(path).entries.get(p.bucket)
    except cache.CacheFileError:
        return None
    if e is not None and e.triton == triton and e.torch == torch and e.m == p.m:
        return e
    return None


def record(root: Path, device: str, p: Problem, entry: cache.Entry,
           warn: Callable[[str], None] = lambda s: None) -> Path:
    """Merge ``entry`` into its cache file (read, update, atomic write) under an exclusive lock on the
    device folder, so two tuners writing the same file do not lose each other's buckets. A corrupt or
    foreign file in the way is reported and replaced, its text kept beside it as ``<name>.bad``."""
    import fcntl

    path = cache.cache_path(root, device, p.kernel, p.n, p.k)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _merge(path, root, device, p, entry, warn)


def _merge(path: Path, root: Path, device: str, p: Problem, entry: cache.Entry, warn) -> Path:
    cf = cache.CacheFile(device, p.kernel, p.n, p.k)
    if path.exists():
        try:
            cf = cache.read(path)
            cf.device = device
        except cache.CacheFileError as exc:
            warn(f"{exc}; replacing it (old text kept as {path.name}.bad)")
            cache.atomic_write_text(path.with_name(path.name + ".bad"), path.read_text(errors="replace"))
    cf.entries[p.bucket] = entry
    return cache.write(root, cf)


def run_targets(targets: list[Problem], root: Path, device: str, bench: Bench, timer: Timer,
                make_candidates: Callable[[Problem], list[KernelConfig]], *, triton: str, torch: str,
                budget_s: float | None = None, force: bool = False, tol: float = TOL, patience: int = 8,
                clock: Callable[[], float] = time.monotonic,
                on_start: Callable[[int, Problem, int], None] | None = None,
                on_trial: Callable[[Result, Trial], None] | None = None,
                on_done: Callable[[int, Outcome], None] | None = None,
                warn: Callable[[str], None] = lambda s: None) -> list[Outcome]:
    """Tune every target, writing each finished one at once. The budget is shared out evenly over the
    targets still to do (a target that finishes early leaves its time to the rest)."""
    t_end = None if budget_s is None else clock() + budget_s
    outcomes: list[Outcome] = []
    todo = []
    for p in targets:
        e = None if force else existing_entry(root, device, p, triton, torch)
        if e is not None:
            outcomes.append(Outcome(p, "resumed", e, path=cache.cache_path(root, device, p.kernel, p.n, p.k)))
            if on_done:
                on_done(len(outcomes) - 1, outcomes[-1])
        else:
            todo.append(p)
    for i, p in enumerate(todo):
        deadline = None
        if t_end is not None:
            left = t_end - clock()
            if left <= 0:
                out = Outcome(p, "skipped")
                outcomes.append(out)
                if on_done:
                    on_done(len(outcomes) - 1, out)
                continue
            deadline = clock() + left / (len(todo) - i)
        cands = make_candidates(p)
        if on_start:
            on_start(len(outcomes), p, len(cands))
        res = search(p, cands, bench, timer, tol=tol, patience=patience, deadline=deadline, clock=clock,
                     on_trial=on_trial)
        entry = res.entry(triton, torch)
        if entry is None:
            out = Outcome(p, "failed", result=res)
        else:
            out = Outcome(p, "tuned", entry, res, record(root, device, p, entry, warn))
        outcomes.append(out)
        if on_done:
            on_done(len(outcomes) - 1, out)
    return outcomes
