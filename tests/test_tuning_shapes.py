"""Shape derivation (tiny and 4b presets, schemes from safetensors headers) and candidate generation."""

import dataclasses

import pytest
import torch

from fp8conv.config import preset
from fp8conv.kernels.config import default_config
from fp8conv.tuning import candidates as cd
from fp8conv.tuning import shapes
from fp8conv.tuning.cache import bucket


def test_tiny_preset_shapes_at_batch_32_beam_512():
    cfg = preset("tiny")  # d 128, 4 layers (0 dense), heads 4x32, kv 2x32, SwiGLU 320, 6 experts x 192, top-2, K 200
    probs = shapes.derive(cfg, shapes.Load(batch=32, beam=512))
    # beam search keeps min(beam, candidates): 32 rows at step 0, then 32 x min(512, 200) = 6400, then
    # 32 x min(512, 200 x 200) = 16384; decoding is incremental, so each row is one new token
    assert shapes.step_rows(cfg, shapes.Load(batch=32, beam=512)) == [32, 6400, 16384]
    tokens = [32, 6400, 16384]
    gemm = {(p.kernel, p.n, p.k) for p in probs if p.kernel.startswith("fp8_gemm")}
    assert gemm == {("fp8_gemm", 128, 128),  # q / o of both attentions (4 x 32 = 128 = d)
                    ("fp8_gemm", 64, 128),  # self-attn k / v (2 x 32)
                    ("fp8_gemm_swiglu", 640, 128), ("fp8_gemm", 128, 320),  # dense SwiGLU: gate+up with SwiGLU, down
                    ("fp8_gemm_swiglu", 384, 128), ("fp8_gemm", 128, 192)}  # shared expert: the same
    for kernel, n, k in gemm:
        assert sorted(p.m for p in probs if (p.kernel, p.n, p.k) == (kernel, n, k)) == tokens
    grouped = [p for p in probs if p.kernel == "fp8_grouped_gemm"]
    gate_up = sorted((p.rows, p.m) for p in grouped if p.swiglu)
    down = sorted((p.rows, p.m) for p in grouped if not p.swiglu)
    assert gate_up == down == [(t * 2, t * 2 // 6) for t in tokens]  # rows = tokens x top-2; M = rows / E
    assert {(p.n, p.k) for p in grouped if p.swiglu} == {(2 * 256, 128)}  # I 192 padded to 256, gate+up
    assert {(p.n, p.k) for p in grouped if not p.swiglu} == {(128, 192)}
    topk = [p for p in probs if p.kernel == "topk"]
    assert [(p.m, p.n, p.k) for p in topk] == [(32, 200, 200), (32, 40000, 512), (32, 102400, 10)]
    assert all(p.tunable for p in topk)  # kernels/topk.py, keyed by (row length, k, rows)
    # heads and context projection stay in the source precision under the built-in recipe
    assert not any(("lm_heads" in u or "context" in u) for p in probs for u in p.uses)
    assert any(u == "model.layers.*.self_attn.k_proj @ step 1" for p in probs for u in p.uses)


def test_derived_token_counts_are_what_beam_search_launches():
    """derive()'s M of every decoder Linear and expert GEMM equals what the runtime's beam search passes
    to the backend (a spy on the reference backend; the Triton backend is called with the same shapes)."""
    from fp8conv.runtime import ops
    from fp8conv.runtime.beam import beam_search
    from fp8conv.runtime.inputs import synthetic_contexts
    from fp8conv.runtime.model import OneRecModel, random_state

    class Spy(ops.ReferenceBackend):
        def __init__(self):
            self.linear_m, self.expert_m = set(), set()

        def linear(self, x, w):
            if w.name.startswith("model.layers.") and ".experts." not in w.name:
                self.linear_m.add(x.numel() // x.shape[-1])
            return super().linear(x, w)

        def experts(self, x, topk_ids, topk_weights, w):
            self.expert_m.add(max(1, topk_ids.numel() // w.num_experts))
            return super().experts(x, topk_ids, topk_weights, w)

    cfg, load = preset("tiny"), shapes.Load(batch=2, beam=8, top_n=4)
    spy = Spy()
    model = OneRecModel(cfg, random_state(cfg), backend=spy)
    beam_search(model, synthetic_contexts(cfg, load.batch, max_len=8), load.beam, top_n=load.top_n)
    probs = shapes.derive(cfg, load)
    assert spy.linear_m == {p.m for p in probs if p.kernel == "fp8_gemm"} == {2, 16}
    assert spy.expert_m == {p.m for p in probs if p.kernel == "fp8_grouped_gemm"}


def test_tuning_targets_one_per_cache_entry():
    cfg = preset("4b")
    targets = shapes.tuning_targets(shapes.derive(cfg, shapes.Load()))
    keys = [p.key for p in targets]
    # steps 1 and 2 both decode 32 x 512 rows of one token: 5 Linear shapes x 2 buckets + 2 expert GEMMs
    # x 2 buckets; and the three top-k steps (32 rows each)
    assert len(keys) == len(set(keys)) == 17
    assert {bucket(p.m) for p in targets if p.kernel == "fp8_gemm"} == {32, 16384}
    assert {(p.n, p.k) for p in targets if p.kernel == "fp8_grouped_gemm"} == {(2816, 1408), (1408, 1408)}
    assert sorted((p.m, p.n, p.k) for p in targets if p.kernel == "topk") == [
        (32, 8192, 512), (32, 4194304, 10), (32, 4194304, 512)]
    # the heaviest first, so a budget-cut run has done the work that matters most
    work = [p.work_s for p in targets]
    assert work == sorted(work, reverse=True)
    gemms = [(p.rows or p.m) * p.n * p.k for p in targets if p.kernel != "topk"]  # FLOPs order among GEMMs
    assert gemms == sorted(gemms, reverse=True)
    # the 4M-candidate top-k reads 512 MB: as heavy as the big GEMMs, not last
    assert max(i for i, p in enumerate(targets) if p.kernel == "topk" and p.n == 4194304) < 5


def test_schemes_from_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    f8 = torch.zeros(128, 128).to(torch.float8_e4m3fn)
    save_file({"model.layers.0.self_attn.q_proj.weight": f8,
               "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(128, 1),
               "model.layers.1.mlp.experts.0.gate_proj.weight": torch.zeros(192, 128).to(torch.float8_e4m3fn),
               "model.layers.1.mlp.experts.0.gate_proj.weight_scale": torch.ones(2, 1),
               "lm_heads.0.proj.weight": torch.zeros(200, 128, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    schemes = shapes.read_schemes(tmp_path)
    assert schemes == {"model.layers.0.self_attn.q_proj.weight": "channel",
                       "model.layers.1.mlp.experts.0.gate_proj.weight": "block",
                       "lm_heads.0.proj.weight": "keep"}
    probs = shapes.derive(preset("tiny"), shapes.Load(batch=2, beam=4), schemes)
    tunable = [p for p in probs if p.tunable and p.kernel != "topk"]  # top-k runs whatever the schemes
    # only the one FP8 Linear; experts of which only some are FP8 run on the reference path
    assert {(p.kernel, p.n, p.k) for p in tunable} == {("fp8_gemm", 128, 128)}
    assert all(u.startswith("model.layers.*.self_attn.q_proj") for p in tunable for u in p.uses)
    assert shapes.read_schemes(tmp_path / "nothing") is None
    # only the model weights count: contexts / catalogue files beside them are data (and a folder with
    # only those has no weights), as the runtime loader reads a checkpoint
    save_file({"tokens": torch.zeros(2, 3, dtype=torch.int64)}, str(tmp_path / "contexts.safetensors"))
    assert shapes.read_schemes(tmp_path) == schemes
    (tmp_path / "model.safetensors").unlink()
    assert shapes.read_schemes(tmp_path) is None


def test_bad_load_is_a_user_error():
    from fp8conv.errors import UserError

    with pytest.raises(UserError, match="--beam"):
        shapes.Load(beam=0)


# -- candidates -------------------------------------------------------------------------------------------

P_BIG = shapes.Problem("fp8_gemm", 1408, 1408, 32768, rows=32768)
P_SMALL = shapes.Problem("fp8_gemm", 1408, 1408, 32, rows=32)
P_GU = shapes.Problem("fp8_grouped_gemm", 2816, 1408, 1854, rows=98304, experts=53, top_k=3, swiglu=True)
P_DN = shapes.Problem("fp8_grouped_gemm", 1408, 1408, 1854, rows=98304, experts=53, top_k=3, swiglu=False)
P_GU_GL = dataclasses.replace(P_GU, kernel="fp8_grouped_gemm_gluon")
P_DN_GL = dataclasses.replace(P_DN, kernel="fp8_grouped_gemm_gluon")


@pytest.mark.parametrize("p", [P_BIG, P_SMALL, P_GU, P_DN, P_GU_GL, P_DN_GL],
                         ids=["big", "small", "gate_up", "down", "gluon_gate_up", "gluon_down"])
def test_candidates_fit_the_gpu_and_the_kernel(p):
    cs = cd.candidates(p, cd.H100, keep=16)
    gate_up = {"gate_up": p.swiglu} if p.kernel.startswith("fp8_grouped_gemm") else {}
    assert cs[0] == default_config(p.kernel, p.m, p.n, p.k, **gate_up)
    assert 2 <= len(cs) <= 16 and len(set(cs)) == len(cs)
    for c in cs[1:]:
        assert cd.fits(p, c, cd.H100) is None
        assert cd.shared_bytes(p, c) <= cd.H100.max_shared
        if p.kernel == "fp8_grouped_gemm":
            assert c.BLOCK_K == 128 and (c.BLOCK_N == 256 or not p.swiglu)
    if p.kernel == "fp8_grouped_gemm_gluon":  # the Gluon kernel's forms: 64 rows and the default's
        from fp8conv.kernels.grouped_gemm import gluon_config_ok

        assert all(gluon_config_ok(c, p.swiglu) for c in cs)
        assert {c.BLOCK_M for c in cs} == {64, cs[0].BLOCK_M}  # one divides the other: a shared alignment
    if p is P_SMALL:  # no 256-row tiles for 32 tokens
        assert max(c.BLOCK_M for c in cs) <= 64


def test_split_k_candidates_only_where_tiles_leave_sms_idle():
    """SPLIT_K is tried for decode-sized M (few output tiles), never for the large-M GEMMs or the grouped
    kernel; every split keeps >= 2 K steps; split variants take at most a third of the places and
    split-1 tiles stay in the list."""
    down32 = shapes.Problem("fp8_gemm", 1408, 3840, 32, rows=32)
    cs = cd.candidates(down32, cd.H100, keep=24)
    splits = [c for c in cs if c.SPLIT_K > 1]
    assert splits and len(splits) <= 23 // 3 and len(cs) - len(splits) >= 16
    for c in splits:
        assert -(-3840 // c.BLOCK_K) >= 2 * c.SPLIT_K
        assert -(-32 // c.BLOCK_M) * -(-1408 // c.BLOCK_N) * 2 <= cd.H100.sms
    for p in (P_BIG, P_GU, P_DN):
        assert all(c.SPLIT_K == 1 for c in cd.candidates(p, cd.H100, keep=24))


def test_smaller_gpu_limits_filter_more():
    small = dataclasses.replace(cd.H100, max_shared=48 * 1024, max_regs=32768)
    cs = cd.candidates(P_BIG, small, keep=64)
    assert all(cd.shared_bytes(P_BIG, c) <= 48 * 1024 for c in cs[1:])
    assert len(cs) < len(cd.candidates(P_BIG, cd.H100, keep=64))
    why = cd.fits(P_BIG, dataclasses.replace(cs[0], BLOCK_M=256, BLOCK_N=256, num_stages=4), small)
    assert why is not None


def test_cost_model_prefers_fewer_waves_and_larger_tiles():
    lim = cd.H100
    from fp8conv.kernels.config import KernelConfig

    big = KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    tiny = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    assert cd.estimate_us(P_BIG, big, lim) < cd.estimate_us(P_BIG, tiny, lim)
    two_stage = dataclasses.replace(big, num_stages=2)
    assert cd.estimate_us(P_BIG, big, lim) < cd.estimate_us(P_BIG, two_stage, lim)


# -- top-k candidates -------------------------------------------------------------------------------------

T_ROWS = shapes.Problem("topk", 8192, 512, 32, rows=32)  # beam step 0: one program per row
T_LONG = shapes.Problem("topk", 4194304, 512, 32, rows=32)  # steps 1, 2: the multi-program path
T_LAST = shapes.Problem("topk", 4194304, 10, 32, rows=32)
T_TINY = shapes.Problem("topk", 200, 8, 4, rows=4)


@pytest.mark.parametrize("p", [T_ROWS, T_LONG, T_LAST, T_TINY], ids=["rows", "long", "last", "tiny"])
def test_topk_candidates_vary_only_what_the_kernels_read(p):
    from fp8conv.kernels import topk as tk

    cs = cd.candidates(p, cd.H100, keep=24)
    d = default_config("topk", p.m, p.n, p.k)
    assert cs[0] == d and len(set(cs)) == len(cs) and 2 <= len(cs) <= 24
    short = tk.one_program_per_row(p.n, p.k)
    assert short == (p.n <= tk.SMALL_C)
    for c in cs[1:]:
        assert cd.fits(p, c, cd.H100) is None
        # fields no top-k kernel reads (BLOCK_M, GROUP_M, num_stages, the GEMMs' own) stay the default's
        varied = {"BLOCK_N", "BLOCK_K", "num_warps"}
        assert {f: v for f, v in c.to_dict().items() if f not in varied} == \
            {f: v for f, v in d.to_dict().items() if f not in varied}
        for v in (c.BLOCK_N, c.BLOCK_K, c.num_warps):
            assert v & (v - 1) == 0
        per_thread = c.BLOCK_K // (32 * c.num_warps)
        assert 2 <= per_thread <= 16
        if short:  # one program per row: BLOCK_N is unused, BLOCK_K need not exceed the row
            assert c.BLOCK_N == d.BLOCK_N and c.BLOCK_K <= max(1024, p.n)
        else:
            assert c.BLOCK_K <= c.BLOCK_N <= p.n and 2**14 <= c.BLOCK_N <= 2**20
    if p is T_ROWS:  # every valid short-row config is timed: 1024-8192 elements x 4-16 warps
        assert len(cs) == 9 and {c.BLOCK_K for c in cs} == {1024, 2048, 4096, 8192}
    if p is T_LONG:  # several chunk sizes, not one chunk in many variants
        assert len({c.BLOCK_N for c in cs}) >= 4 and len({c.BLOCK_K for c in cs}) >= 3
    if p is T_TINY:  # a 200-element row: steps above 1024 only mask (the default's 2048 is still first)
        assert {c.BLOCK_K for c in cs[1:]} == {1024}


def test_topk_fits_and_cost_model():
    from fp8conv.kernels.config import KernelConfig

    d = default_config("topk", 32, 4194304, 512)
    assert cd.fits(T_LONG, d, cd.H100) is None
    assert "power of two" in cd.fits(T_LONG, dataclasses.replace(d, BLOCK_N=100000), cd.H100)
    assert "BLOCK_K" in cd.fits(T_LONG, dataclasses.replace(d, BLOCK_N=16384, BLOCK_K=32768), cd.H100)
    assert "per thread" in cd.fits(T_LONG, dataclasses.replace(d, BLOCK_K=512, num_warps=16), cd.H100)
    assert "per thread" in cd.fits(T_ROWS, dataclasses.replace(d, BLOCK_K=8192, num_warps=4), cd.H100)
    assert cd.fits(T_ROWS, dataclasses.replace(d, BLOCK_N=1 << 30), cd.H100) is None  # unused on short rows
    # bytes-bound: 512 MB read once costs at least its time at HBM bandwidth, and about that
    est = cd.estimate_us(T_LONG, d, cd.H100)
    hbm_us = 32 * 4194304 * 4 / (cd.H100.hbm_gbps * 1e3)
    assert hbm_us < est < 3 * hbm_us
    # 32 programs of 4M / 1M elements cannot keep enough loads in flight: slower than ~1000 programs
    few = KernelConfig(BLOCK_M=1, BLOCK_N=1 << 20, BLOCK_K=2048, GROUP_M=1, num_warps=8, num_stages=1)
    assert cd.estimate_us(T_LONG, few, cd.H100) > 1.2 * est
    # one program per row: fewer, longer steps are faster (each step is a round trip)
    rows_d = default_config("topk", 32, 8192, 512)
    assert cd.estimate_us(T_ROWS, dataclasses.replace(rows_d, BLOCK_K=1024, num_warps=4), cd.H100) > \
        cd.estimate_us(T_ROWS, rows_d, cd.H100)
    # the top-k and the GEMMs' estimates do not depend on each other's branches
    assert cd.estimate_us(P_BIG, cd.candidates(P_BIG, cd.H100)[0], cd.H100) > 0


def test_experts_take_the_grouped_kernel_the_backend_runs():
    """The experts' problems carry the kernel names the backend looks its configs up by: the Gluon
    kernel's where that runs (a Hopper GPU), the tl.dot kernel's elsewhere (this CPU)."""
    cfg = preset("4b")
    load = shapes.Load(batch=2, beam=4)
    names = {p.kernel for p in shapes.derive(cfg, load) if p.experts}
    assert shapes.expert_layout(cfg.hidden_size, cfg.moe_intermediate_size) == "sorted"
    # another machine, known by name (tune --show): the Gluon layout on Hopper, where rows are aligned
    assert shapes.expert_layout_on("NVIDIA H100 80GB HBM3", 1408, 1408) == "gluon"
    assert shapes.expert_layout_on("NVIDIA H200", 1408, 1408) == "gluon"
    assert shapes.expert_layout_on("NVIDIA A100-SXM4-80GB", 1408, 1408) == "sorted"
    assert shapes.expert_layout_on("NVIDIA H100 80GB HBM3", 200, 150) == "gather"
    assert names == {"fp8_grouped_gemm"}
    gl = [p for p in shapes.derive(cfg, load, layout="gluon") if p.experts]
    assert {(p.kernel, p.swiglu) for p in gl} == {("fp8_grouped_gemm_gluon", True), ("fp8_grouped_gemm_gluon", False)}
    assert all(p.tunable for p in gl) and "down" in " ".join(p.label() for p in gl)
    assert default_config("fp8_grouped_gemm_gluon", 1024, 2816, 1408, gate_up=True).BLOCK_M == 192
    assert default_config("fp8_grouped_gemm_gluon", 256, 1408, 1408, gate_up=False).BLOCK_M == 128
    assert default_config("fp8_grouped_gemm_gluon", 8, 1408, 1408, gate_up=False).BLOCK_M == 64
