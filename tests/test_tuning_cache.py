"""The tuning cache on disk and its look-up (issue 5): format round trip, buckets, atomic writes, corrupt
and foreign files, every fallback level, folder order, and the backend's resolve_config."""

import json
import os
import warnings

import pytest

from fp8conv.kernels.config import KernelConfig, default_config, resolve_config
from fp8conv.tuning import cache, lookup

H100 = "NVIDIA H100 80GB HBM3"
CFG_A = KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
CFG_B = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=5)


def entry(cfg=CFG_A, m=32768, triton="3.6.0", time_us=100.0):
    return cache.Entry(cfg, m, triton, "2.11.0", "2026-11-24", time_us, default_time_us=130.0,
                       baseline="torch._scaled_mm (rowwise)", baseline_time_us=110.0,
                       checked={"metric": "mean|out-ref|/mean|ref|", "value": 1e-5, "tolerance": 1e-3,
                                "passed": True})


def write(root, entries, kernel="fp8_gemm", n=1408, k=1408, device=H100):
    cf = cache.CacheFile(device, kernel, n, k, dict(entries))
    return cache.write(root, cf)


pytestmark = pytest.mark.usefixtures("isolated_tuning_cache")


# -- format ---------------------------------------------------------------------------------------------

def test_round_trip_and_human_readable_layout(tmp_path):
    path = write(tmp_path, {32768: entry(), 32: entry(CFG_B, m=32, time_us=5.0)})
    assert path == tmp_path / "NVIDIA_H100_80GB_HBM3" / "fp8_gemm_N1408_K1408.json"
    d = json.loads(path.read_text())
    assert d["format"] == cache.FORMAT and d["format_version"] == cache.FORMAT_VERSION
    assert d["key"] == {"device": "NVIDIA_H100_80GB_HBM3", "kernel": "fp8_gemm", "N": 1408, "K": 1408}
    e = d["entries"]["32768"]
    for key in ("config", "m", "triton", "torch", "date", "time_us", "speedup_vs_default", "baseline",
                "speedup_vs_baseline", "checked"):
        assert key in e
    assert e["speedup_vs_default"] == pytest.approx(1.3) and e["speedup_vs_baseline"] == pytest.approx(1.1)
    assert "\n  " in path.read_text()  # indented, one key a line
    back = cache.read(path)
    assert back.entries[32768].config == CFG_A and back.entries[32].config == CFG_B
    assert back.entries[32768].to_dict() == entry().to_dict()


@pytest.mark.parametrize("m,b", [(1, 1), (2, 2), (3, 4), (32, 32), (33, 64), (32768, 32768), (49152, 65536)])
def test_buckets_are_powers_of_two_at_or_above_m(m, b):
    assert cache.bucket(m) == b


def test_bucket_rejects_zero():
    with pytest.raises(ValueError):
        cache.bucket(0)


def test_device_key():
    assert cache.device_key("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert cache.device_key("NVIDIA H200") == "NVIDIA_H200"


# -- atomic writes --------------------------------------------------------------------------------------

def test_crash_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write(tmp_path, {32768: entry()})
    before = path.read_text()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, {32768: entry(CFG_B)})
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_interrupt_while_writing_the_temp_file(tmp_path, monkeypatch):
    path = write(tmp_path, {32768: entry()})
    before = path.read_text()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, {32768: entry(CFG_B)})
    assert path.read_text() == before
    assert len(list(path.parent.iterdir())) == 1


# -- untrusted files --------------------------------------------------------------------------------------

def test_corrupt_file_is_reported_and_skipped(tmp_path):
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    write(good_dir, {32768: entry(CFG_B)})
    bad = cache.cache_path(bad_dir, H100, "fp8_gemm", 1408, 1408)
    bad.parent.mkdir(parents=True)
    bad.write_text('{"format": "fp8conv-tuning-cache", "entr')  # a truncated write by another tool
    with pytest.raises(cache.CacheFileError, match="corrupt JSON"):
        cache.read(bad)
    deep = cache.cache_path(tmp_path / "deep", H100, "fp8_gemm", 1408, 1408)
    deep.parent.mkdir(parents=True)
    deep.write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError in json: was a traceback
    with pytest.raises(cache.CacheFileError, match="corrupt JSON"):
        cache.read(deep)
    good, problems = cache.scan(bad_dir)
    assert good == [] and len(problems) == 1
    with pytest.warns(lookup.TuningFallbackWarning, match="skipping .*corrupt JSON"):
        ch = lookup.lookup("fp8_gemm", 1408, 1408, 32768, device=H100, triton="3.6.0", dirs=[bad_dir, good_dir])
    assert ch.level == "exact" and ch.config == CFG_B and ch.path.parent.parent == good_dir


