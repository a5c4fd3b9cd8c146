"""The fast backend: the runtime's operators (fp8conv.runtime.ops) on the Triton kernels.

Dispatch, per call:
- ``linear`` / ``norm_linear``: ``channel`` weights -> fused (RMSNorm +) per-token quantization, then
  the FP8 GEMM. Unquantized (``none``) and dense ``block`` weights -> the reference path.
- ``norm_linears`` (the self-attention's q, k, v): all ``channel`` -> one fused RMSNorm + quantization
  of x and one GEMM against the weights side by side (concatenated at first use). Else per-Linear.
- ``swiglu_mlp`` / ``norm_swiglu_mlp`` (a dense layer's MLP with its pre-norm, fused into the
  quantization of x by rmsnorm_quant): all three ``channel`` -> one quantization of x, one GEMM for gate and up together
  (weights pair-interleaved at first use, fp8_gemm.interleave_gate_up) with SwiGLU in its epilogue (configs
  of "fp8_gemm_swiglu"), so only the (M, I) product reaches memory, its per-token quantization, the down
  GEMM. Else per-Linear.
- ``experts``: block-FP8 experts -> the grouped pipeline (grouped_gemm.fused_experts) on weights
  packed at first use for the layout of grouped_gemm.expert_layout (on Hopper with Triton 3.6 the Gluon
  kernels, configs of "fp8_grouped_gemm_gluon"; elsewhere the tl.dot sorted layout where rows are
  16-byte aligned, else gather; grouped_gemm.layout_kernels names each layout's kernels). Else the
  reference.
- ``topk`` (beam search): kernels/topk.py on CUDA, its config looked up as the GEMMs' are (m = rows,
  n = row length, k = k).
- ``rms_norm`` (the norms before each MLP / MoE, before the heads, the context's key/value norms):
  kernels/norm.py, one pass in float32 with ops.rms_norm's numerics (bf16/fp16/fp32 inputs; else the
  reference). The reference's ``norm_linear`` / ``norm_linears`` fall back through it too.
- attention: inherited from the reference.

Kernels run when the input is on CUDA, or on the CPU when Triton's interpreter is on
(TRITON_INTERPRET=1; the tests use that) and the backend was built with ``allow_interpreter=True``.
Packed weights are cached per ops.Linear / ops.Experts object (keyed by id, dropped by a weakref
finalizer when the object dies). Configs come from the tuning cache when fp8conv.tuning.lookup exists,
else the documented defaults; ``config_sources`` records which was used for each shape.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter

import torch

from fp8conv.kernels import act_quant, norm
from fp8conv.kernels.config import KernelConfig, resolve_config
from fp8conv.kernels.fp8_gemm import fp8_gemm_nt, interleave_gate_up, swiglu_order_for
from fp8conv.kernels.grouped_gemm import INTERLEAVE, expert_layout, fused_experts, layout_kernels, pack_experts
from fp8conv.kernels.topk import topk as radix_topk
from fp8conv.runtime.ops import Experts, Linear, ReferenceBackend


class TritonBackend(ReferenceBackend):
    name = "triton"

    def __init__(self, allow_interpreter: bool = False):
        self._interp = allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1"
        self._packed: dict[tuple, object] = {}
        self._configs: dict[tuple, KernelConfig] = {}
        self.config_sources: dict[tuple, str] = {}
        self.calls: Counter = Counter()  # which path each operator took (for tests and reports)

    # -- helpers ----------------------------------------------------------------------------------
    def _on(self, x: torch.Tensor) -> bool:
        return x.is_cuda or self._interp

    def _config(self, kernel: str, m: int, n: int, k: int, gate_up: bool | None = None) -> KernelConfig:
        key = (kernel, m, n, k, gate_up)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg, src = resolve_config(kernel, m, n, k, gate_up)
            self._configs[key] = cfg
            self.config_sources[key] = src
        return cfg

    def _cached(self, owners: tuple, build, tag=None):
        key = tuple(id(o) for o in owners) + (tag,)
        hit = self._packed.get(key)
        if hit is None:
            hit = build()
            self._packed[key] = hit
            for o in owners:
                weakref.finalize(o, self._packed.pop, key, None)
        return hit

    def _side_by_side(self, *ws: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, scale) of ``channel`` FP8 Linears concatenated along N, one GEMM's operand for all
        of them (cached per tuple of Linears)."""
        return self._cached(ws, lambda: (
            torch.cat([w.weight.view(torch.uint8) for w in ws]).view(torch.float8_e4m3fn),
            torch.cat([w.scale.reshape(-1, 1) for w in ws]).float().contiguous()))

    @staticmethod
    def _channel_fp8(*ws: Linear) -> bool:
        return all(w.scheme == "channel" and w.weight.dtype == torch.float8_e4m3fn for w in ws)

    def _gemm(self, q, s, w: Linear | tuple, out_dtype):
        weight, scale = (w.weight, w.scale) if isinstance(w, Linear) else w
        m, k = q.shape
        n = weight.shape[0]
        return fp8_gemm_nt(q, s, weight, scale, out_dtype, config=self._config("fp8_gemm", m, n, k))

    # -- dense layers -----------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        if not (self._on(x) and self._channel_fp8(w)):
            self.calls["linear.reference"] += 1
            return super().linear(x, w)
        self.calls["linear.fp8"] += 1
        x2 = x.reshape(-1, x.shape[-1])
        q, s = act_quant.per_token_quant(x2)
        return self._gemm(q, s, w, x.dtype).reshape(*x.shape[:-1], -1)

    def norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w: Linear) -> torch.Tensor:
        if not (self._on(x) and self._channel_fp8(w)):
            self.calls["norm_linear.reference"] += 1
            return super().norm_linear(x, norm_weight, eps, w)
        self.calls["norm_linear.fp8"] += 1
        x2 = x.reshape(-1, x.shape[-1])
        q, s = act_quant.rmsnorm_quant(x2, norm_weight, eps)
        return self._gemm(q, s, w, x.dtype).reshape(*x.shape[:-1], -1)

    def norm_linears(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     ws: tuple[Linear, ...]) -> tuple[torch.Tensor, ...]:
        """One fused RMSNorm + per-token quantization of x and one GEMM against the weights
        concatenated along N (cached at first use); the outputs are column views of its result. The
        same numbers as norm_linear per weight: the quantized x and each output channel's weight and
        scale are the same."""
        k = x.shape[-1]
        if not (self._on(x) and self._channel_fp8(*ws) and all(w.weight.shape[1] == k for w in ws)):
            self.calls["norm_linears.split"] += 1
            return super().norm_linears(x, norm_weight, eps, ws)  # per-Linear dispatch
        self.calls["norm_linears.fp8"] += 1
        wcat = self._side_by_side(*ws)
        x2 = x.reshape(-1, k)
        q, s = act_quant.rmsnorm_quant(x2, norm_weight, eps)
        out = self._gemm(q, s, wcat, x.dtype)  # (M, sum of N)
        outs, lo = [], 0
        for w in ws:
            n = w.weight.shape[0]
            outs.append(out[:, lo:lo + n].reshape(*x.shape[:-1], n))  # views: the last dim stays unit-stride
            lo += n
        return tuple(outs)

    def _swiglu_fused(self, x: torch.Tensor, gate: Linear, up: Linear, down: Linear) -> bool:
        return self._on(x) and self._channel_fp8(gate, up, down) and gate.weight.shape == up.weight.shape

    def swiglu_mlp(self, x: torch.Tensor, gate: Linear, up: Linear, down: Linear) -> torch.Tensor:
        if not self._swiglu_fused(x, gate, up, down):
            self.calls["swiglu_mlp.split"] += 1
            return super().swiglu_mlp(x, gate, up, down)  # per-Linear dispatch
        self.calls["swiglu_mlp.fp8"] += 1
        x2 = x.reshape(-1, x.shape[-1])
        return self._swiglu_fp8(*act_quant.per_token_quant(x2), gate, up, down, x.dtype).reshape(*x.shape[:-1], -1)

    def norm_swiglu_mlp(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate: Linear, up: Linear,
                        down: Linear) -> torch.Tensor:
        """swiglu_mlp with the pre-norm fused into the quantization of x (rmsnorm_quant): the normalized
        rows are never written in bf16."""
        if not self._swiglu_fused(x, gate, up, down):
            return super().norm_swiglu_mlp(x, norm_weight, eps, gate, up, down)  # rms_norm, then swiglu_mlp
        self.calls["norm_swiglu_mlp.fp8"] += 1
        x2 = x.reshape(-1, x.shape[-1])
        q, s = act_quant.rmsnorm_quant(x2, norm_weight, eps)
        return self._swiglu_fp8(q, s, gate, up, down, x.dtype).reshape(*x.shape[:-1], -1)

    def _swiglu_fp8(self, q, s, gate: Linear, up: Linear, down: Linear, dtype: torch.dtype) -> torch.Tensor:
        """The dense MLP on x quantized per token (q, s): the gate/up GEMM with SwiGLU in its epilogue,
        the per-token quantization of its (M, I) output, the down GEMM."""
        inter = gate.weight.shape[0]
        order = swiglu_order_for(inter)
        w13 = self._cached((gate, up), lambda: (
            interleave_gate_up(gate.weight, up.weight, order),
            interleave_gate_up(gate.scale.reshape(-1, 1).float(), up.scale.reshape(-1, 1).float(), order)), "pairs")
        m, k = q.shape
        # (M, I): silu(gate) * up, rounded as the unfused path rounds it
        h = fp8_gemm_nt(q, s, *w13, dtype, config=self._config("fp8_gemm_swiglu", m, 2 * inter, k), swiglu=True,
                        swiglu_order=order)
        hq, hs = act_quant.per_token_quant(h)
        return self._gemm(hq, hs, down, dtype)

    # -- norms --------------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not (self._on(x) and x.dtype in norm.DTYPES):
            self.calls["rms_norm.reference"] += 1
            return super().rms_norm(x, weight, eps)
        self.calls["rms_norm.triton"] += 1
        return norm.rms_norm(x, weight, eps)

    # -- beam search --------------------------------------------------------------------------------
    def topk(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """kernels/topk.py on CUDA (values bit-identical to torch.topk; equal values lowest index first).
        Not under the interpreter: beam search's rows are millions of candidates."""
        if not (scores.is_cuda and scores.dim() == 2 and 1 <= k <= scores.shape[1]):
            self.calls["topk.reference"] += 1
            return super().topk(scores, k)
        self.calls["topk.triton"] += 1
        r, c = scores.shape
        cfg = self._config("topk", max(1, r), c, k)  # tuned per (C, k, bucket of the rows), as the GEMMs
        return radix_topk(scores if scores.stride(1) == 1 else scores.contiguous(), k, config=cfg)

    # -- MoE ----------------------------------------------------------------------------------------
    def experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                w: Experts) -> torch.Tensor:
        scales = (w.gate_scale, w.up_scale, w.down_scale)
        fp8 = all(t.dtype == torch.float8_e4m3fn for t in (w.gate, w.up, w.down))
        if not (self._on(x) and fp8 and all(s is not None and s.dim() == 3 for s in scales)):
            self.calls["experts.reference"] += 1
            return super().experts(x, topk_ids, topk_weights, w)
        self.calls["experts.fp8"] += 1
        inter, d = w.gate.shape[1], w.gate.shape[2]
        layout = expert_layout(d, inter, x.device)  # gluon (Hopper), sorted, or gather (unaligned rows)
        packed = self._cached((w,), lambda: pack_experts(w.gate, w.up, w.down, *scales,
                                                         interleave=INTERLEAVE[layout]), tag=layout)
        gate_up, down = layout_kernels(layout)  # each GEMM tuned on its own
        self.calls[f"experts.{layout}"] += 1
        t, d = x.shape
        rows = max(1, t * topk_ids.shape[1] // packed.num_experts)
        cfg1 = self._config(gate_up, rows, packed.w13.shape[1], d, gate_up=True)
        cfg2 = self._config(down, rows, d, packed.inter, gate_up=False)
        return fused_experts(x, topk_ids, topk_weights, packed, cfg1, cfg2, layout=layout)
