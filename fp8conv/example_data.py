"""A seeded synthetic user-behaviour data set for the bundled OneRec-V2 example.

The world (every draw from one torch.Generator seeded by ``DataConfig.seed``):

- Items live in topics and subtopics: ``n_topics`` topics, ``subtopics_per_topic`` subtopics each,
  items spread evenly over subtopics. An item's content embedding is its topic centroid (scale 3) +
  its subtopic offset (scale 1) + item noise (scale 0.3), so nearby items share topic and subtopic.
- Popularity is skewed: a global Zipf(``zipf``) over a random ranking of the items; subtopics inherit
  the summed popularity of their items.
- Semantic IDs: residual k-means (RQ-KMeans, written here: ``rq_kmeans``) of the item embeddings, three
  levels of ``codebook_size`` codes; the rare items that end up with the same triple are moved to the
  nearest free code of the last level, so every item has a unique triple.
- Users: a static segment (one of ``n_segments``; each segment has its own concentrated (log-normal) prior over topics)
  and an activity bucket. A user holds ``interests_per_user`` topics (weights uniform in [0.2, 1.2]) drawn from
  the segment prior; interests drift: at each event, with probability ``drift``, one interest is
  replaced by a fresh draw. Behaviour comes in sessions: a session picks a topic from the current
  interests and a subtopic by popularity, and each event stays in it with probability ``1 - switch``;
  inside a session the item is drawn by popularity within the subtopic; with probability ``explore`` an
  event is instead a globally popular item (noise).
- Held-out users: the last ``n_test_users`` users never appear in training; their context is their
  whole history but the last event, and the label is that last event's semantic IDs.

Contexts (what the model sees; config.PATHWAYS): token 0 is padding; item i is token 1 + i; segment s is
token 1 + n_items + s; activity bucket b is token 1 + n_items + n_segments + b. A context is
[segment, activity] (pathway 0, static) + older items (pathway 2, long-term, at most ``long_len``)
+ the last ``short_len`` items (pathway 1, short-term), right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8conv.errors import UserError
from fp8conv.runtime.inputs import ContextBatch

STATIC, SHORT, LONG = 0, 1, 2  # pathway ids, in config.PATHWAYS order
N_ACTIVITY = 4


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    n_items: int = 4096
    n_topics: int = 32
    subtopics_per_topic: int = 4
    item_dim: int = 32
    codebook_size: int = 128
    n_segments: int = 16
    n_train_users: int = 6000
    n_test_users: int = 400
    min_events: int = 20
    max_events: int = 80
    zipf: float = 0.9
    interests_per_user: int = 3
    drift: float = 0.04
    switch: float = 0.2
    explore: float = 0.1
    short_len: int = 8
    long_len: int = 22

    def __post_init__(self) -> None:
        if self.n_items % (self.n_topics * self.subtopics_per_topic):
            raise UserError("example data: n_items must be a multiple of n_topics * subtopics_per_topic")
        if self.codebook_size ** 3 < self.n_items:
            raise UserError("example data: codebook_size^3 must cover n_items")

    @property
    def n_subtopics(self) -> int:
        return self.n_topics * self.subtopics_per_topic

    @property
    def context_vocab_size(self) -> int:
        return 1 + self.n_items + self.n_segments + N_ACTIVITY

    @property
    def max_context_length(self) -> int:
        return 2 + self.long_len + self.short_len


@dataclass(frozen=True)
class Dataset:
    cfg: DataConfig
    item_emb: torch.Tensor  # (n_items, item_dim) float32
    item_subtopic: torch.Tensor  # (n_items,) int64
    semantic_ids: torch.Tensor  # (n_items, 3) int64, unique rows
    segment: torch.Tensor  # (n_users,) int64
    activity: torch.Tensor  # (n_users,) int64
    events: list  # per user a (n_events,) int64 tensor of item ids, oldest first

    @property
    def train_users(self) -> range:
        return range(self.cfg.n_train_users)

    @property
    def test_users(self) -> range:
        return range(self.cfg.n_train_users, self.cfg.n_train_users + self.cfg.n_test_users)


def _kmeans(x: torch.Tensor, k: int, g: torch.Generator, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding: (centroids (k, dim), assignment (n,))."""
    n = x.shape[0]
    cent = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    d2 = (x - cent[0]).pow(2).sum(1)
    for _ in range(1, k):
        i = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(n) / n, 1, generator=g)
        cent.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, (x - cent[-1]).pow(2).sum(1))
    c = torch.stack(cent)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # empty clusters keep their centroid
    return c, torch.cdist(x, c).argmin(1)


