#!/usr/bin/env python
"""Train the bundled OneRec-V2 example (fp8conv/data/onerec_example/) on the synthetic data set of
fp8conv.example_data, on the CPU, deterministically for a seed.

    python scripts/train_example.py                       # writes fp8conv/data/onerec_example/
    python scripts/train_example.py --steps 200 --out /tmp/ex   # a quick run

Objective: next-item prediction with teacher forcing: given a training user's history before event t
as context, cross-entropy of the 3 semantic IDs of event t (one pass over [BOS, s1, s2], head i at
position i), summed over levels. The model is fp8conv.runtime.model.OneRecModel itself, with float32
tensors that require grad, run by a backend whose expert op differentiates through the stacked expert
weights (the reference backend caches per-expert views, fine for inference, not for training). The
router's correction bias is not learned by gradient: DeepSeek-V3's auxiliary-loss-free balancing nudges
it by +-``bias_rate`` towards equal expert load after every step.

Evaluation: beam search (beam 32, catalogue-constrained and not) on the held-out users' contexts,
Recall@10 and NDCG@10 against a popularity baseline (the 10 items most consumed by training users),
for the float32 weights and for the shipped fp16 checkpoint reloaded from disk.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8conv.config import OneRecConfig
from fp8conv.example_data import DataConfig, generate, make_batch, popularity_ranking, heldout_batch
from fp8conv.runtime import ops
from fp8conv.runtime.beam import beam_search, load_catalogue, ndcg_at_k, recall_at_k
from fp8conv.runtime.loader import write_checkpoint
from fp8conv.runtime.model import OneRecModel, load_model, random_state

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fp8conv" / "data" / "onerec_example"


def example_config(d: DataConfig) -> OneRecConfig:
    """Every GEMM dimension a multiple of 128 (so the Triton kernels and tuning apply), three MoE
    layers of 8 experts (top-2 + a shared expert) so the block-FP8 expert path is exercised."""
    return OneRecConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=64, num_key_value_heads=2,
        intermediate_size=256, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=128, routed_scaling_factor=1.0,
        codebook_size=d.codebook_size, num_semantic_levels=3, num_kv_sets=2, kv_split=2,
        context_vocab_size=d.context_vocab_size, context_hidden_size=128,
        max_context_length=d.max_context_length, torch_dtype="float16")


class TrainBackend(ops.ReferenceBackend):
    """The reference backend with a differentiable expert op; counts expert load per MoE call."""

    def __init__(self):
        self.loads: list[torch.Tensor] = []

    def experts(self, x, topk_ids, topk_weights, w):
        self.loads.append(torch.bincount(topk_ids.reshape(-1), minlength=w.num_experts))
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        for e in range(w.num_experts):
            rows, slot = (topk_ids == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = x[rows].float()
            h = F.silu(xe @ w.gate[e].t()) * (xe @ w.up[e].t())
            y = (h @ w.down[e].t()) * topk_weights[rows, slot].unsqueeze(1)
            out = out.index_add(0, rows, y)
        return out.to(x.dtype)


def train(model: OneRecModel, data, steps: int, batch: int, lr: float, seed: int, bias_rate: float,
          log_every: int = 100) -> list[dict]:
    cfg, dcfg = model.cfg, data.cfg
    pairs = [(u, c) for u in data.train_users for c in range(4, len(data.events[u]))]
    biases = [blk.mlp.bias for blk in model.layers if hasattr(blk.mlp, "bias")]
    params = [p for p in model.parameters() if not any(p is b for b in biases)]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    history, t0, warm = [], time.monotonic(), max(1, steps // 20)
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # linear warm-up, cosine decay to 10%
            frac = step / warm if step <= warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
            group["lr"] = lr * frac
        idx = torch.randint(len(pairs), (batch,), generator=g).tolist()
        ctx = make_batch(dcfg, data, [pairs[i] for i in idx])
        model.backend.loads.clear()
        logits = model.forward_levels(ctx, ctx.labels, torch.arange(batch))  # (B, 3, K)
        loss = F.cross_entropy(logits.reshape(-1, cfg.codebook_size), ctx.labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing (DeepSeek-V3)
            for b, load in zip(biases, model.backend.loads):
                b += bias_rate * torch.sign(load.float().mean() - load.float())
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": round(loss.item(), 4), "s": round(time.monotonic() - t0, 1)})
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.monotonic() - t0:.0f}s)", flush=True)
    for p in params:
        p.requires_grad_(False)
    return history


@torch.no_grad()
def evaluate(model: OneRecModel, ctx, catalogue, beam: int = 32) -> dict:
    out = {}
    for name, cat in (("free", None), ("catalogue", catalogue)):
        r = beam_search(model, ctx, beam_width=beam, top_n=10, catalogue=cat)
        out[name] = {"recall@10": round(recall_at_k(r, ctx.labels, 10), 4),
                     "ndcg@10": round(ndcg_at_k(r, ctx.labels, 10), 4)}
    return out


def readme(dcfg: DataConfig, cfg: OneRecConfig, metrics: dict, args) -> str:
    m = metrics
    return f"""# fp8conv bundled example: a small trained OneRec-V2

