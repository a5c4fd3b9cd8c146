"""The tuner's search loop with a fake bench and timer (CPU): picks the fastest correct candidate, never
times a wrong or broken one, stops early and at its deadline, and resumes after an interruption."""

import dataclasses
import math

import pytest

from fp8conv.kernels.config import KernelConfig
from fp8conv.tuning import cache, search
from fp8conv.tuning.shapes import Problem

DEV = "NVIDIA H100 80GB HBM3"


def cfg(i: int) -> KernelConfig:
    return KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1 + i, num_warps=4, num_stages=3)


class FakeBench:
    """config -> (time in seconds, output error); None time = the launch raises."""

    baseline_name = "fake baseline"

    def __init__(self, table, baseline_s=2e-6, interrupt_on=None):
        self.table, self.baseline_s, self.interrupt_on = table, baseline_s, interrupt_on
        self.setups, self.timed, self.problem = [], [], None

    def setup(self, p):
        if self.interrupt_on is not None and p == self.interrupt_on:
            raise KeyboardInterrupt
        self.setups.append(p)
        self.problem = p

    def teardown(self):
        pass

    def run(self, c):
        t, err = self.table[c]
        if t is None:
            raise RuntimeError("out of resources: shared memory")
        return err

    def error(self, out):
        return out

    def launcher(self, c):
        def f():
            self.timed.append(c)
            return self.table[c][0]
        f.seconds = self.table[c][0]
        return f

    def baseline(self):
        def f():
            return None
        f.seconds = self.baseline_s
        return f


def fake_timer(fn):
    fn()
    return fn.seconds


P = Problem("fp8_gemm", 1408, 1408, 32768, rows=32768)


def test_picks_the_fastest_correct_candidate_and_rejects_wrong_ones():
    table = {cfg(0): (10e-6, 1e-5),  # the default
             cfg(1): (4e-6, 5e-2),  # fastest, but its output is wrong
             cfg(2): (6e-6, math.nan),  # NaN never passes
             cfg(3): (None, 0.0),  # does not compile / launch
             cfg(4): (7e-6, 2e-5),
             cfg(5): (8e-6, 1e-5)}
    bench = FakeBench(table)
    res = search.search(P, list(table), bench, fake_timer, patience=10)
    assert res.best.config == cfg(4) and res.best.time_us == pytest.approx(7.0)
    assert [t.status for t in res.trials] == ["ok", "wrong", "wrong", "error", "ok", "ok"]
    assert cfg(1) not in bench.timed and cfg(2) not in bench.timed and cfg(3) not in bench.timed
    assert res.default_us == pytest.approx(10.0) and res.baseline_us == pytest.approx(2.0)
    e = res.entry("3.6.0", "2.11.0")
    assert e.config == cfg(4) and e.speedup_vs_default == pytest.approx(10 / 7)
    assert e.speedup_vs_baseline == pytest.approx(2 / 7)
    assert e.checked["passed"] and e.checked["value"] == pytest.approx(2e-5)
    assert e.extra["rejected"] == 3 and e.extra["candidates"] == 6


def test_no_correct_candidate_gives_no_entry():
    table = {cfg(0): (1e-6, 1.0), cfg(1): (None, 0.0)}
    res = search.search(P, list(table), FakeBench(table), fake_timer)
    assert res.best is None and res.entry("3.6.0", "2.11.0") is None


def test_early_stopping_after_patience_non_improving_candidates():
    table = {cfg(0): (5e-6, 0.0)} | {cfg(i): (6e-6, 0.0) for i in range(1, 10)}
    res = search.search(P, list(table), FakeBench(table), fake_timer, patience=3)
    assert res.stopped == "early" and len(res.trials) == 4


def test_deadline_stops_after_the_default():
    t = [0.0]

    def clock():
        t[0] += 1.0
        return t[0]

    table = {cfg(i): (5e-6, 0.0) for i in range(6)}
    res = search.search(P, list(table), FakeBench(table), fake_timer, deadline=3.5, clock=clock)
    assert res.stopped == "deadline" and 1 <= len(res.trials) < 6
    assert res.trials[0].config == cfg(0)