def rq_kmeans(x: torch.Tensor, levels: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Residual k-means semantic IDs (n, levels), deduplicated on the last level."""
    residual, codes, last_dist = x.clone(), [], None
    for _ in range(levels):
        c, a = _kmeans(residual, k, g)
        last_dist = torch.cdist(residual, c)  # (n, k): distance to each code of this level
        residual = residual - c[a]
        codes.append(a)
    ids = torch.stack(codes, 1)
    taken: dict[tuple, set] = {}
    for i in range(ids.shape[0]):  # first come keeps its code; collisions move to the nearest free one
        pre, last = tuple(ids[i, :-1].tolist()), int(ids[i, -1])
        used = taken.setdefault(pre, set())
        if last in used:
            last = next(int(j) for j in last_dist[i].argsort() if int(j) not in used)
            ids[i, -1] = last
        used.add(last)
    return ids


def generate(cfg: DataConfig = DataConfig()) -> Dataset:
    g = torch.Generator().manual_seed(cfg.seed)
    n_sub, per_sub = cfg.n_subtopics, cfg.n_items // cfg.n_subtopics
    topic_c = torch.randn(cfg.n_topics, cfg.item_dim, generator=g) * 3.0
    sub_c = topic_c.repeat_interleave(cfg.subtopics_per_topic, 0) + torch.randn(n_sub, cfg.item_dim, generator=g)
    item_sub = torch.randperm(cfg.n_items, generator=g) % n_sub
    item_emb = sub_c[item_sub] + 0.3 * torch.randn(cfg.n_items, cfg.item_dim, generator=g)
    pop = 1.0 / (torch.randperm(cfg.n_items, generator=g).double() + 1) ** cfg.zipf
    # items of each subtopic as a (n_subtopics, per_sub) table: subtopics are equally sized
    members = torch.argsort(item_sub, stable=True).view(n_sub, per_sub)
    sub_pop = pop[members].sum(1)
    # segment priors over topics: log-normal weights, concentrated on a few topics per segment
    seg_prior = torch.softmax(2.0 * torch.randn(cfg.n_segments, cfg.n_topics, generator=g), dim=1)
    n_users = cfg.n_train_users + cfg.n_test_users
    segment = torch.randint(cfg.n_segments, (n_users,), generator=g)
    activity = torch.randint(N_ACTIVITY, (n_users,), generator=g)
    lo = cfg.min_events + (cfg.max_events - cfg.min_events) * activity // N_ACTIVITY
    n_ev = lo + (torch.rand(n_users, generator=g) * (cfg.max_events + 1 - lo)).long()
    table = _simulate(cfg, g, seg_prior[segment], members, pop, sub_pop)
    events = [table[u, :int(n_ev[u])].clone() for u in range(n_users)]
    ids = rq_kmeans(item_emb, 3, cfg.codebook_size, g)
    return Dataset(cfg, item_emb, item_sub, ids, segment, activity, events)


def _simulate(cfg: DataConfig, g, prior, members, pop, sub_pop) -> torch.Tensor:
    """All users in lockstep, one event per step: (n_users, max_events) item ids."""
    n, k, spt = prior.shape[0], cfg.interests_per_user, cfg.subtopics_per_topic
    rows = torch.arange(n)
    interests = torch.multinomial(prior, k, replacement=True, generator=g)  # (U, k) topics
    weights = torch.rand(n, k, generator=g) + 0.2
    sub_pop_t = sub_pop.view(cfg.n_topics, spt)
    member_pop = pop[members]  # (n_sub, per_sub)
    sub = torch.zeros(n, dtype=torch.int64)
    out = torch.empty(n, cfg.max_events, dtype=torch.int64)
    for t in range(cfg.max_events):
        r = torch.rand(n, 3, generator=g)
        drift = r[:, 0] < cfg.drift
        j = torch.randint(k, (n,), generator=g)
        fresh = torch.multinomial(prior, 1, generator=g).squeeze(1)
        interests[rows[drift], j[drift]] = fresh[drift]
        switch = (r[:, 1] < cfg.switch) | (t == 0)
        topic = interests[rows, torch.multinomial(weights, 1, generator=g).squeeze(1)]
        new_sub = topic * spt + torch.multinomial(sub_pop_t[topic], 1, generator=g).squeeze(1)
        sub = torch.where(switch, new_sub, sub)
        in_session = members[sub, torch.multinomial(member_pop[sub], 1, generator=g).squeeze(1)]
        explored = torch.multinomial(pop, n, replacement=True, generator=g)
        out[:, t] = torch.where(r[:, 2] < cfg.explore, explored, in_session)
    return out


def context_of(cfg: DataConfig, ds: Dataset, user: int, cut: int) -> tuple[list[int], list[int]]:
    """Tokens and pathways of ``user``'s context made of events [0, cut)."""
    ev = ds.events[user][:cut]
    short = ev[-cfg.short_len:]
    long = ev[max(0, len(ev) - cfg.short_len - cfg.long_len):max(0, len(ev) - cfg.short_len)]
    static = [1 + cfg.n_items + int(ds.segment[user]), 1 + cfg.n_items + cfg.n_segments + int(ds.activity[user])]
    tokens = static + (1 + long).tolist() + (1 + short).tolist()
    pathways = [STATIC] * 2 + [LONG] * len(long) + [SHORT] * len(short)
    return tokens, pathways


def make_batch(cfg: DataConfig, ds: Dataset, pairs: list[tuple[int, int]]) -> ContextBatch:
    """Contexts for (user, cut) pairs, labelled with the semantic IDs of event ``cut``."""
    rows = [context_of(cfg, ds, u, c) for u, c in pairs]
    s = max(len(t) for t, _ in rows)
    tokens = torch.zeros(len(rows), s, dtype=torch.int64)
    pathways = torch.zeros(len(rows), s, dtype=torch.int64)
    for i, (t, p) in enumerate(rows):
        tokens[i, :len(t)] = torch.tensor(t)
        pathways[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(t) for t, _ in rows], dtype=torch.int64)
    labels = ds.semantic_ids[torch.tensor([int(ds.events[u][c]) for u, c in pairs])]
    return ContextBatch(tokens, pathways, lengths, labels.clone())


def heldout_batch(cfg: DataConfig, ds: Dataset) -> ContextBatch:
    """Held-out users: all history but the last event; label = the last event."""
    return make_batch(cfg, ds, [(u, len(ds.events[u]) - 1) for u in ds.test_users])


def popularity_ranking(cfg: DataConfig, ds: Dataset, n: int) -> torch.Tensor:
    """The baseline: the ``n`` items most often consumed by training users, as (n, 3) semantic IDs."""
    counts = torch.bincount(torch.cat([ds.events[u] for u in ds.train_users]), minlength=cfg.n_items)
    top = torch.argsort(counts, descending=True, stable=True)[:n]
    return ds.semantic_ids[top]
