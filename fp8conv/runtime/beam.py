"""Beam search over the 3 semantic IDs, optional catalogue constraint, and Recall@K / NDCG@K.

Each user's context K/V is computed once (model.encode_context) and shared by all of that user's beams
and all three steps: the decoder rows of user u are laid out contiguously, so the cross-attention sees
them as one (Q = beams x positions) query block over u's single context.

Step t (t = 0, 1, 2) scores every (beam, code) pair by the beam's summed log-probability plus
log_softmax of the level-t logits, and keeps the best ``beam_width`` (the last step keeps ``top_n``),
through ``backend.topk``. With a catalogue, a code whose prefix is not the prefix of any catalogue item
gets -inf. Users with fewer valid items than ``top_n`` get items -1 and scores -inf in the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8conv.errors import UserError

CATALOGUE_FILE = "catalogue.safetensors"


@dataclass(frozen=True)
class BeamResult:
    items: torch.Tensor  # (U, top_n, levels) int64, best first; -1 where no valid item
    scores: torch.Tensor  # (U, top_n) float32, summed log-probabilities; -inf where no valid item


class Catalogue:
    """A set of valid ID tuples (n, levels) with prefix lookups (a sorted array per prefix length)."""

    def __init__(self, items: torch.Tensor, codebook_size: int, source: str = "catalogue"):
        if items.dim() != 2 or items.dtype != torch.int64 or items.shape[0] == 0:
            raise UserError(f"{source}: 'items' must be a non-empty (n, levels) int64 tensor, got "
                            f"{items.dtype} {tuple(items.shape)}")
        if int(items.min()) < 0 or int(items.max()) >= codebook_size:
            raise UserError(f"{source}: item codes must lie in [0, {codebook_size})")
        self.items, self.k, self.levels, self.source = items, codebook_size, items.shape[1], source
        # prefix codes as base-K integers: at most 3 levels of K <= 2^20 fit in int64
        self._codes = [torch.unique(self._encode(items[:, :t + 1])) for t in range(self.levels)]

    def _encode(self, prefix: torch.Tensor) -> torch.Tensor:
        code = torch.zeros(prefix.shape[0], dtype=torch.int64, device=prefix.device)
        for j in range(prefix.shape[1]):
            code = code * self.k + prefix[:, j]
        return code

    def allowed(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (N, t) -> (N, K) bool: code c allowed after prefix if prefix + (c,) starts an item."""
        t = prefix.shape[1]
        sorted_codes = self._codes[t].to(prefix.device)
        cand = self._encode(prefix)[:, None] * self.k + torch.arange(self.k, device=prefix.device)
        idx = torch.searchsorted(sorted_codes, cand).clamp_(max=sorted_codes.numel() - 1)
        return sorted_codes[idx] == cand

    def contains(self, items: torch.Tensor) -> torch.Tensor:
        """items (..., levels) -> bool (...)."""
        flat = items.reshape(-1, self.levels)
        codes = self._codes[-1].to(items.device)
        c = self._encode(flat)
        idx = torch.searchsorted(codes, c).clamp_(max=codes.numel() - 1)
        return (codes[idx] == c).reshape(items.shape[:-1])


def load_catalogue(ckpt_dir: str | Path, codebook_size: int) -> Catalogue | None:
    """The ``catalogue.safetensors`` (tensor ``items`` (n, levels)) of a checkpoint folder, or None."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / CATALOGUE_FILE
    if not path.is_file():
        return None
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    if "items" not in d:
        raise UserError(f"{path}: missing tensor 'items'")
    return Catalogue(d["items"], codebook_size, source=str(path))


def beam_search(model, ctx, beam_width: int = 32, top_n: int = 10,
                catalogue: Catalogue | torch.Tensor | None = None) -> BeamResult:
    """Top ``top_n`` items per user of ``ctx`` (a ContextBatch). The per-step logits can be captured
    with ``model.recording()`` ("lm_heads.{t}", (U * beams, K))."""
    cfg = model.cfg
    if beam_width < 1 or top_n < 1:
        raise UserError(f"beam_width and top_n must be >= 1, got {beam_width}, {top_n}")
    if isinstance(catalogue, torch.Tensor):
        catalogue = Catalogue(catalogue, cfg.codebook_size)
    levels, k, dev = cfg.num_semantic_levels, cfg.codebook_size, model.device
    if catalogue is not None and catalogue.levels != levels:
        raise UserError(f"{catalogue.source}: items have {catalogue.levels} semantic IDs each, the model "
                        f"{levels}")
    kv = model.encode_context(ctx)  # once per user, shared by every beam and step
    u = ctx.num_users
    prefix = torch.zeros(u, 0, dtype=torch.int64, device=dev)  # (U * nb, t)
    beam_scores = torch.zeros(u, 1, dtype=torch.float32, device=dev)  # (U, nb)
    nb, past = 1, None
    for t in range(levels):
        user_index = torch.arange(u, device=dev).repeat_interleave(nb)
        logits, past = model.decode_step(kv, prefix, user_index, past)  # (U * nb, K)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if catalogue is not None:
            logp = logp.masked_fill(~catalogue.allowed(prefix.to(dev)), -math.inf)
        total = (beam_scores.reshape(-1, 1) + logp).view(u, nb * k)
        keep = min(top_n if t == levels - 1 else beam_width, nb * k)
        vals, idx = model.backend.topk(total, keep)  # (U, keep)
        parent, code = idx // k, idx % k
        prev = prefix.view(u, nb, t).gather(1, parent[..., None].expand(-1, -1, t))
        prefix = torch.cat([prev, code[..., None]], dim=2).view(u * keep, t + 1)
        rows = (torch.arange(u, device=dev)[:, None] * nb + parent).reshape(-1)
        past = model.reorder_past(past, rows)  # each new beam continues its parent's self-attn K/V
        beam_scores, nb = vals.float(), keep
    items = prefix.view(u, nb, levels)
    scores = beam_scores
    if nb < top_n:  # fewer candidates than asked for (tiny codebooks)
        items = torch.cat([items, items.new_full((u, top_n - nb, levels), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((u, top_n - nb), -math.inf)], dim=1)
    items = items.masked_fill(torch.isinf(scores)[..., None], -1)
    return BeamResult(items.contiguous(), scores.contiguous())


def _hits(result, labels: torch.Tensor, k: int) -> torch.Tensor:
    items = result.items if isinstance(result, BeamResult) else result
    if labels is None:
        raise UserError("Recall/NDCG need labels (the contexts carry none)")
    top = items[:, :k].to(labels.device)
    return (top == labels[:, None, :]).all(-1)  # (U, k) bool: an exact match of all IDs


def recall_at_k(result, labels: torch.Tensor, k: int = 10) -> float:
    """Fraction of users whose held-out item is among their top k (one relevant item per user)."""
    return _hits(result, labels, k).any(1).double().mean().item()


def ndcg_at_k(result, labels: torch.Tensor, k: int = 10) -> float:
    """Mean 1/log2(rank + 2) of the held-out item if ranked < k, else 0 (ideal DCG is 1)."""
    hits = _hits(result, labels, k).double()
    disc = 1.0 / torch.log2(torch.arange(hits.shape[1], dtype=torch.float64, device=hits.device) + 2)
    return (hits * disc).sum(1).mean().item()