def test_run_targets_writes_each_shape_and_resumes_after_interruption(tmp_path):
    p1 = Problem("fp8_gemm", 1408, 1408, 32768, rows=32768)
    p2 = Problem("fp8_gemm", 7680, 1408, 32768, rows=32768)
    p3 = Problem("fp8_gemm", 7680, 1408, 32, rows=32)
    table = {cfg(0): (9e-6, 0.0), cfg(1): (6e-6, 0.0)}
    cands = lambda p: list(table)
    bench = FakeBench(table, interrupt_on=p2)
    with pytest.raises(KeyboardInterrupt):
        search.run_targets([p1, p2, p3], tmp_path, DEV, bench, fake_timer, cands, triton="3.6.0", torch="2.11.0")
    f1 = cache.cache_path(tmp_path, DEV, "fp8_gemm", 1408, 1408)
    assert cache.read(f1).entries[32768].config == cfg(1)  # written before the interruption
    assert not cache.cache_path(tmp_path, DEV, "fp8_gemm", 7680, 1408).exists()

    bench2 = FakeBench(table)
    out = search.run_targets([p1, p2, p3], tmp_path, DEV, bench2, fake_timer, cands, triton="3.6.0",
                             torch="2.11.0")
    assert [o.status for o in out] == ["resumed", "tuned", "tuned"]
    assert bench2.setups == [p2, p3]  # p1 was not measured again
    f2 = cache.read(cache.cache_path(tmp_path, DEV, "fp8_gemm", 7680, 1408))
    assert sorted(f2.entries) == [32, 32768]  # two buckets, one file

    # another Triton version retunes; --force retunes
    bench3 = FakeBench(table)
    out = search.run_targets([p1], tmp_path, DEV, bench3, fake_timer, cands, triton="3.7.0", torch="2.11.0")
    assert out[0].status == "tuned" and cache.read(f1).entries[32768].triton == "3.7.0"
    out = search.run_targets([p1], tmp_path, DEV, FakeBench(table), fake_timer, cands, triton="3.7.0",
                             torch="2.11.0", force=True)
    assert out[0].status == "tuned"


def test_budget_skips_what_does_not_fit(tmp_path):
    t = [0.0]

    def clock():
        t[0] += 10.0
        return t[0]

    table = {cfg(0): (9e-6, 0.0)}
    ps = [Problem("fp8_gemm", 128 * (i + 1), 1408, 32, rows=32) for i in range(4)]
    out = search.run_targets(ps, tmp_path, DEV, FakeBench(table), fake_timer, lambda p: list(table),
                             triton="3.6.0", torch="2.11.0", budget_s=25.0, clock=clock)
    assert out[0].status == "tuned" and out[-1].status == "skipped"


def test_record_replaces_a_corrupt_file_and_keeps_its_text(tmp_path):
    path = cache.cache_path(tmp_path, DEV, "fp8_gemm", 1408, 1408)
    path.parent.mkdir(parents=True)
    path.write_text("not json")
    table = {cfg(0): (9e-6, 0.0)}
    res = search.search(P, list(table), FakeBench(table), fake_timer)
    msgs = []
    search.record(tmp_path, DEV, P, res.entry("3.6.0", "2.11.0"), warn=msgs.append)
    assert cache.read(path).entries[32768].config == cfg(0)
    assert path.with_name(path.name + ".bad").read_text() == "not json"
    assert msgs and "corrupt" in msgs[0]