@pytest.mark.parametrize("how", ["renamed", "other_device", "wrong_format", "unchecked", "bad_bucket",
                                 "checked_not_an_object"])
def test_foreign_or_invalid_file_is_skipped(tmp_path, how):
    src = write(tmp_path / "src", {32768: entry()})
    d = json.loads(src.read_text())
    target = cache.cache_path(tmp_path / "c", H100, "fp8_gemm", 1408, 1408)
    if how == "renamed":  # a file for N=2816 copied under N=1408's name
        d["key"]["N"] = 2816
    elif how == "other_device":
        d["key"]["device"] = d["device_name"] = "NVIDIA_H200"
    elif how == "wrong_format":
        d["format_version"] = 99
    elif how == "unchecked":
        d["entries"]["32768"]["checked"]["passed"] = False
    elif how == "checked_not_an_object":  # was an AttributeError traceback out of `tune --show`
        d["entries"]["32768"]["checked"] = [True]
    else:
        d["entries"]["100"] = d["entries"]["32768"]
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(d))
    with pytest.raises(cache.CacheFileError):
        cache.read(target)
    with pytest.warns(lookup.TuningFallbackWarning, match="skipping"):
        ch = lookup.lookup("fp8_gemm", 1408, 1408, 32768, device=H100, triton="3.6.0", dirs=[tmp_path / "c"])
    assert ch.level == "default" and ch.config is None


# -- look-up levels ---------------------------------------------------------------------------------------

def test_every_fallback_level(tmp_path):
    write(tmp_path, {32768: entry(CFG_A, m=32768), 32: entry(CFG_B, m=32)})
    look = lambda m, triton="3.6.0", n=1408: lookup.lookup("fp8_gemm", n, 1408, m, device=H100, triton=triton,
                                                            dirs=[tmp_path])
    exact = look(20000)  # bucket 32768
    assert (exact.level, exact.config, exact.bucket) == ("exact", CFG_A, 32768)
    near = look(65536)
    assert (near.level, near.config) == ("nearest", CFG_A) and "nearest is 32768" in near.reason
    near_small = look(100)  # bucket 128: 2 octaves from 32, 8 from 32768
    assert (near_small.level, near_small.config) == ("nearest", CFG_B)
    other = look(32768, triton="3.7.0")
    assert (other.level, other.config) == ("other-triton", CFG_A) and "3.6.0" in other.reason
    default = look(32768, n=4096)
    assert default.level == "default" and default.config is None and "fp8_gemm_N4096_K1408.json" in default.reason
    assert "documented default" in default.describe()


def test_nearest_tie_goes_to_the_larger_bucket(tmp_path):
    write(tmp_path, {64: entry(CFG_B, m=64), 256: entry(CFG_A, m=256)})
    ch = lookup.lookup("fp8_gemm", 1408, 1408, 128, device=H100, triton="3.6.0", dirs=[tmp_path])
    assert ch.config == CFG_A


def test_same_triton_beats_other_triton_even_if_farther(tmp_path):
    write(tmp_path, {32: entry(CFG_B, m=32, triton="3.6.0"), 32768: entry(CFG_A, triton="3.5.0")})
    ch = lookup.lookup("fp8_gemm", 1408, 1408, 32768, device=H100, triton="3.6.0", dirs=[tmp_path])
    assert (ch.level, ch.config) == ("nearest", CFG_B)


def test_no_cuda_device_means_default(monkeypatch):
    monkeypatch.setattr(lookup, "current_device", lambda: None)
    ch = lookup.lookup("fp8_gemm", 1408, 1408, 32)
    assert ch.level == "default" and ch.reason == "no CUDA device"


