"""Step 2 of ``fp8conv verify``: run REF and CAND on the same contexts and compare what they do.

- Beam search on both (the serving path): identical top-1 item, top-N overlap, Kendall tau of the
  shared items' ranks; Recall@K / NDCG@K of both when the contexts carry labels.
- Teacher-forced forward passes on the same prefixes for both (REF's best few beams, so that the
  inputs are the ones beam search actually explores): per-layer output error through the runtime's
  recording hooks (block outputs, context K/V, head logits), and head logits agreement (cosine, KL).

Per-layer errors are pooled over all prefixes of a layer; "contribution" is how much relative noise
power (noise / signal, the inverse of SQNR) a decoder layer adds to what the previous one had, which is
how a broken layer deep in the residual stream is told apart from error it merely inherited.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from fp8conv.metrics import cosine, kendall_tau, kl_divergence, rel_error
from fp8conv.verify_weights import finite_sqnr_db

# How many of REF's best beams per user are replayed teacher-forced through both models: 2 x users x 3
# positions is plenty of rows for per-layer statistics, and replay stays small next to beam search.
REPLAY_BEAMS = 2
_LAYER = re.compile(r"^model\.layers\.(\d+)$")


@dataclass(frozen=True)
class LayerStat:
    name: str
    rel_error: float
    sqnr_db: float
    drop_db: float  # SQNR of the previous decoder layer minus this one's (nan for non-decoder tensors)
    contribution: float  # relative noise power added by this layer (>= 0 means it made things worse)


@dataclass(frozen=True)
class HeadStat:
    head: int
    cosine: float
    kl: float
    top1_agreement: float  # argmax of the logits, per teacher-forced row


@dataclass(frozen=True)
class BeamStat:
    users: int
    beam_width: int
    top_n: int
    tie_margin: float
    top1_agreement: float  # identical top-1 item (all semantic IDs), the literal figure
    topk_overlap: float  # mean |top-N(REF) & top-N(CAND)| / N
    top1_agreement_within_tie: float  # ... or CAND's top-1 scores within tie_margin of REF's, by REF
    topk_overlap_within_tie: float  # ... or CAND's item scores within tie_margin of REF's N-th, by REF
    rank_correlation: float  # mean Kendall tau over users with >= 2 shared items (nan if none)
    regret: float  # mean REF log-prob of REF's top-1 minus that of CAND's top-1 (nats, >= 0 ideally)
    top1_disagreeing_users: tuple[int, ...]


@dataclass(frozen=True)
class RecStat:
    k: int
    recall_ref: float
    recall_cand: float
    ndcg_ref: float
    ndcg_cand: float

    @property
    def recall_drop(self) -> float:
        return _rel_drop(self.recall_ref, self.recall_cand)

    @property
    def ndcg_drop(self) -> float:
        return _rel_drop(self.ndcg_ref, self.ndcg_cand)


def _rel_drop(ref: float, cand: float) -> float:
    """Relative drop of CAND below REF (0 when CAND is as good or better)."""
    if ref <= 0:
        return 0.0
    return max(0.0, (ref - cand) / ref)


@dataclass(frozen=True)
class BehaviourReport:
    layers: tuple[LayerStat, ...]
    heads: tuple[HeadStat, ...]
    beam: BeamStat
    rec: RecStat | None
    seconds: dict


def compare_behaviour(ref_model, cand_model, ctx, beam_width: int, top_n: int, catalogue=None,
                      tie_margin: float = 0.0, clock=None) -> BehaviourReport:
    from fp8conv.runtime.beam import beam_search

    clock = clock or _Clock()
    first = len(clock.laps)
    with torch.inference_mode():
        res_ref = beam_search(ref_model, ctx, beam_width, top_n=top_n, catalogue=catalogue)
        clock.lap("beam_ref")
        res_cand = beam_search(cand_model, ctx, beam_width, top_n=top_n, catalogue=catalogue)
        clock.lap("beam_cand")
        # REF's judgement of CAND's list: how much worse, by REF, is what CAND picked?
        score_ref = res_ref.scores.double().cpu()
        score_cand = cand_scores_by_ref(ref_model, ctx, res_ref.items, score_ref, res_cand.items)
        beam = beam_agreement(res_ref.items, res_cand.items, score_ref, score_cand, beam_width, tie_margin)
        rec = None if ctx.labels is None else rec_metrics(res_ref.items, res_cand.items, ctx.labels, top_n)
        clock.lap("ref_scores")
        layers, heads = replay(ref_model, cand_model, ctx, res_ref.items)
        clock.lap("replay")
    return BehaviourReport(layers, heads, beam, rec, dict(clock.laps[first:]))


def cand_scores_by_ref(ref_model, ctx, items_ref, score_ref, items_cand) -> torch.Tensor:
    """REF's summed log-probability of each of CAND's items (U, n), -inf where CAND has none.

    Items both lists share take REF's beam score (the same sum of log-softmaxes); only the others
    (a few percent) are scored teacher-forced, which keeps this a small fraction of a beam search."""
    ir, ic = items_ref.cpu(), items_cand.cpu()
    same = (ic[:, :, None, :] == ir[:, None, :, :]).all(-1)  # (U, n_cand, n_ref)
    found = same.any(-1) & (ic >= 0).all(-1)
    out = torch.full(ic.shape[:2], -math.inf, dtype=torch.float64)
    out[found] = score_ref.gather(1, same.double().argmax(-1))[found]
    todo = ~found & (ic >= 0).all(-1)
    if todo.any():
        users = torch.arange(ic.shape[0])[:, None].expand_as(todo)[todo]
        out[todo] = ref_log_probs(ref_model, ctx, ic[todo], users)
    return out


def ref_log_probs(model, ctx, items: torch.Tensor, user_index: torch.Tensor) -> torch.Tensor:
    """items (V, levels) of users ``user_index`` (V,) -> (V,) float64 summed log-probabilities."""
    # only the users concerned: the decoder's cross-attention works per user of the batch it is given
    users, local = torch.unique(user_index, return_inverse=True)
    sub = ctx.select(users.to(ctx.tokens.device))
    dev = ctx.tokens.device
    logits = model.forward_levels(sub, items.to(dev), local.to(dev))  # (V, levels, K)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(2, items.to(dev)[..., None]).squeeze(-1).sum(-1).cpu()


def beam_agreement(items_ref: torch.Tensor, items_cand: torch.Tensor, score_ref: torch.Tensor,
                   score_cand: torch.Tensor, beam_width: int, tie_margin: float = 0.0) -> BeamStat:
    """items (U, top_n, levels) of both models and REF's log-probs of each (U, top_n) -> agreement.

    Within-tie statistics forgive a difference only where REF itself can barely tell the items apart
    (REF's scores within ``tie_margin`` nats): such flips follow from any rounding, FP8 or not."""
    items_ref, items_cand = items_ref.cpu(), items_cand.cpu()  # the scores are on the CPU
    u, n = items_ref.shape[0], items_ref.shape[1]
    top1 = (items_ref[:, 0] == items_cand[:, 0]).all(-1)  # (U,)
    gap1 = (score_ref[:, 0] - score_cand[:, 0]).nan_to_num(0.0)  # REF's preference for its own top-1
    top1_tie = top1 | (gap1 <= tie_margin)
    floor = score_ref.min(1).values - tie_margin  # REF's N-th score (its worst kept item) minus the margin
    overlaps, overlaps_tie, taus = [], [], []
    for i in range(u):
        ref = [tuple(x) for x in items_ref[i].tolist() if min(x) >= 0]  # -1: no valid item
        cand = [tuple(x) for x in items_cand[i].tolist() if min(x) >= 0]
        rank_cand = {item: r for r, item in enumerate(cand)}
        shared = [item for item in ref if item in rank_cand]
        ref_set = set(ref)
        near = sum(1 for r, it in enumerate(cand) if it not in ref_set and score_cand[i, r] >= floor[i])
        overlaps.append(len(shared) / n)
        overlaps_tie.append((len(shared) + near) / n)
        if len(shared) >= 2:
            taus.append(kendall_tau(list(range(len(shared))), [rank_cand[it] for it in shared]))
    return BeamStat(u, beam_width, n, tie_margin, top1.double().mean().item(), sum(overlaps) / u,
                    top1_tie.double().mean().item(), sum(overlaps_tie) / u,
                    sum(taus) / len(taus) if taus else math.nan, gap1.mean().item(),
                    tuple((~top1).nonzero().flatten().tolist()))


def rec_metrics(items_ref, items_cand, labels, k: int) -> RecStat:
    from fp8conv.runtime import beam as beam_mod

    def both(fn):
        return float(fn(items_ref, labels, k)), float(fn(items_cand, labels, k))

    r_ref, r_cand = both(beam_mod.recall_at_k)
    n_ref, n_cand = both(beam_mod.ndcg_at_k)
    return RecStat(k, r_ref, r_cand, n_ref, n_cand)


def replay(ref_model, cand_model, ctx, items_ref: torch.Tensor):
    """Teacher-force REF's best beams through both models (one pass over [BOS, s1, s2] each) and
    compare what they record: context K/V, block outputs, router scores, head logits."""
    u, n, levels = items_ref.shape
    m = min(REPLAY_BEAMS, n)
    # on the CPU, like user_index: beam search may have returned the items on the model's device
    items = items_ref[:, :m].reshape(u * m, levels).cpu()  # (U*m, levels)
    user_index = torch.arange(u).repeat_interleave(m)
    valid = (items >= 0).all(-1)  # a catalogue may leave a user fewer than m items
    items, user_index = items[valid], user_index[valid]
    device = ctx.tokens.device
    with ref_model.recording() as rec_ref:
        logits_ref = ref_model.forward_levels(ctx, items.to(device), user_index.to(device))
    with cand_model.recording() as rec_cand:
        logits_cand = cand_model.forward_levels(ctx, items.to(device), user_index.to(device))
    recorded = {name: [(a.flatten().cpu(), b.flatten().cpu()) for a, b in zip(outs, rec_cand.get(name, []))]
                for name, outs in rec_ref.items()}
    heads = []
    for t in range(levels):  # logits (N, levels, K)
        lr, lc = logits_ref[:, t], logits_cand[:, t]
        top1 = (lr.argmax(-1) == lc.argmax(-1)).double().mean().item()
        heads.append(HeadStat(t, cosine(lc, lr), kl_divergence(lc, lr), top1))
    return _layer_stats({k: v for k, v in recorded.items() if v and not k.startswith("lm_heads.")}), \
        tuple(heads)


def _layer_stats(recorded: dict) -> tuple[LayerStat, ...]:
    def order(name: str):  # context K/V, then each layer's router scores before its block output
        m = re.match(r"^model\.layers\.(\d+)(.*)$", name)
        if m:
            return 1, int(m.group(1)), m.group(2) == "", name
        return (0 if name.startswith("context.") else 2), 0, False, name

    out, prev_sqnr, prev_noise = [], math.nan, 0.0  # layer 0 has no previous layer: drop is nan
    for name in sorted(recorded, key=order):
        ref = torch.cat([a for a, _ in recorded[name]])
        cand = torch.cat([b for _, b in recorded[name]])
        s = finite_sqnr_db(cand, ref)  # -inf where CAND's output is inf or NaN
        noise = 10 ** (-s / 10) if math.isfinite(s) else (0.0 if s > 0 else math.inf)
        if _LAYER.match(name):
            out.append(LayerStat(name, rel_error(cand, ref), s, _minus(prev_sqnr, s), _added(noise, prev_noise)))
            prev_sqnr, prev_noise = s, noise
        elif name.startswith("model.layers."):  # router scores: fed by the residual stream so far
            out.append(LayerStat(name, rel_error(cand, ref), s, math.nan, _added(noise, prev_noise)))
        else:  # the context K/V is computed from exact inputs: all of its noise is its own
            out.append(LayerStat(name, rel_error(cand, ref), s, math.nan, noise))
    return tuple(out)


def _added(noise: float, prev: float) -> float:
    """Noise power a tensor adds to what it inherited; 0 once the stream is already all noise (inf - inf
    would be NaN, which sorts arbitrarily among the culprits)."""
    return 0.0 if math.isinf(prev) else noise - prev


def _minus(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b) and a == b:
        return 0.0
    return a - b


def culprit_layers(layers: tuple[LayerStat, ...], limit: int = 3) -> list[LayerStat]:
    """The recorded tensors that added the most relative noise, largest first (only those that added
    a meaningful share: at least a tenth of the largest)."""
    ranked = sorted((s for s in layers if not s.name.startswith("lm_heads.")),
                    key=lambda s: s.contribution, reverse=True)
    if not ranked or not ranked[0].contribution > 0:
        return []
    top = ranked[0].contribution
    return [s for s in ranked[:limit] if s.contribution >= 0.1 * top]


class _Clock:
    def __init__(self):
        import time

        self._now = time.perf_counter
        self._t = self._now()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        t = self._now()
        self.laps.append((name, round(t - self._t, 3)))
        self._t = t
