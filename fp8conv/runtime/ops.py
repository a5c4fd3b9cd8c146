"""The operator layer: the small set of operators the OneRec-V2 model calls, and its backends.

The model (fp8conv/runtime/model.py) only calls a ``Backend``. The reference backend below is plain
PyTorch, runs on CPU and CUDA, and *emulates* FP8 with the contract's numerics (fp8conv.numerics):
per-token (channel scheme) or 1x128-group (block scheme) dynamic activation quantization, FP8 weights
dequantized, products in float32, output in the activation dtype. The Triton backend
(fp8conv.kernels.backend, CUDA only) implements the same methods with fused kernels; tests hold the two
to the same results within tolerance.

Shapes are commented as (tokens, features) etc. Linear weights are [N, K] (out, in).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8conv import numerics as fp8


@dataclass(frozen=True)
class Linear:
    """A Linear layer's weight as the runtime holds it.

    weight: [N, K], the activation dtype (unquantized) or float8_e4m3fn.
    scale:  None (unquantized); [N, 1] float32 (``channel``); [ceil(N/128), ceil(K/128)] (``block``).
    """

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    name: str = ""

    @property
    def scheme(self) -> str:
        if self.scale is None:
            return "none"
        n, _ = self.weight.shape
        return "channel" if tuple(self.scale.shape) == (n, 1) else "block"

    @functools.cached_property
    def dequantized(self) -> torch.Tensor:
        """[N, K] float32: what the FP8 GEMM multiplies by (cached; cached_property works on frozen
        dataclasses because it writes the instance __dict__ directly)."""
        if self.scale is None:
            return self.weight.float()
        return fp8.dequantize(self.weight, self.scale)


@dataclass(frozen=True)
class Experts:
    """The routed experts of one MoE layer, stacked along dim 0 (E experts, width I, model dim d).

    gate, up: [E, I, d]; down: [E, d, I]; each an activation-dtype or float8_e4m3fn tensor.
    *_scale: None, or block scales [E, ceil(rows/128), ceil(cols/128)] float32.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: torch.Tensor | None = None
    up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None
    name: str = ""

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def expert(self, e: int) -> tuple[Linear, Linear, Linear]:
        def one(w, s, tag):
            return Linear(w[e], None if s is None else s[e], f"{self.name}.{e}.{tag}")
        return (one(self.gate, self.gate_scale, "gate_proj"), one(self.up, self.up_scale, "up_proj"),
                one(self.down, self.down_scale, "down_proj"))

    @functools.cached_property
    def _per_expert(self) -> list[tuple[Linear, Linear, Linear]]:
        return [self.expert(e) for e in range(self.num_experts)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, output in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class ReferenceBackend:
    """Plain PyTorch. FP8 layers are emulated bit-faithfully to the contract (fake quantization of the
    activations, dequantized weights, float32 products)."""

    name = "reference"

    # -- dense layers -------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        scheme = w.scheme
        if scheme == "none":
            xf = x.float()
        elif scheme == "channel":
            xf = fp8.fake_quant_per_token(x)
        else:
            xf = fp8.fake_quant_per_group(x)
        return (xf @ w.dequantized.t()).to(x.dtype)

    def norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w: Linear) -> torch.Tensor:
        """linear(rms_norm(x)). The Triton backend fuses the norm with the activation quantization
        (where it does not, it lands here and normalizes through its own ``rms_norm``)."""
        return self.linear(self.rms_norm(x, norm_weight, eps), w)

    def norm_linears(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     ws: tuple[Linear, ...]) -> tuple[torch.Tensor, ...]:
        """(linear(rms_norm(x), w) for w in ws): projections that share one normalized input (the
        self-attention's q, k, v). The Triton backend normalizes and quantizes x once and runs one GEMM
        against the weights side by side."""
        xn = self.rms_norm(x, norm_weight, eps)
        return tuple(self.linear(xn, w) for w in ws)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def swiglu_mlp(self, x: torch.Tensor, gate: Linear, up: Linear, down: Linear) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)); gate/up outputs rounded to x's dtype like any Linear output."""
        h = F.silu(self.linear(x, gate).float()) * self.linear(x, up).float()
        return self.linear(h.to(x.dtype), down)

    def norm_swiglu_mlp(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate: Linear, up: Linear,
                        down: Linear) -> torch.Tensor:
        """swiglu_mlp(rms_norm(x)): a dense layer's MLP with its pre-norm. The Triton backend fuses the
        norm with the activation quantization (where it does not, it lands here)."""
        return self.swiglu_mlp(self.rms_norm(x, norm_weight, eps), gate, up, down)

    # -- MoE ------------------------------------------------------------------------------------
    def experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                w: Experts) -> torch.Tensor:
        """Routed experts. x (T, d); topk_ids (T, k) int; topk_weights (T, k) float32 -> (T, d).

        out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]), summed in float32.
        """
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        flat_ids = topk_ids.reshape(-1)
        for e in torch.unique(flat_ids).tolist():
            rows, slot = (topk_ids == e).nonzero(as_tuple=True)
            g, u, dn = w._per_expert[e]
            y = self.swiglu_mlp(x[rows], g, u, dn)
            out.index_add_(0, rows, y.float() * topk_weights[rows, slot].float().unsqueeze(1))
        return out.to(x.dtype)

    # -- attention ------------------------------------------------------------------------------
    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        ctx_lens: torch.Tensor) -> torch.Tensor:
        """Many beams over one shared context per user.

        q (U, Q, H, D): all query rows of user u (beams x positions); k, v (U, S, G, D) with G | H;
        ctx_lens (U,) valid context length per user (positions >= len are masked) -> (U, Q, H, D).
        """
        s_ = k.shape[1]
        mask = torch.arange(s_, device=q.device)[None, :] < ctx_lens[:, None].to(q.device)  # (U, S)
        return self._sdpa(q, k, v, mask[:, None, None, :])

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal self-attention. q (N, T, H, D); k, v (N, T, G, D) -> (N, T, H, D)."""
        t = q.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        return self._sdpa(q, k, v, mask[None, None])

    @staticmethod
    def _sdpa(q, k, v, mask):
        h, g = q.shape[2], k.shape[2]
        qf = q.float().transpose(1, 2)  # (B, H, Q, D)
        kf = k.float().transpose(1, 2).repeat_interleave(h // g, dim=1)
        vf = v.float().transpose(1, 2).repeat_interleave(h // g, dim=1)
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
        return out.transpose(1, 2).to(q.dtype)

    # -- beam search ----------------------------------------------------------------------------
    def topk(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """scores (B, N) -> (values (B, k), indices (B, k) int64), descending."""
        return torch.topk(scores, k, dim=-1, sorted=True)


def get_backend(name: str = "reference"):
    """'reference' (plain PyTorch) or 'triton' (fused Triton kernels; CUDA only)."""
    if name == "reference":
        return ReferenceBackend()
    if name == "triton":
        from fp8conv.kernels.backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown backend {name!r}; choose 'reference' or 'triton'")
