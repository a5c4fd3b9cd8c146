"""The bundled trained example and its data generator: it loads, it clearly beats popularity on its own
held-out contexts, the generator is deterministic with real structure, `fp8conv example` writes it."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from fp8conv.cli import main
from fp8conv.commands.example import example_source
from fp8conv.example_data import DataConfig, generate, make_batch, popularity_ranking, heldout_batch
from fp8conv.runtime.beam import beam_search, load_catalogue, ndcg_at_k, recall_at_k
from fp8conv.runtime.inputs import sample_contexts
from fp8conv.runtime.model import load_model

ROOT = Path(__file__).resolve().parent.parent
SMALL = DataConfig(seed=1, n_items=256, n_topics=8, subtopics_per_topic=2, codebook_size=16, n_segments=4,
                   n_train_users=60, n_test_users=12, min_events=10, max_events=24, short_len=4, long_len=6)


@pytest.fixture(scope="module")
def shipped():
    src = example_source()
    model = load_model(src, dtype=torch.float32)  # fp16 weights, float32 activations
    return src, model, sample_contexts(src, model.cfg), load_catalogue(src, model.cfg.codebook_size)


def test_example_is_small_and_complete(shipped):
    src, model, ctx, cat = shipped
    sizes = {p.name: p.stat().st_size for p in src.iterdir()}
    assert {"config.json", "model.safetensors", "contexts.safetensors", "catalogue.safetensors",
            "README.md"} <= sizes.keys()
    assert sum(sizes.values()) <= 10 * 2 ** 20
    assert model.cfg.num_moe_layers >= 2 and model.cfg.n_routed_experts >= 4
    assert ctx.labels is not None and ctx.num_users >= 200
    assert bool(cat.contains(ctx.labels).all())  # labels are real items
    assert len(set(map(tuple, cat.items.tolist()))) == cat.items.shape[0]  # unique semantic IDs
    gemm_dims = {d for lin in model.linears().values() for d in lin.weight.shape}
    assert all(d % 128 == 0 for d in gemm_dims)


def test_example_beats_popularity(shipped):
    _, model, ctx, cat = shipped
    ctx = ctx.select(slice(0, 200))  # half the shipped users keeps the test quick
    # popularity among the held-out users' own histories (item i is context token 1 + i): a baseline
    # that even sees the evaluation users' data
    valid = torch.arange(ctx.max_len)[None] < ctx.lengths[:, None]
    tok = ctx.tokens[valid]
    items = tok[(tok >= 1) & (tok <= cat.items.shape[0])] - 1
    top = torch.argsort(torch.bincount(items, minlength=cat.items.shape[0]), descending=True, stable=True)
    pop = cat.items[top[:10]][None].expand(ctx.num_users, -1, -1)
    with torch.no_grad():
        r = beam_search(model, ctx, beam_width=10, top_n=10, catalogue=cat)
    rec, ndcg = recall_at_k(r, ctx.labels, 10), ndcg_at_k(r, ctx.labels, 10)
    rec_pop, ndcg_pop = recall_at_k(pop, ctx.labels, 10), ndcg_at_k(pop, ctx.labels, 10)
    assert rec > 2 * rec_pop and ndcg > 2 * ndcg_pop, (rec, rec_pop, ndcg, ndcg_pop)


def test_generator_deterministic_with_structure():
    a, b = generate(SMALL), generate(SMALL)
    assert torch.equal(a.semantic_ids, b.semantic_ids)
    assert all(torch.equal(x, y) for x, y in zip(a.events, b.events))
    assert torch.unique(a.semantic_ids, dim=0).shape[0] == SMALL.n_items
    # semantic IDs follow content: items sharing s1 mostly share a subtopic
    purity = sum(torch.bincount(a.item_subtopic[a.semantic_ids[:, 0] == c]).max().item()
                 for c in torch.unique(a.semantic_ids[:, 0]))
    assert purity / SMALL.n_items > 0.6
    # sessions: consecutive events share a subtopic far more often than chance
    ev = torch.cat([e for e in a.events])
    same = (a.item_subtopic[ev[1:]] == a.item_subtopic[ev[:-1]]).float().mean().item()
    assert same > 0.4
    ctx = heldout_batch(SMALL, a)
    assert ctx.num_users == SMALL.n_test_users and int(ctx.lengths.max()) <= SMALL.max_context_length
    last = torch.stack([a.events[u][-1] for u in a.test_users])
    assert torch.equal(ctx.labels, a.semantic_ids[last])
    assert popularity_ranking(SMALL, a, 5).shape == (5, 3)


def test_training_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("train_example", ROOT / "scripts" / "train_example.py")
    tr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tr)
    from fp8conv.runtime.model import OneRecModel, random_state

    data = generate(SMALL)
    cfg = dataclasses.replace(tr.example_config(SMALL), num_hidden_layers=2, num_kv_sets=1)
    model = OneRecModel(cfg, random_state(cfg, 0), backend=tr.TrainBackend())
    hist = tr.train(model, data, steps=6, batch=16, lr=3e-3, seed=0, bias_rate=1e-3, log_every=2)
    assert hist[-1]["loss"] < hist[0]["loss"] + 0.5 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert not any(p.requires_grad for p in model.parameters())
    ctx = make_batch(SMALL, data, [(u, 5) for u in range(4)])
    out = tr.evaluate(model, ctx, data.semantic_ids, beam=4)
    assert 0.0 <= out["catalogue"]["recall@10"] <= 1.0


def test_example_cli(tmp_path, capsys):
    out = tmp_path / "ex"
    assert main(["example", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == (example_source() / "model.safetensors").read_bytes()
    assert main(["example", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    (out / "stale.txt").write_text("x")
    assert main(["example", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ex"]  # no temporaries left behind


def test_example_into_an_unwritable_place_exits_2(tmp_path, capsys):
    (tmp_path / "f").write_text("a file, not a folder")
    assert main(["example", str(tmp_path / "f" / "ex")]) == 2  # was a NotADirectoryError traceback
    assert "cannot write the example" in capsys.readouterr().err
