"""benchmarks/gpu_clocks.py: the phase bookkeeping of the NVML clock sampler (the NVML reads themselves
need a driver: where there is none, the sampler must stay quiet and summaries be None)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mod():
    spec = importlib.util.spec_from_file_location("gpu_clocks", os.path.join(ROOT, "benchmarks", "gpu_clocks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_takes_the_samples_inside_each_phase():
    cs = _mod().ClockSampler()
    cs.phases = {"a": [(1.0, 2.0), (5.0, 6.0)], "b": [(3.0, 4.0)]}
    cs.samples = [(0.5, 1980, 100000), (1.5, 1500, 690000), (1.9, 1400, 700000), (3.5, 1700, 650000),
                  (5.5, 1600, 680000), (7.0, 1980, 120000)]
    assert cs.summary("a") == {"mhz": 1500, "w": 690.0, "samples": 3}
    assert cs.summary("b") == {"mhz": 1700, "w": 650.0, "samples": 1}
    assert cs.summary("c") is None


def test_without_a_driver_it_samples_nothing_and_says_none():
    m = _mod()
    with m.ClockSampler() as cs:
        with cs.phase("x"):
            pass
    assert len(cs.phases["x"]) == 1
    if not cs.available:  # CI: no NVIDIA driver
        assert cs.samples == [] and cs.summary("x") is None
