"""`fp8conv verify` end to end on tiny checkpoints: exit codes, what a regression names, the report.

The tiny model is random-initialised: its near-uniform logits make beam agreement meaningless (FP8
noise flips near-ties), so these runs are kept small (4 users, beam 8) and assert on what the weight
checks and the per-layer report name. The pass/fail figures of a trained model are in
test_verify_example.py.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fp8conv.cli import main
from test_verify_support import edit_tensors, tiny_ref, write_fp8

L = "model.layers.2"
FAST = ["--synthetic", "4", "--beam", "8", "--top-n", "4"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return tiny_ref(tmp_path_factory.mktemp("ref") / "ref", dtype="fp32")


@pytest.fixture(scope="module")
def pristine(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("cands")
    return {(r, m): write_fp8(ref, root / f"{r}-{m}", r, m) for r in ("default", "router") for m in (True, False)}


@pytest.fixture
def cand(pristine, tmp_path):
    def make(manifest: bool = True, recipe: str = "default"):
        return shutil.copytree(pristine[recipe, manifest], tmp_path / "cand")
    return make


def verify(capsys, *args) -> tuple[int, dict | None, str]:
    rc = main(["verify", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def failed_subjects(report: dict) -> set[str]:
    return {f["subject"] for f in report["failures"]}


# -- sabotage: exit 1, naming the tensor and its layer ------------------------------------------------

def _scale(t):
    t[f"{L}.self_attn.q_proj.weight_scale"].mul_(1.5)


def _swap(t):
    for p in ("gate_proj", "up_proj", "down_proj"):
        for sfx in ("", "_scale"):
            a, b = f"{L}.mlp.experts.0.{p}.weight{sfx}", f"{L}.mlp.experts.5.{p}.weight{sfx}"
            t[a], t[b] = t[b].clone(), t[a].clone()


def _transpose(t):
    n = f"{L}.mlp.experts.3.gate_proj.weight_scale"  # weight [192, 128]: grid [2, 1]
    t[n] = t[n].t().contiguous()


SABOTAGES = {
    "scale x1.5": (_scale, "default", {f"{L}.self_attn.q_proj.weight_scale"}),
    "experts swapped": (_swap, "default", {f"{L}.mlp.experts.{e}.{p}.weight{s}" for e in (0, 5)
                                           for p in ("gate_proj", "up_proj", "down_proj") for s in ("", "_scale")}),
    "block scale transposed": (_transpose, "default", {f"{L}.mlp.experts.3.gate_proj.weight_scale"}),
    "router quantized": (None, "router", {f"model.layers.{n}.mlp.gate.weight" for n in (1, 2, 3)}),
}


# Every sabotage with the manifest, and the router without it (the DESIGN keep-list holds whatever the
# recipe). test_verify_weights.py checks the naming of all four in both modes without running models;
# test_verify_example.py the behavioural gates alone on a trained model.
RUNS = [(case, True) for case in SABOTAGES] + [("router quantized", False)]


@pytest.mark.parametrize("case, manifest", RUNS, ids=[f"{c}-{'manifest' if m else 'no-manifest'}" for c, m in RUNS])
def test_sabotage_exits_1_and_names_it(ref, cand, capsys, case, manifest):
    edit, recipe, names = SABOTAGES[case]
    c = cand(manifest, recipe)
    if edit is not None:
        edit_tensors(c, edit)
    rc, rep, err = verify(capsys, ref, c, *FAST, "--json")
    assert rc == 1
    weight_subjects = {f["subject"] for f in rep["failures"] if f["check"] == "weights"}
    # without the manifest a broken scale shows on its weight (dequantized SQNR), not on the scale
    strip = (lambda s: s) if manifest or case == "block scale transposed" else (lambda s: s.replace("_scale", ""))
    assert weight_subjects == {strip(n) for n in names}
    expected_layers = sorted({".".join(n.split(".")[:3]) for n in names})
    assert rep["culprits"] == expected_layers
    assert "REGRESSION" in err and expected_layers[0] in err


def test_clean_candidate_has_no_weight_failures_and_reports_layers(ref, cand, capsys):
    rc, rep, _ = verify(capsys, ref, cand(), *FAST, "--json")
    assert rep["weights"]["mode"] == "bit-exact" and rep["weights"]["findings"] == []
    assert not [f for f in rep["failures"] if f["check"] == "weights"]
    names = [s["name"] for s in rep["behaviour"]["layers"]]
    assert names[:4] == [f"context.kv.{j}" for j in range(4)] and "model.layers.3" in names
    assert all(s["sqnr_db"] == "inf" for s in rep["behaviour"]["layers"][:4])  # kept context: exact
    assert rep["contexts"]["source"] == "synthetic" and rep["contexts"]["users"] == 4


def test_candidate_without_manifest_is_checked_behaviourally(ref, cand, capsys):
    rc, rep, _ = verify(capsys, ref, cand(manifest=False), *FAST, "--json")
    assert rep["weights"]["mode"] == "dequantized"
    assert rep["behaviour"] is not None and len(rep["behaviour"]["heads"]) == 3
    assert 0.0 <= rep["behaviour"]["beam"]["top1_agreement"] <= 1.0


def test_thresholds_file_is_applied(ref, cand, capsys, tmp_path):
    thr = tmp_path / "t.toml"
    thr.write_text("[layers]\nmin_sqnr_db = 200.0\n")
    rc, rep, _ = verify(capsys, ref, cand(), *FAST, "--thresholds", thr, "--json")
    assert rc == 1 and rep["thresholds"]["layers"]["min_sqnr_db"] == 200.0
    assert {f"model.layers.{n}" for n in range(4)} <= failed_subjects(rep)


def test_plain_report_names_the_layer(ref, cand, capsys):
    c = cand()
    edit_tensors(c, _scale)
    rc, rep, err = verify(capsys, ref, c, *FAST)
    assert rc == 1 and rep is None
    assert f"FAIL [weights] {L}.self_attn.q_proj.weight_scale" in err
    assert err.strip().splitlines()[-1].startswith("REGRESSION") and L in err.strip().splitlines()[-1]


def test_identical_checkpoint_passes(ref, capsys):
    """REF against itself: every gate at its default passes (the floor of the noise is zero)."""
    rc, rep, err = verify(capsys, ref, ref, *FAST, "--json")
    assert rc == 0, rep["failures"]
    assert rep["passed"] and rep["culprits"] == []
    assert rep["behaviour"]["beam"]["top1_agreement"] == 1.0


# -- bad input: exit 2 --------------------------------------------------------------------------------

def _other_config(ref, tmp_path):
    c = shutil.copytree(ref, tmp_path / "other")
    cfg = json.loads((c / "config.json").read_text())
    cfg["num_kv_sets"] = 1
    (c / "config.json").write_text(json.dumps(cfg))
    return c


def _bad_contexts(tmp_path, kind):
    p = tmp_path / "ctx.safetensors"
    if kind == "garbage":
        p.write_bytes(b"not a safetensors file at all")
    else:  # token ids beyond the tiny vocabulary (500)
        save_file({"tokens": torch.full((2, 3), 10_000), "pathways": torch.zeros(2, 3, dtype=torch.int64),
                   "lengths": torch.tensor([3, 2])}, str(p))
    return p


@pytest.mark.parametrize("case", ["missing ref", "missing cand", "config mismatch", "contexts garbage",
                                  "contexts out of range", "contexts and synthetic", "thresholds syntax",
                                  "thresholds unknown key", "thresholds missing", "ref quantized", "top-n > beam"])
def test_bad_input_exits_2(ref, cand, capsys, tmp_path, case):
    c = cand(manifest=False)
    args = {
        "missing ref": [tmp_path / "nope", c],
        "missing cand": [ref, tmp_path / "nope"],
        "config mismatch": [ref, _other_config(ref, tmp_path)],
        "contexts garbage": [ref, c, "--contexts", _bad_contexts(tmp_path, "garbage")],
        "contexts out of range": [ref, c, "--contexts", _bad_contexts(tmp_path, "range")],
        "contexts and synthetic": [ref, c, "--contexts", _bad_contexts(tmp_path, "range"), "--synthetic", "2"],
        "thresholds syntax": [ref, c, "--thresholds", _write(tmp_path / "t.toml", "[layers\nx=")],
        "thresholds unknown key": [ref, c, "--thresholds", _write(tmp_path / "t.toml", "[beam]\nmin_top1 = 0.5\n")],
        "thresholds missing": [ref, c, "--thresholds", tmp_path / "none.toml"],
        "ref quantized": [c, c],
        "top-n > beam": [ref, c, "--beam", "2", "--top-n", "4"],
    }[case]
    rc, rep, err = verify(capsys, *args)
    assert rc == 2, err
    assert err.startswith("error: ")


def _write(path, text):
    path.write_text(text)
    return path


def test_corrupt_manifest_exits_2(ref, cand, capsys):
    c = cand()
    (c / "fp8conv.json").write_text('{"tool": "fp8conv", "recipe": {"name": "x"}}')
    rc, rep, err = verify(capsys, ref, c, *FAST)
    assert rc == 2 and "fp8conv.json" in err


def test_non_finite_layer_output_is_a_layer_failure_and_the_first_one_is_the_culprit():
    """An inf in CAND's recorded output made the SQNR raise (math domain error); a NaN gave NaN, which
    no threshold catches. Both are -inf now, and only the first non-finite layer adds noise."""
    from fp8conv.verify_behaviour import _layer_stats, culprit_layers

    ref = torch.ones(4, 8)
    rec = {"model.layers.0": [(ref, ref * 1.01)], "model.layers.1": [(ref, ref.clone().fill_(math.inf))],
           "model.layers.2.mlp.gate": [(ref, ref.clone().fill_(math.nan))],
           "model.layers.2": [(ref, ref.clone().fill_(math.nan))]}
    stats = {s.name: s for s in _layer_stats(rec)}
    assert [stats[f"model.layers.{n}"].sqnr_db for n in (1, 2)] == [-math.inf, -math.inf]
    assert stats["model.layers.1"].contribution == math.inf
    assert stats["model.layers.2"].contribution == stats["model.layers.2.mlp.gate"].contribution == 0.0
    assert [s.name for s in culprit_layers(tuple(stats.values()))] == ["model.layers.1"]
