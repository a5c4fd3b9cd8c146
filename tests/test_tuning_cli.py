"""`fp8conv tune` on the CPU (exit 2, --show with every fallback level), the real bench's correctness
gate under the Triton interpreter, and a real tuning run on a GPU (marked cuda)."""

import json
import math
import os

import pytest
import torch

from fp8conv.cli import main
from fp8conv.kernels.config import KernelConfig
from fp8conv.tuning import cache, lookup
from fp8conv.tuning.shapes import GEMMS, Problem

H100 = "NVIDIA H100 80GB HBM3"


pytestmark = pytest.mark.usefixtures("isolated_tuning_cache")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_tune_without_cuda_exits_2(capsys):
    assert main(["tune", "--preset", "tiny"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_tune_needs_a_source(capsys):
    assert main(["tune"]) == 2
    assert main(["tune", "somewhere", "--preset", "tiny"]) == 2


def test_show_with_a_device_name_that_has_no_cache_key_exits_2(capsys):
    assert main(["tune", "--show", "--preset", "tiny", "--device", "!!!"]) == 2  # was a ValueError traceback
    assert capsys.readouterr().err.startswith("error: --device")


def _entry(m, triton):
    return cache.Entry(KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
                       m, triton, "2.11.0", "2026-11-24", 3.0, 4.0, "torch._scaled_mm (rowwise)", 3.5,
                       {"passed": True, "metric": "mean|out-ref|/mean|ref|", "value": 0.0, "tolerance": 1e-3})


def test_show_lists_the_cache_and_each_shapes_level(tmp_path, capsys):
    import triton

    d = tmp_path / "c"
    here = triton.__version__
    cache.write(d, cache.CacheFile(H100, "fp8_gemm", 128, 128, {32: _entry(32, here)}))  # q/o: exact at 32
    cache.write(d, cache.CacheFile(H100, "fp8_gemm", 64, 128, {32: _entry(32, "0.0-other")}))  # k/v: other
    bad = cache.cache_path(d, H100, "fp8_gemm_swiglu", 640, 128)
    bad.write_text("{oops")
    import warnings

    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        assert main(["tune", "--show", "--preset", "tiny", "--cache", str(d), "--device", H100, "--json"]) == 0
    # the corrupt file is reported once, in bad_files, not also as a raw Python warning with a source line
    assert not [w for w in raw if issubclass(w.category, lookup.TuningFallbackWarning)]
    rep = json.loads(capsys.readouterr().out)
    assert rep["search_dirs"][0] == str(d)
    assert {(f["kernel"], f["N"], f["K"]) for f in rep["files"]} >= {("fp8_gemm", 128, 128), ("fp8_gemm", 64, 128)}
    assert [b["path"] for b in rep["bad_files"]] == [str(bad)]
    levels = {(c["kernel"], c["N"], c["K"], c["bucket"]): c["level"] for c in rep["checkpoint"]["devices"][H100]}
    assert levels[("fp8_gemm", 128, 128, 32)] == "exact"
    assert levels[("fp8_gemm", 128, 128, 16384)] == "nearest"
    assert levels[("fp8_gemm", 64, 128, 32)] == "other-triton"
    assert levels[("fp8_gemm_swiglu", 640, 128, 32)] == "default"  # the corrupt file is not trusted
    assert main(["tune", "--show", "--preset", "tiny", "--cache", str(d), "--device", H100]) == 0
    err = capsys.readouterr().err
    assert "SKIPPED" in err and "DEFAULT" in err and "other-triton" in err


# -- the real bench under the interpreter (CPU) -----------------------------------------------------

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter path")
@pytest.mark.parametrize("p", [
    Problem("fp8_gemm", 80, 96, 7, rows=7),  # unaligned N, K
    Problem("fp8_grouped_gemm", 256, 128, 3, rows=16, experts=4, top_k=2, swiglu=True),
    Problem("fp8_grouped_gemm", 128, 192, 3, rows=16, experts=4, top_k=2, swiglu=False),
    Problem("fp8_gemm_swiglu", 128, 96, 7, rows=7),  # I = 64: the quad order
    Problem("fp8_gemm_swiglu", 80, 96, 7, rows=7),  # I = 40: pairs
], ids=["gemm", "gate_up", "down", "swiglu_quad", "swiglu_pairs"])
def test_kernel_bench_checks_real_kernels_and_catches_unwritten_output(p):
    from fp8conv.tuning import gpu, search

    bench = gpu.KernelBench("cpu")
    dense = p.kernel in GEMMS
    bn = 256 if p.swiglu else 64
    good = KernelConfig(BLOCK_M=32 if dense else 16, BLOCK_N=bn, BLOCK_K=64 if dense else 128,
                        GROUP_M=1, num_warps=4, num_stages=2)
    res = search.search(p, [good], bench, lambda f: gpu.wall_timer(f, reps=1))
    assert res.trials[0].status == "ok", res.trials[0].message
    entry = res.entry("3.6.0", "2.11.0")  # the gate it was held to is recorded with it
    assert entry.checked["tolerance"] == (gpu.SWIGLU_TOL if p.swiglu_gemm else search.TOL)
    assert (entry.checked["metric"] == gpu.SWIGLU_METRIC) == p.swiglu_gemm

    class Lazy(gpu.KernelBench):  # a "kernel" that writes nothing: the poisoned output must fail it
        def _launch(self, cfg, j):
            outs = self._outputs(cfg)
            return outs if len(outs) > 1 else outs[0]

    res = search.search(p, [good], Lazy("cpu"), lambda f: gpu.wall_timer(f, reps=1))
    assert res.trials[0].status == "wrong"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter path")
@pytest.mark.parametrize("p", [Problem("topk", 4096, 64, 2, rows=2), Problem("topk", 20000, 10, 2, rows=2)],
                         ids=["rows", "multi"])
def test_kernel_bench_holds_topk_to_an_exact_answer(p):
    """The real kernels/topk.py under the interpreter, on each path: every generated candidate checks out
    exactly (error 0) and is timed; a wrong value, a wrong, repeated or out-of-range index, the k+1-th
    element, a reordered row or an unwritten output fails, and a failing candidate is never timed."""
    from fp8conv.kernels import topk as tk
    from fp8conv.tuning import candidates, gpu, search

    assert tk.one_program_per_row(p.n, p.k) == (p.n <= tk.SMALL_C)
    cands = candidates.candidates(p, candidates.H100, keep=3)
    assert len(cands) == 3
    res = search.search(p, cands, gpu.KernelBench("cpu"), lambda f: gpu.wall_timer(f, reps=1))
    assert [t.status for t in res.trials] == ["ok"] * 3, [t.message for t in res.trials]
    assert all(t.error == 0.0 and t.time_us > 0 for t in res.trials)
    assert res.entry("3.6.0", "2.11.0").checked["metric"] == gpu.TOPK_METRIC

    bench = gpu.KernelBench("cpu")
    bench.setup(p)
    x = bench._s["x"]
    assert x.dtype == torch.float32 and x.shape == (p.m, p.n)
    v, i = bench.run(cands[1])
    assert bench.error((v, i)) == 0.0 and torch.equal(v, torch.topk(x, p.k).values)
    lowest = x.argmin(dim=1)

    def corrupt(f):
        vv, ii = v.clone(), i.clone()
        f(vv, ii)
        return bench.error((vv, ii))

    def next_one(vv, ii):  # the (k+1)-th largest in place of the k-th
        t = torch.topk(x, p.k + 1)
        vv[:, -1], ii[:, -1] = t.values[:, -1], t.indices[:, -1]

    cases = {
        "value": lambda vv, ii: vv[0, 3].sub_(1.0),
        "index elsewhere": lambda vv, ii: ii[0, 0].copy_(lowest[0]),
        "index repeated": lambda vv, ii: ii[1, 1].copy_(ii[1, 0]),
        "index out of range": lambda vv, ii: ii[1, 2].fill_(p.n),
        "negative index": lambda vv, ii: ii[0, 1].fill_(-1),
        "k+1-th": next_one,
        "order": lambda vv, ii: (vv[0, :2].copy_(vv[0, :2].flip(0)), ii[0, :2].copy_(ii[0, :2].flip(0))),
        "unwritten": lambda vv, ii: (vv.fill_(0.0), ii.fill_(0)),
    }
    for what, f in cases.items():
        assert corrupt(f) == math.inf, what
    assert bench.error((v[:, :-1], i[:, :-1])) == math.inf  # too few

    class Wrong(gpu.KernelBench):  # a "kernel" that misses the largest element of row 0
        def _launch(self, cfg, j):
            vv, ii = super()._launch(cfg, j)
            vv[0, 0], ii[0, 0] = vv[0, 1], ii[0, 1]
            return vv, ii

    timed = []
    res = search.search(p, cands[:1], Wrong("cpu"), lambda f: timed.append(f) or 1.0)
    assert res.trials[0].status == "wrong" and not timed


def test_topk_error_accepts_other_indices_among_ties():
    """torch.topk may break ties differently: any distinct indices holding the top values pass."""
    from fp8conv.tuning import gpu

    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    ref = torch.topk(x, 2).values
    assert gpu._topk_error(x, (ref.clone(), torch.tensor([[4, 1]])), ref) == 0.0
    assert gpu._topk_error(x, (ref.clone(), torch.tensor([[2, 1]])), ref) == 0.0
    assert gpu._topk_error(x, (ref.clone(), torch.tensor([[1, 1]])), ref) == math.inf  # one element twice
    assert gpu._topk_error(x, (ref.clone(), torch.tensor([[1, 0]])), ref) == math.inf  # x[0] is 1.0


# -- a real tuning run ---------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_real_tuning_run_on_the_gpu(tmp_path, capsys):
    d = tmp_path / "cache"
    rc = main(["tune", "--preset", "tiny", "--batch", "4", "--beam", "8", "--budget-minutes", "2",
               "--candidates", "4", "--cache", str(d), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0, rep
    assert rep["summary"]["tuned"] >= 1 and rep["summary"]["failed"] == 0
    for s in rep["shapes"]:
        if s["status"] == "tuned":
            assert s["entry"]["checked"]["passed"] and s["entry"]["time_us"] > 0
            assert os.path.exists(s["path"])
    good, bad = cache.scan(d)
    assert good and not bad
    # run again: everything is resumed from the cache
    rc = main(["tune", "--preset", "tiny", "--batch", "4", "--beam", "8", "--candidates", "4", "--cache", str(d),
               "--json"])
    rep2 = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep2["summary"]["tuned"] == 0
    assert rep2["summary"]["resumed"] == rep["summary"]["tuned"]


@pytest.mark.cuda
def test_real_topk_tuning_on_the_gpu(tmp_path):
    """Both top-k paths tuned for real (one program per row; several per row): every candidate passes the
    exact check on this GPU, the winner and torch.topk are timed, and the look-up then finds the entries."""
    from fp8conv.tuning import candidates, gpu, search

    dev = torch.cuda.get_device_name()
    lim = candidates.device_limits()
    ps = [Problem("topk", 8192, 512, 32, rows=32), Problem("topk", 1048576, 64, 8, rows=8)]
    out = search.run_targets(ps, tmp_path, dev, gpu.KernelBench("cuda"), gpu.cuda_timer,
                             lambda p: candidates.candidates(p, lim, keep=4), triton=lookup.triton_version(),
                             torch=torch.__version__.split("+")[0])
    for p, o in zip(ps, out):
        assert o.status == "tuned" and o.problem == p
        assert [t.status for t in o.result.trials] == ["ok"] * len(o.result.trials), \
            [t.message for t in o.result.trials]
        e = o.entry
        assert e.baseline == "torch.topk" and e.baseline_time_us > 0 and e.time_us > 0
        assert e.checked["value"] == 0.0 and e.checked["metric"] == gpu.TOPK_METRIC
        assert lookup.lookup("topk", p.n, p.k, p.m, dirs=[tmp_path]).level == "exact"


# -- the whole tune flow on the CPU with a fake device ------------------------------------------------------

class _FakeDevice:
    """Every config correct; time a deterministic function of the config, the default the slowest."""

    baseline_name = "fake baseline"

    def setup(self, p):
        from fp8conv.tuning.candidates import _default

        self.default = _default(p)

    def teardown(self):
        pass

    def run(self, c):
        return 0.0

    def error(self, out):
        return out

    def _t(self, c):
        return 10e-6 if c == self.default else 1e-6 * (2 + (c.BLOCK_M + 3 * c.BLOCK_N + c.num_stages) % 7)

    def launcher(self, c):
        f = lambda: None  # noqa: E731
        f.seconds = self._t(c)
        return f

    def baseline(self):
        f = lambda: None  # noqa: E731
        f.seconds = 5e-6
        return f


def test_tune_flow_writes_the_cache_and_reports(tmp_path, capsys):
    from fp8conv.tuning import candidates, shapes, tuner

    src = tuner.load_source(None, "tiny")
    n = len(shapes.tuning_targets(shapes.derive(src.cfg, shapes.Load(batch=4, beam=8))))
    # 6 Linear shapes x 2 buckets (4 and 32 tokens: steps 1 and 2 both decode 32 one-token rows);
    # 2 expert GEMMs x 2 buckets (1 and 10 rows/expert); 3 top-k (4 x 200 -> 8, 4 x 1600 -> 8, -> 10)
    assert n == 19
    rep = tuner.tune(src, shapes.Load(batch=4, beam=8), tmp_path, None, keep=4, quiet=True,
                     bench=_FakeDevice(), timer=lambda f: f.seconds, device=H100, lim=candidates.H100)
    assert rep["summary"]["tuned"] == len(rep["shapes"]) == n
    assert rep["geomean_speedup_vs_default"] >= 10 / 8 and rep["geomean_speedup_vs_baseline"] > 0.5
    assert rep["not_tuned"] == []  # top-k is tuned too
    assert sum(s["problem"]["kernel"] == "topk" and s["status"] == "tuned" for s in rep["shapes"]) == 3
    good, bad = cache.scan(tmp_path)
    assert not bad and sum(len(cf.entries) for _, cf in good) == n
    tuner.print_tune(rep)
    err = capsys.readouterr().err
    assert "x default" in err and f"{n} tuned" in err and "not tuned" not in err
    assert "topk                1600     8       4       4 |" in err and " | chunk 16384 step " in err
    # what the run-time look-up then finds for the same load: all exact
    lookup.clear()
    for p in shapes.tuning_targets(shapes.derive(src.cfg, shapes.Load(batch=4, beam=8))):
        assert lookup.lookup(p.kernel, p.n, p.k, p.m, device=H100, dirs=[tmp_path]).level == "exact"


def test_tune_refuses_a_checkpoint_without_fp8_weights(tmp_path, capsys):
    from safetensors.torch import save_file

    from fp8conv.config import preset

    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_dict()))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(128, 128, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    assert main(["tune", str(tmp_path)]) == 2
    assert "no FP8 weights" in capsys.readouterr().err


def test_show_names_the_experts_kernels_the_backend_runs_on_each_device(tmp_path, capsys):
    """--show for a device known by name derives the experts as the backend would run them there: both
    GEMMs in Gluon on a Hopper GPU, on the tl.dot kernel elsewhere (not as on this CPU)."""
    kernels = {}
    for dev in (H100, "NVIDIA A100-SXM4-80GB"):
        assert main(["tune", "--show", "--preset", "4b", "--cache", str(tmp_path), "--device", dev, "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        kernels[dev] = {c["kernel"] for c in rep["checkpoint"]["devices"][dev] if "grouped" in c["kernel"]}
    assert kernels[H100] == {"fp8_grouped_gemm_gluon"}
    assert kernels["NVIDIA A100-SXM4-80GB"] == {"fp8_grouped_gemm"}