def test_concurrent_writers_keep_every_bucket(tmp_path):
    import threading

    table = {cfg(0): (9e-6, 0.0)}
    probs = [Problem("fp8_gemm", 1408, 1408, 1 << i, rows=1 << i) for i in range(12)]
    entries = [search.search(p, list(table), FakeBench(table), fake_timer).entry("3.6.0", "2.11.0") for p in probs]
    threads = [threading.Thread(target=search.record, args=(tmp_path, DEV, p, e)) for p, e in zip(probs, entries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = cache.read(cache.cache_path(tmp_path, DEV, "fp8_gemm", 1408, 1408))
    assert sorted(got.entries) == [1 << i for i in range(12)]


@pytest.mark.usefixtures("isolated_tuning_cache")
@pytest.mark.parametrize("rows,c,k", [(32, 8192, 512), (32, 4194304, 512)], ids=["rows", "long"])
def test_topk_search_loop_writes_what_the_lookup_and_the_backend_then_use(tmp_path, monkeypatch, rows, c, k):
    """The loop over a top-k problem's generated candidates (fake timer: the default slowest, one
    candidate wrong, one failing to launch): the fastest correct config is written to
    <device>/topk_N<C>_K<k>.json under the rows' bucket, and the run-time look-up returns it."""
    from fp8conv.kernels.config import default_config, resolve_config
    from fp8conv.tuning import candidates, lookup

    p = Problem("topk", c, k, rows, rows=rows)
    cands = candidates.candidates(p, candidates.H100, keep=6)
    assert cands[0] == default_config("topk", rows, c, k) and len(cands) == 6
    # default 9 us; then 8, 7, 6, ... us, except the fastest (wrong output) and one that does not launch
    table = {cf: (9e-6 - 1e-6 * i, 0.0) for i, cf in enumerate(cands)}
    table[cands[-1]] = (1e-6, math.inf)  # a wrong top-k (gpu._topk_error gives inf)
    table[cands[2]] = (None, 0.0)
    bench = FakeBench(table)
    make = lambda q: candidates.candidates(q, candidates.H100, keep=6)  # noqa: E731
    out = search.run_targets([p], tmp_path, DEV, bench, fake_timer, make, triton="3.6.0", torch="2.11.0")
    assert [o.status for o in out] == ["tuned"]
    assert cands[-1] not in bench.timed and cands[2] not in bench.timed
    path = cache.cache_path(tmp_path, DEV, "topk", c, k)
    assert path.name == f"topk_N{c}_K{k}.json" and out[0].path == path
    e = cache.read(path).entries[32]
    assert e.config == cands[4] and e.speedup_vs_default == pytest.approx(9 / 5)
    assert e.m == rows and e.extra["rejected"] == 2
    # the look-up: exact for these rows' bucket, nearest for other row counts, default for another k
    ch = lookup.lookup("topk", c, k, rows, device=DEV, triton="3.6.0", dirs=[tmp_path])
    assert (ch.level, ch.config) == ("exact", cands[4])
    assert lookup.lookup("topk", c, k, 1, device=DEV, triton="3.6.0", dirs=[tmp_path]).level == "nearest"
    assert lookup.lookup("topk", c, k + 1, rows, device=DEV, triton="3.6.0", dirs=[tmp_path]).level == "default"
    # what TritonBackend.topk calls (resolve_config("topk", rows, C, k)) on this device
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(lookup, "current_device", lambda: DEV)
    monkeypatch.setattr(lookup, "triton_version", lambda: "3.6.0")
    assert resolve_config("topk", rows, c, k) == (cands[4], "tuned")
    # resumed, not re-measured
    bench2 = FakeBench(table)
    out = search.run_targets([p], tmp_path, DEV, bench2, fake_timer, lambda q: list(table), triton="3.6.0",
                             torch="2.11.0")
    assert out[0].status == "resumed" and bench2.setups == []


def test_swiglu_gemm_candidates_fit_and_include_two_programs_per_sm():
    """fp8_gemm_swiglu's space: BLOCK_N a multiple of 64 (its quad order), and configs with two resident
    programs per SM only where two fit the SM's shared memory and registers; plain fp8_gemm never gets
    PROGRAMS_PER_SM > 1."""
    from fp8conv.kernels.config import KernelConfig, default_config
    from fp8conv.tuning import candidates

    lim = candidates.H100
    p = Problem("fp8_gemm_swiglu", 7680, 1408, 16384, rows=16384)
    cands = candidates.candidates(p, lim, keep=24)
    assert cands[0] == default_config("fp8_gemm_swiglu", 16384, 7680, 1408) and cands[0].PROGRAMS_PER_SM == 2
    assert all(c.BLOCK_N % 64 == 0 for c in cands)
    assert any(c.PROGRAMS_PER_SM == 2 for c in cands[1:]) and any(c.PROGRAMS_PER_SM == 1 for c in cands[1:])
    for c in cands:
        assert candidates.fits(p, c, lim) is None
        assert c.PROGRAMS_PER_SM * (candidates.shared_bytes(p, c) + candidates.RESERVED_SHARED) <= lim.max_shared_sm
    # the shipped default fits twice (3 x 32 KiB ring + the 128 x 64 bf16 output tile), 4 stages do not
    two = KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, PROGRAMS_PER_SM=2)
    assert "programs per SM" in candidates.fits(p, two, lim)
    plain = Problem("fp8_gemm", 7680, 1408, 16384, rows=16384)
    assert all(c.PROGRAMS_PER_SM == 1 for c in candidates.candidates(plain, lim, keep=24))
    assert "fp8_gemm's field only" in candidates.fits(Problem("fp8_grouped_gemm", 2816, 1408, 900, rows=49152,
                                                              experts=53, top_k=3, swiglu=True), two, lim)


def test_gluon_forms_are_timed_once():
    """Where fp8_gemm's promoted GEMMs run in Gluon, two candidates that differ only in WARP_SPEC (a tl.dot
    field) are one kernel: the second is dropped. Nothing changes below PROMOTE_MIN_K, on other kernels, or
    where the tl.dot kernel runs them."""
    from fp8conv.kernels.config import default_config
    from fp8conv.kernels.fp8_gemm import gluon_form
    from fp8conv.tuning import candidates

    lim = candidates.H100
    p = Problem("fp8_gemm", 1408, 3840, 16384, rows=16384)
    cands = candidates.candidates(p, lim, keep=24)
    kept = candidates.distinct_kernels(cands, p, gluon=True)
    assert kept[0] == cands[0] == default_config("fp8_gemm", 16384, 1408, 3840)
    forms = [c for c in cands if gluon_form(c)]
    pairs = {c for c in forms if c.WARP_SPEC == 0} & {dataclasses.replace(c, WARP_SPEC=0) for c in forms if c.WARP_SPEC}
    assert pairs, "the space should hold a Gluon form with and without WARP_SPEC"
    assert len(kept) == len(cands) - len(pairs)
    assert all(c in kept for c in cands if not gluon_form(c))
    assert candidates.distinct_kernels(cands, p, gluon=False) == cands
    short = Problem("fp8_gemm", 1408, 1408, 16384, rows=16384)
    assert candidates.distinct_kernels(candidates.candidates(short, lim), short, gluon=True) == \
        candidates.candidates(short, lim)
