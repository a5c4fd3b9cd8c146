"""Pass/fail thresholds of ``fp8conv verify``: defaults, and overrides from a TOML file.

The defaults and the reasons for each are documented in docs/verification.md ("Thresholds"); keep the
two in step. A TOML file overrides any subset, in tables named like the dataclass groups below:

    [layers]
    min_sqnr_db = 18.0
    [beam]
    min_top1_agreement = 0.9

Unknown tables or keys are errors (a typo must not silently leave a gate at its default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from fp8conv.errors import UserError
from fp8conv.tomlfile import parse_toml


@dataclass(frozen=True)
class WeightThresholds:
    # Dequantized CAND weight vs REF weight, per tensor. E4M3 has 3 mantissa bits: per-channel or 128x128
    # block rounding of LLM-like weights gives 28-32 dB; a scale off by 1.5x gives 6 dB, two swapped
    # experts about -3 dB. 20 dB leaves room for other tools' coarser (per-tensor) scales.
    min_sqnr_db: float = 20.0


@dataclass(frozen=True)
class LayerThresholds:
    # Decoder block outputs and context K/V of CAND vs REF on the same inputs (through recording hooks).
    # FP8 weights and activations leave the residual stream at 25-35 dB; a single broken Linear drops
    # its block by 10 dB or more. 15 dB is the floor for any recorded tensor.
    min_sqnr_db: float = 15.0


@dataclass(frozen=True)
class LogitThresholds:
    # Per head (s1, s2, s3): cosine of the logits and mean KL(softmax(REF) || softmax(CAND)) in nats.
    # FP8 on the trained example: cosine >= 0.997, KL <= 0.001; a broken layer: cosine 0.983-0.989,
    # KL 0.002-0.007. The KL gate is 10x the FP8 figure: a loose guard behind the cosine one.
    min_cosine: float = 0.99
    max_kl: float = 0.01


@dataclass(frozen=True)
class BeamThresholds:
    # tie_margin (nats): a top-1 or top-N difference where REF scores CAND's item within this of its own
    # is a near-tie that any rounding flips, and is forgiven by the two *_within_tie gates below. Set it
    # to 0 to gate on the literal figures. 0.1 nats is a 10% probability ratio, about the per-item
    # log-prob noise of FP8 weights and activations (KL ~ 0.001-0.005 nats per level).
    tie_margin: float = 0.1
    # Fraction of users whose top-1 item agrees (within the tie margin): FP8 on the example 0.99, a
    # broken layer 0.92-0.95. Mean top-N overlap (within the tie margin): 0.995 vs 0.95-0.97. Mean
    # Kendall tau of the shared items' ranks: 0.95 vs 0.82-0.86. Mean REF-score regret of CAND's
    # top-1 (how much less REF likes CAND's pick than its own, in nats): 0.002 vs 0.017-0.020.
    min_top1_agreement: float = 0.95
    min_topk_overlap: float = 0.9
    min_rank_correlation: float = 0.7
    max_regret: float = 0.01


@dataclass(frozen=True)
class RecThresholds:
    # Largest relative drop of CAND's Recall@K / NDCG@K below REF's, when the contexts carry labels.
    # 0.02 = 2%: the 1% goal plus the noise of one user's hit on a few hundred held-out users.
    max_recall_drop: float = 0.02
    max_ndcg_drop: float = 0.02


@dataclass(frozen=True)
class Thresholds:
    weights: WeightThresholds = field(default_factory=WeightThresholds)
    layers: LayerThresholds = field(default_factory=LayerThresholds)
    logits: LogitThresholds = field(default_factory=LogitThresholds)
    beam: BeamThresholds = field(default_factory=BeamThresholds)
    recommendation: RecThresholds = field(default_factory=RecThresholds)
    source: str = "defaults"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["source"] = self.source
        return d

    @classmethod
    def from_toml(cls, text: str, source: str = "<thresholds>") -> "Thresholds":
        data = parse_toml(text, source)
        groups = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        unknown = sorted(set(data) - set(groups))
        if unknown:
            raise UserError(f"{source}: unknown table(s) {', '.join(unknown)}; "
                            f"known: {', '.join(groups)}")
        kwargs = {}
        for name, f in groups.items():
            default = f.default_factory()
            table = data.get(name, {})
            if not isinstance(table, dict):
                raise UserError(f"{source}: '{name}' must be a table ([{name}])")
            kwargs[name] = _override(default, table, f"{source}: [{name}]")
        return cls(**kwargs, source=source)


def _override(default, table: dict, where: str):
    known = {f.name for f in dataclasses.fields(default)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    for key, value in table.items():
        # bool is an int in Python; a threshold of `true` is a typo, not 1.0.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise UserError(f"{where} {key}: expected a number, got {value!r}")
        if key.startswith("max_") and value < 0:
            raise UserError(f"{where} {key}: must be >= 0, got {value}")
        if (key.startswith(("min_top", "min_cos")) or key.endswith("_drop")) and value > 1:
            raise UserError(f"{where} {key}: a fraction, must be <= 1, got {value}")
        values[key] = float(value)
    return dataclasses.replace(default, **values)


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    """The defaults, overridden by the TOML file at ``path`` when given."""
    if path is None:
        return Thresholds()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: thresholds file not found")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read ({e})") from None
    return Thresholds.from_toml(text, source=str(p))