def test_env_dir_is_searched_first_then_shipped(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    monkeypatch.setenv(cache.ENV_VAR, str(env_dir))
    dirs = cache.search_dirs()
    assert dirs[0] == env_dir and dirs[-1] == cache.shipped_dir()
    write(dirs[1], {32768: entry(CFG_B)})  # the user cache
    write(env_dir, {32768: entry(CFG_A)})
    ch = lookup.lookup("fp8_gemm", 1408, 1408, 32768, device=H100, triton="3.6.0", dirs=dirs)
    assert ch.config == CFG_A and ch.path.is_relative_to(env_dir)


def test_get_config_warns_once_per_fallback_and_feeds_resolve_config(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(lookup, "current_device", lambda: H100)
    monkeypatch.setattr(lookup, "triton_version", lambda: "3.6.0")
    write(tmp_path, {32768: entry(CFG_A)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact match says nothing
        assert lookup.get_config("fp8_gemm", 1408, 1408, 32768) == CFG_A
    with pytest.warns(lookup.TuningFallbackWarning, match="nearest match"):
        assert lookup.get_config("fp8_gemm", 1408, 1408, 16) == CFG_A
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... once
        assert lookup.get_config("fp8_gemm", 1408, 1408, 16) == CFG_A
    with pytest.warns(lookup.TuningFallbackWarning, match="documented default"):
        cfg, src = resolve_config("fp8_gemm", 64, 4096, 1408)
    assert cfg == default_config("fp8_gemm", 64, 4096, 1408) and src == "default"
    cfg, src = resolve_config("fp8_gemm", 30000, 1408, 1408)  # kernels call (kernel, m, n, k)
    assert cfg == CFG_A and src == "tuned"
    assert lookup.get_choice("fp8_gemm", 1408, 1408, 16).level == "nearest"


def test_resolve_config_distrusts_a_gluon_entry_the_kernel_cannot_run(monkeypatch):
    """A structurally valid cache entry whose config is no form of the Gluon grouped GEMM (here 96 rows,
    no warpgroup multiple) is reported and replaced by the default, not launched."""
    bad = KernelConfig(BLOCK_M=96, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=6, num_stages=3)
    monkeypatch.setattr(lookup, "get_config", lambda kernel, n, k, m: bad)
    with pytest.warns(UserWarning, match="not a form of the Gluon kernel"):
        cfg, src = resolve_config("fp8_grouped_gemm_gluon", 927, 2816, 1408, gate_up=True)
    assert (cfg, src) == (default_config("fp8_grouped_gemm_gluon", 927, 2816, 1408, gate_up=True), "default")
    good = default_config("fp8_grouped_gemm_gluon", 927, 1408, 1408, gate_up=False)
    monkeypatch.setattr(lookup, "get_config", lambda kernel, n, k, m: good)
    assert resolve_config("fp8_grouped_gemm_gluon", 927, 1408, 1408, gate_up=False) == (good, "tuned")


def _shipped_choices(device):
    """(shape label, look-up choice) for every kernel shape the 4b preset and the bundled example launch at
    batch 32 / beam 512 (GEMMs, grouped GEMMs and top-k), from the shipped folder, for ``device`` and the
    shipped Triton version. Both devices are Hopper GPUs, where the backend runs the experts' GEMMs in
    Gluon (grouped_gemm.expert_layout): the shapes are derived as there."""
    from fp8conv.config import load_config, preset
    from fp8conv.tuning import shapes

    root = cache.shipped_dir()
    assert root.name == "tuning_cache"
    good, bad = cache.scan(root)
    assert not bad and good
    triton = next(iter(good[0][1].entries.values())).triton
    example = load_config(os.path.join(os.path.dirname(__file__), "..", "fp8conv", "data", "onerec_example"))
    for cfg in (preset("4b"), example):
        layout = shapes.expert_layout_on(device, cfg.hidden_size, cfg.moe_intermediate_size)  # Gluon there
        probs = shapes.derive(cfg, shapes.Load(batch=32, beam=512), layout=layout)
        for p in shapes.tuning_targets(probs):
            yield p.label(), lookup.lookup(p.kernel, p.n, p.k, p.m, device=device, triton=triton, dirs=[root])


@pytest.mark.parametrize("device", [H100, "NVIDIA H200"])
def test_shipped_configs_are_valid_and_cover_the_4b_preset_and_the_example(monkeypatch, device):
    monkeypatch.undo()  # the real package folder
    for label, ch in _shipped_choices(device):
        assert ch.level == "exact", label
        assert ch.entry.checked["passed"] and ch.entry.time_us > 0


@pytest.mark.parametrize("device", [H100, "NVIDIA H200"])
def test_shipped_configs_are_valid_and_serve_every_shape_of_the_4b_preset_and_the_example(monkeypatch, device):
    """Every shape the runtime launches gets a checked config of this device and Triton version from
    the shipped files, exact or from the nearest bucket."""
    monkeypatch.undo()  # the real package folder
    for label, ch in _shipped_choices(device):
        assert ch.level in ("exact", "nearest"), label
        assert ch.entry.checked["passed"] and ch.entry.time_us > 0


@pytest.mark.parametrize("device", [H100, "NVIDIA H200"])
def test_shipped_configs_include_the_top_k_shapes(monkeypatch, device):
    monkeypatch.undo()
    got = [(label, ch) for label, ch in _shipped_choices(device) if label.startswith("topk ")]
    assert len(got) == 3 + 3  # 4b: 32 x 8192 -> 512, 32 x 4M -> 512, 32 x 4M -> 10; the example's three
    assert all(ch.level == "exact" and ch.entry.checked["passed"] for _, ch in got)