A OneRec-V2 lazy decoder-only recommender ({m['params'] / 1e6:.2f}M parameters, fp16) trained by
`scripts/train_example.py` on the seeded synthetic user-behaviour data of `fp8conv/example_data.py`:
{dcfg.n_items} items in {dcfg.n_topics} topics x {dcfg.subtopics_per_topic} subtopics with Zipf({dcfg.zipf})
popularity, semantic IDs from 3-level residual k-means (codebook {dcfg.codebook_size}), {dcfg.n_train_users}
training users whose interests drift and who browse in sessions, {dcfg.n_test_users} held-out users.

Files: `config.json`, `model.safetensors` (fp16), `contexts.safetensors` (the held-out users' contexts,
`labels` = semantic IDs of their last item), `catalogue.safetensors` (`items`: the semantic IDs of all
{dcfg.n_items} items, row i = item i; context token 1 + i is item i).

Held-out Recall@10 / NDCG@10 (beam 32, top 10; "catalogue" = constrained to real items):

| model | Recall@10 | NDCG@10 |
|---|---|---|
| popularity baseline (top-10 training items) | {m['popularity']['recall@10']:.4f} | {m['popularity']['ndcg@10']:.4f} |
| this model, fp16 checkpoint, free beam | {m['fp16']['free']['recall@10']:.4f} | {m['fp16']['free']['ndcg@10']:.4f} |
| this model, fp16 checkpoint, catalogue | {m['fp16']['catalogue']['recall@10']:.4f} | {m['fp16']['catalogue']['ndcg@10']:.4f} |

Reproduce (CPU, {args.threads} threads, about {m['train_seconds'] / 60:.0f} minutes of training; the shipped files
were made with torch {m['torch']} on {m['cpu']}; a rerun is bit-identical for the same torch version,
CPU and thread count, and agrees within run-to-run noise elsewhere):

    python scripts/train_example.py --seed {args.seed} --steps {args.steps} --batch {args.batch} --threads {args.threads}

Try it: `fp8conv example ex/ && fp8conv quantize ex/ ex-fp8/ && fp8conv verify ex/ ex-fp8/`.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dcfg = DataConfig(seed=args.seed)
    data = generate(dcfg)
    cfg = example_config(dcfg)
    model = OneRecModel(cfg, random_state(cfg, args.seed), dtype=torch.float32, backend=TrainBackend())
    t0 = time.monotonic()
    history = train(model, data, args.steps, args.batch, args.lr, args.seed, args.bias_rate)
    train_s = time.monotonic() - t0
    ctx = heldout_batch(dcfg, data)
    pop = popularity_ranking(dcfg, data, 10)[None].expand(ctx.num_users, -1, -1)
    metrics = {"params": sum(p.numel() for p in model.parameters()), "train_seconds": round(train_s, 1),
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "popularity": {"recall@10": round(recall_at_k(pop, ctx.labels, 10), 4),
                              "ndcg@10": round(ndcg_at_k(pop, ctx.labels, 10), 4)}}
    model.backend = ops.ReferenceBackend()
    metrics["fp32"] = evaluate(model, ctx, data.semantic_ids)
    state = model.state_dict(dtype=torch.float16)
    catalogue = {"items": data.semantic_ids}
    write_checkpoint(args.out, cfg, state, extra_files={"contexts.safetensors": ctx.to_dict(),
                                                        "catalogue.safetensors": catalogue}, force=True)
    fp16 = load_model(args.out, dtype=torch.float32)  # fp16 weights, float32 activations (CPU-exact)
    metrics["fp16"] = evaluate(fp16, ctx, load_catalogue(args.out, cfg.codebook_size))
    metrics["history"] = history
    metrics["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "README.md").write_text(readme(dcfg, cfg, metrics, args))
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
