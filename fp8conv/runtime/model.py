"""The OneRec-V2 lazy decoder-only model (DESIGN, "The model"), one definition for every backend and
precision. Every Linear of attention / FFN / experts, every attention and the expert GEMM go through
``self.backend`` (fp8conv.runtime.ops); the context processor, embeddings, norms, router and heads
stay in the source precision (the heads and context projection still call backend.linear, with an
unquantized ops.Linear unless a recipe quantized them).

Choices DESIGN leaves open, and why:
- No position embedding in the decoder: it only ever sees [BOS, s1, s2]; the causal self-attention and
  the level-specific embedding rows (row 1 + l*K + c) already tell positions apart. The context has
  none either: it is a bag of feature tokens tagged with their pathway.
- Router: plain float32 torch (sigmoid scores, top-k on scores + e_score_correction_bias, weights =
  chosen scores, normalised if norm_topk_prob, times routed_scaling_factor). No DeepSeek group-limited
  routing: the config has no n_group / topk_group.
- Beam search decodes incrementally (``decode_step``): each step computes only the new decoder position
  and keeps every beam's self-attention K/V of the earlier ones; the context K/V is computed once per
  user. ``forward_logits`` / ``forward_levels`` recompute the whole prefix (at most 3 tokens).

Recording: ``with model.recording() as rec:`` collects name -> list of tensors: "context.kv.{j}"
(U, S, G, D) per chunk, "model.layers.{n}" (N, T, d) block outputs of the positions computed (T = 1
per step inside beam search), "model.layers.{n}.mlp.gate"
(tokens, E) router scores of MoE layers, "lm_heads.{i}" (N, K) float32 logits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8conv import numerics as fp8
from fp8conv.config import OneRecConfig, load_config, tensor_specs
from fp8conv.errors import UserError
from fp8conv.runtime import ops
from fp8conv.runtime.inputs import ContextBatch
from fp8conv.runtime.loader import StoredTensor, is_quantized, read_checkpoint

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"unsupported activation dtype {dtype!r}; choose bf16, fp16 or fp32")


@dataclass(frozen=True)
class SwiGLU:
    gate: ops.Linear
    up: ops.Linear
    down: ops.Linear


@dataclass(frozen=True)
class MoE:
    router: torch.Tensor  # (E, d) float32
    bias: torch.Tensor  # (E,) float32 e_score_correction_bias
    experts: ops.Experts
    shared: SwiGLU | None


@dataclass(frozen=True)
class Block:
    cross_norm: torch.Tensor
    cross_q: ops.Linear
    cross_o: ops.Linear
    self_norm: torch.Tensor
    q: ops.Linear
    k: ops.Linear
    v: ops.Linear
    o: ops.Linear
    post_norm: torch.Tensor
    mlp: SwiGLU | MoE


@dataclass(frozen=True)
class ContextKV:
    """Per KV set l: keys[l], values[l] (U, S, G, D); lengths (U,). Computed once per user."""

    keys: tuple
    values: tuple
    lengths: torch.Tensor


class OneRecModel:
    def __init__(self, cfg: OneRecConfig, tensors: dict[str, StoredTensor | torch.Tensor],
                 dtype=torch.float32, device="cpu", backend="reference", quantized: bool | None = None):
        self.cfg = cfg
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.backend = ops.get_backend(backend) if isinstance(backend, str) else backend
        st = {k: v if isinstance(v, StoredTensor) else StoredTensor(v) for k, v in tensors.items()}
        missing = [n for n in tensor_specs(cfg) if n not in st]
        if missing:
            raise UserError(f"model: missing tensor(s) {', '.join(missing[:5])}")
        self.quantized = any(t.scale is not None for t in st.values()) if quantized is None else quantized
        self._st = st
        self._plain: dict[str, torch.Tensor] = {}
        self._linears: dict[str, ops.Linear] = {}
        self._experts: dict[str, ops.Experts] = {}
        self._rec: dict | None = None
        self._build()
        del self._st

    # -- construction -------------------------------------------------------------------------
    def _plain_tensor(self, name: str, dtype=None) -> torch.Tensor:
        """A source-precision tensor (dequantized if a recipe made it FP8), in ``dtype``."""
        t = self._st[name]
        x = t.data if t.scale is None else fp8.dequantize(t.data, t.scale)
        x = x.to(self.device, dtype or self.dtype)
        self._plain[name] = x
        return x

    def _linear(self, prefix: str) -> ops.Linear:
        t = self._st[prefix + ".weight"]
        if t.scale is None:
            lin = ops.Linear(t.data.to(self.device, self.dtype), None, prefix)
        else:
            lin = ops.Linear(t.data.to(self.device), t.scale.to(self.device, torch.float32), prefix)
        self._linears[prefix] = lin
        return lin

    def _swiglu(self, prefix: str) -> SwiGLU:
        return SwiGLU(*(self._linear(f"{prefix}.{p}") for p in ("gate_proj", "up_proj", "down_proj")))

    def _stacked_experts(self, prefix: str) -> ops.Experts:
        parts, scales = {}, {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            ts = [self._st[f"{prefix}.{e}.{proj}.weight"] for e in range(self.cfg.n_routed_experts)]
            kinds = {(t.data.dtype, None if t.scale is None else tuple(t.scale.shape)) for t in ts}
            if len(kinds) > 1:
                raise UserError(f"{prefix}.*.{proj}.weight: experts of one layer must share one dtype and "
                                f"scale layout, found {sorted(map(str, kinds))}")
            fp8_w = ts[0].scale is not None
            w = torch.stack([t.data for t in ts]).to(self.device)
            parts[proj] = w if fp8_w else w.to(self.dtype)
            scales[proj] = torch.stack([t.scale for t in ts]).to(self.device, torch.float32) if fp8_w else None
        ex = ops.Experts(parts["gate_proj"], parts["up_proj"], parts["down_proj"], scales["gate_proj"],
                         scales["up_proj"], scales["down_proj"], name=prefix)
        self._experts[prefix] = ex
        return ex

    def _build(self) -> None:
        cfg = self.cfg
        self.embed = self._plain_tensor("model.embed_tokens.weight")
        self.ctx_token_embed = self._plain_tensor("context.token_embed.weight")
        self.ctx_pathway_embed = self._plain_tensor("context.pathway_embed.weight")
        self.ctx_norm = self._plain_tensor("context.norm.weight")
        self.ctx_proj = self._linear("context.proj")
        self.kv_norms = [self._plain_tensor(f"context.kv_norms.{j}.weight")
                         for j in range(cfg.kv_split * cfg.num_kv_sets)]
        self.layers: list[Block] = []
        for n in range(cfg.num_hidden_layers):
            p = f"model.layers.{n}"
            if cfg.is_moe_layer(n):
                mlp = MoE(self._plain_tensor(f"{p}.mlp.gate.weight", torch.float32),
                          self._plain_tensor(f"{p}.mlp.gate.e_score_correction_bias", torch.float32),
                          self._stacked_experts(f"{p}.mlp.experts"),
                          self._swiglu(f"{p}.mlp.shared_experts") if cfg.n_shared_experts else None)
            else:
                mlp = self._swiglu(f"{p}.mlp")
            self.layers.append(Block(
                self._plain_tensor(f"{p}.cross_attn_layernorm.weight"), self._linear(f"{p}.cross_attn.q_proj"),
                self._linear(f"{p}.cross_attn.o_proj"), self._plain_tensor(f"{p}.self_attn_layernorm.weight"),
                *(self._linear(f"{p}.self_attn.{x}_proj") for x in "qkvo"),
                self._plain_tensor(f"{p}.post_attention_layernorm.weight"), mlp))
        self.final_norm = self._plain_tensor("model.norm.weight")
        self.heads = [(self._plain_tensor(f"lm_heads.{i}.norm.weight"), self._linear(f"lm_heads.{i}.proj"))
                      for i in range(cfg.num_semantic_levels)]

    # -- introspection ------------------------------------------------------------------------
    def linears(self) -> dict[str, ops.Linear]:
        """Module prefix (checkpoint name without '.weight') -> Linear, routed experts excluded."""
        return dict(self._linears)

    def experts(self) -> dict[str, ops.Experts]:
        """'model.layers.{n}.mlp.experts' -> the stacked routed experts of that layer."""
        return dict(self._experts)

    def parameters(self) -> list[torch.Tensor]:
        """Every distinct tensor the model computes with (for training: requires_grad_ on these)."""
        out = list(self._plain.values()) + [lin.weight for lin in self._linears.values()]
        for ex in self._experts.values():
            out += [ex.gate, ex.up, ex.down]
        return out

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Checkpoint names -> tensors (experts unstacked; FP8 weights with their weight_scale).
        Unquantized tensors are cast to ``dtype`` if given (router and bias included)."""
        cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
        out = {name: cast(t) for name, t in self._plain.items()}
        for prefix, lin in self._linears.items():
            out[prefix + ".weight"] = lin.weight.detach() if lin.scale is not None else cast(lin.weight)
            if lin.scale is not None:
                out[prefix + ".weight_scale"] = lin.scale
        for prefix, ex in self._experts.items():
            for e in range(ex.num_experts):
                for lin in ex.expert(e):
                    out[lin.name + ".weight"] = lin.weight.detach() if lin.scale is not None else cast(lin.weight)
                    if lin.scale is not None:
                        out[lin.name + ".weight_scale"] = lin.scale
        ordered = {}
        for name in tensor_specs(self.cfg):  # checkpoint order, each scale right after its weight
            ordered[name] = out[name].contiguous()
            if name + "_scale" in out:
                ordered[name + "_scale"] = out[name + "_scale"].contiguous()
        return ordered

    # -- recording ----------------------------------------------------------------------------
    @contextmanager
    def recording(self):
        prev, rec = self._rec, {}
        self._rec = rec
        try:
            yield rec
        finally:
            self._rec = prev

    def _record(self, name: str, tensor: torch.Tensor) -> None:
        if self._rec is not None:
            self._rec.setdefault(name, []).append(tensor.detach())

    # -- forward ------------------------------------------------------------------------------
    def encode_context(self, ctx: ContextBatch) -> ContextKV:
        """The context processor: (U, S) tokens -> per KV set keys and values (U, S, G, D)."""
        cfg, be = self.cfg, self.backend
        ctx.check_config(cfg)
        ctx = ctx.to(self.device)
        u, s = ctx.tokens.shape
        # F.embedding rather than indexing: its CPU backward is deterministic (training reproduces)
        x = F.embedding(ctx.tokens, self.ctx_token_embed) + F.embedding(ctx.pathways, self.ctx_pathway_embed)
        c = be.norm_linear(x, self.ctx_norm, cfg.rms_norm_eps, self.ctx_proj)  # (U, S, d_ctx)
        c = c.view(u, s, cfg.kv_split * cfg.num_kv_sets, cfg.num_key_value_heads, cfg.head_dim)
        chunks = []
        for j, w in enumerate(self.kv_norms):
            cj = be.rms_norm(c[:, :, j], w, cfg.rms_norm_eps)  # (U, S, G, D)
            self._record(f"context.kv.{j}", cj)
            chunks.append(cj)
        sk = cfg.kv_split
        keys = tuple(chunks[l * sk] for l in range(cfg.num_kv_sets))
        values = tuple(chunks[l * sk + sk - 1] for l in range(cfg.num_kv_sets))
        return ContextKV(keys, values, ctx.lengths)

    def forward_logits(self, ctx: ContextBatch | None, prefix: torch.Tensor, user_index: torch.Tensor,
                       kv: ContextKV | None = None) -> torch.Tensor:
        """Next-level logits (N, K) float32 given the chosen IDs ``prefix`` (N, t), t < levels; row r
        belongs to user ``user_index[r]`` of ``ctx``. Pass ``kv`` (from encode_context) to reuse it."""
        kv = kv if kv is not None else self.encode_context(ctx)
        return self.decode_step(kv, prefix, user_index)[0]

    def decode_step(self, kv: ContextKV, prefix: torch.Tensor, user_index: torch.Tensor,
                    past: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """Incremental form of forward_logits for beam search: ``past`` holds each layer's
        self-attention (k, v) (N, p, G, D) of the first p decoder positions (None: p = 0), so only
        positions p..t are computed. Returns (logits (N, K), past extended to t + 1 positions); reorder
        the rows of ``past`` with ``reorder_past`` when beams are re-ranked."""
        t = prefix.shape[1]
        if not 0 <= t < self.cfg.num_semantic_levels:
            raise ValueError(f"prefix length {t} must be < {self.cfg.num_semantic_levels}")
        start = 0 if past is None else past[0][0].shape[1]
        tokens = self._decoder_tokens(prefix)[:, start:]
        h, past = self._decode(kv, tokens, user_index.to(self.device), past)
        return self._head(h[:, -1], t), past

    @staticmethod
    def reorder_past(past: tuple, rows: torch.Tensor) -> tuple:
        return tuple((k[rows], v[rows]) for k, v in past)

    def forward_levels(self, ctx: ContextBatch | None, items: torch.Tensor, user_index: torch.Tensor,
                       kv: ContextKV | None = None) -> torch.Tensor:
        """Teacher forcing: logits (N, levels, K) float32 of every level given the true earlier IDs of
        ``items`` (N, levels) (the last level's ID is not used). One pass over [BOS, s1, s2]."""
        levels = self.cfg.num_semantic_levels
        kv = kv if kv is not None else self.encode_context(ctx)
        h, _ = self._decode(kv, self._decoder_tokens(items[:, :levels - 1]), user_index.to(self.device))
        return torch.stack([self._head(h[:, i], i) for i in range(levels)], dim=1)

    def _decoder_tokens(self, prefix: torch.Tensor) -> torch.Tensor:
        """[BOS, s1, ..] embedding rows: BOS is row 0, code c of level l is row 1 + l*K + c."""
        prefix = prefix.to(self.device, torch.int64)
        if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= self.cfg.codebook_size):
            raise ValueError(f"semantic IDs must lie in [0, {self.cfg.codebook_size})")
        n, t = prefix.shape
        offs = 1 + torch.arange(t, device=self.device) * self.cfg.codebook_size
        bos = torch.zeros(n, 1, dtype=torch.int64, device=self.device)
        return torch.cat([bos, prefix + offs], dim=1)

    def _decode(self, kv: ContextKV, tokens: torch.Tensor, user_index: torch.Tensor,
                past: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """Decoder positions p..p+T-1 given ``tokens`` (N, T) and the self-attention K/V of positions
        < p in ``past``: -> (h (N, T, d), past extended to p + T positions)."""
        cfg, be, eps = self.cfg, self.backend, self.cfg.rms_norm_eps
        n, t = tokens.shape
        hq, g, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        groups = _UserGroups(user_index, kv.lengths.shape[0])
        h = F.embedding(tokens, self.embed)  # (N, T, d)
        new_past = []
        for i, blk in enumerate(self.layers):
            l = cfg.kv_set_of_layer(i)
            q = be.norm_linear(h, blk.cross_norm, eps, blk.cross_q).view(n, t, hq, dh)
            a = groups.scatter(be.cross_attention(groups.gather(q), kv.keys[l], kv.values[l], kv.lengths))
            h = h + be.linear(a.reshape(n, t, hq * dh), blk.cross_o)
            q, k, v = be.norm_linears(h, blk.self_norm, eps, (blk.q, blk.k, blk.v))
            k, v = k.view(n, t, g, dh), v.view(n, t, g, dh)
            if past is not None:
                k, v = torch.cat([past[i][0], k], dim=1), torch.cat([past[i][1], v], dim=1)
            new_past.append((k, v))
            a = self._self_attention(q.view(n, t, hq, dh), k, v)
            h = h + be.linear(a.reshape(n, t, hq * dh), blk.o)
            if isinstance(blk.mlp, MoE):  # the normalized x also feeds the router and the shared expert
                h = h + self._moe(be.rms_norm(h, blk.post_norm, eps), blk.mlp, i)
            else:
                h = h + be.norm_swiglu_mlp(h, blk.post_norm, eps, blk.mlp.gate, blk.mlp.up, blk.mlp.down)
            self._record(f"model.layers.{i}", h)
        return h, tuple(new_past)

    def _self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last T positions (q (N, T, H, D)) over all P >= T positions of k/v.
        The backend's op is square (q and k of one length), so earlier query rows are zero-padded in
        and dropped after: at most 2 extra rows, and the op keeps its simple contract."""
        n, t, hq, dh = q.shape
        p = k.shape[1]
        if p > t:
            q = torch.cat([q.new_zeros(n, p - t, hq, dh), q], dim=1)
        return self.backend.self_attention(q, k, v)[:, p - t:]

    def _moe(self, x: torch.Tensor, moe: MoE, layer: int) -> torch.Tensor:
        """DeepSeek-V3 routing: x (N, T, d) -> (N, T, d)."""
        cfg, shape = self.cfg, x.shape
        xf = x.reshape(-1, shape[-1])
        scores = torch.sigmoid(xf.float() @ moe.router.t())  # (tokens, E) float32
        self._record(f"model.layers.{layer}.mlp.gate", scores)
        ids = torch.topk(scores + moe.bias, cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * cfg.routed_scaling_factor
        y = self.backend.experts(xf, ids, w, moe.experts)
        if moe.shared is not None:
            y = y + self.backend.swiglu_mlp(xf, moe.shared.gate, moe.shared.up, moe.shared.down)
        return y.view(shape)

    def _head(self, h: torch.Tensor, i: int) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        norm, proj = self.heads[i]
        x = self.backend.rms_norm(h, self.final_norm, eps)
        logits = self.backend.norm_linear(x, norm, eps, proj).float()  # (N, K)
        self._record(f"lm_heads.{i}", logits)
        return logits


class _UserGroups:
    """Rows (N, ...) <-> per-user query blocks (U, Q, ...) for the shared-context cross-attention.

    The beam-search layout (user_index sorted, every user the same number of rows) is a free view;
    anything else is packed into a zero-padded (U, max rows, ...) buffer and unpacked after."""

    def __init__(self, user_index: torch.Tensor, num_users: int):
        self.n, self.u = user_index.shape[0], num_users
        if self.n and (int(user_index.min()) < 0 or int(user_index.max()) >= num_users):
            raise ValueError(f"user_index must lie in [0, {num_users}) (the users of the context batch)")
        counts = torch.bincount(user_index, minlength=num_users)
        self.uniform = bool((counts == counts[0]).all()) and bool((user_index[1:] >= user_index[:-1]).all())
        if not self.uniform:
            self.order = torch.argsort(user_index, stable=True)
            starts = torch.cumsum(counts, 0) - counts
            self.users = user_index[self.order]
            self.rank = torch.arange(self.n, device=user_index.device) - starts[self.users]
            self.width = int(counts.max())

    def gather(self, q: torch.Tensor) -> torch.Tensor:  # (N, T, H, D) -> (U, Q, H, D)
        _, t, h, d = q.shape
        if self.uniform:
            return q.reshape(self.u, -1, h, d)
        buf = q.new_zeros(self.u, self.width, t, h, d)
        buf[self.users, self.rank] = q[self.order]
        return buf.view(self.u, self.width * t, h, d)

    def scatter(self, a: torch.Tensor) -> torch.Tensor:  # (U, Q, H, D) -> (N, T, H, D)
        _, _, h, d = a.shape
        if self.uniform:
            return a.reshape(self.n, -1, h, d)
        a = a.view(self.u, self.width, -1, h, d)
        out = a.new_empty(self.n, a.shape[2], h, d)
        out[self.order] = a[self.users, self.rank]
        return out


def load_model(ckpt_dir, device="cpu", dtype=None, backend="reference") -> OneRecModel:
    """Load a checkpoint folder. dtype None = config.json's torch_dtype (also for FP8 checkpoints,
    whose activations run in it); float32 for CPU exactness."""
    cfg = load_config(ckpt_dir)
    cfg, tensors = read_checkpoint(ckpt_dir, cfg)
    dtype = resolve_dtype(dtype if dtype is not None else cfg.torch_dtype)
    return OneRecModel(cfg, tensors, dtype=dtype, device=device, backend=backend,
                       quantized=is_quantized(cfg, tensors))


def random_state(cfg: OneRecConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A freshly initialised state (tests, and the start of training): Linear weights N(0, 1/K) with
    the residual-branch outputs (o_proj, down_proj) scaled by 1/sqrt(2 layers), embeddings N(0, 0.5^2),
    norms 1, router N(0, 1/d), correction bias 0. Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_specs(cfg).items():
        if name.endswith("norm.weight") or ".kv_norms." in name:
            t = torch.ones(shape)
        elif name.endswith("e_score_correction_bias"):
            t = torch.zeros(shape)
        elif "embed" in name:
            t = torch.randn(shape, generator=g) * 0.5
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                t = t / math.sqrt(2 * cfg.num_hidden_layers)
        out[name] = t.to(dtype)
    return out
