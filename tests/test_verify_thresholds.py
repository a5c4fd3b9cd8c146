"""Thresholds of fp8conv verify: defaults, TOML overrides, and the errors a typo must produce."""

from __future__ import annotations

import pytest

from fp8conv.errors import UserError
from fp8conv.thresholds import Thresholds, load_thresholds


def test_defaults_are_documented_values():
    t = load_thresholds(None)
    assert t.source == "defaults"
    assert (t.weights.min_sqnr_db, t.layers.min_sqnr_db) == (20.0, 15.0)
    assert (t.logits.min_cosine, t.logits.max_kl) == (0.99, 0.01)
    assert (t.beam.tie_margin, t.beam.min_top1_agreement, t.beam.max_regret) == (0.1, 0.95, 0.01)
    assert t.recommendation.max_recall_drop == 0.02


def test_override_a_subset_keeps_the_rest(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[layers]\nmin_sqnr_db = 18\n[beam]\ntie_margin = 0\n")
    t = load_thresholds(p)
    assert t.layers.min_sqnr_db == 18.0 and isinstance(t.layers.min_sqnr_db, float)
    assert t.beam.tie_margin == 0.0 and t.beam.min_top1_agreement == 0.95
    assert t.to_dict()["source"] == str(p)


@pytest.mark.parametrize("text, words", [
    ("[layer]\nmin_sqnr_db = 1\n", ["unknown table", "layer"]),
    ("[beam]\nmin_top1 = 0.5\n", ["unknown key", "min_top1", "min_top1_agreement"]),
    ("[beam]\nmin_top1_agreement = '0.9'\n", ["expected a number"]),
    ("[beam]\nmin_top1_agreement = true\n", ["expected a number"]),
    ("[beam]\nmin_top1_agreement = 98\n", ["fraction"]),
    ("[logits]\nmax_kl = -1\n", [">= 0"]),
    ("[recommendation]\nmax_recall_drop = nan\n", ["expected a number"]),
    ("beam = 3\n", ["must be a table"]),
    ("[beam\n", ["not valid TOML"]),
    ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", ["not valid TOML"]),  # was a RecursionError traceback
])
def test_bad_toml_is_a_user_error_naming_the_file(text, words):
    with pytest.raises(UserError) as e:
        Thresholds.from_toml(text, source="mine.toml")
    assert str(e.value).startswith("mine.toml")
    for w in words:
        assert w in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_thresholds(tmp_path / "nope.toml")
