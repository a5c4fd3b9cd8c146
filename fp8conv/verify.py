"""``fp8conv verify REF CAND``: gate a release. Exit 0 pass, 1 regression (naming the layers that
contribute most), 2 bad input.

1. Inputs (cheap, before any heavy work): both folders, configs that agree, the thresholds, contexts.
2. Weights (verify_weights): bit for bit against REF re-quantized with CAND's manifest recipe, or the
   dequantized SQNR of each tensor for checkpoints from other tools; DESIGN's keep-list always.
3. Behaviour (verify_behaviour): both models on the same contexts on the reference runtime.
4. Every threshold (fp8conv.thresholds) turned into a list of failures; culprits named.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fp8conv.errors import UserError
from fp8conv.thresholds import Thresholds
from fp8conv.verify_behaviour import BehaviourReport, culprit_layers
from fp8conv.verify_weights import WeightReport

DEFAULT_SYNTHETIC_USERS = 32
# Synthetic context lengths: long enough to exercise the masking, short enough for a CPU.
SYNTHETIC_MIN_LEN, SYNTHETIC_MAX_LEN = 8, 256


@dataclass(frozen=True)
class VerifyOptions:
    ref: Path
    cand: Path
    contexts: Path | None = None
    synthetic: int | None = None
    beam: int = 32
    top_n: int = 10
    thresholds: Thresholds = field(default_factory=Thresholds)
    device: str = "cpu"
    backend: str = "reference"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.beam < 1 or self.top_n < 1:
            raise UserError(f"--beam and --top-n must be >= 1, got {self.beam} and {self.top_n}")
        if self.top_n > self.beam:
            raise UserError(f"--top-n ({self.top_n}) cannot exceed --beam ({self.beam})")
        if self.contexts is not None and self.synthetic is not None:
            raise UserError("give either --contexts FILE or --synthetic N, not both")
        if self.synthetic is not None and self.synthetic < 1:
            raise UserError(f"--synthetic must be >= 1, got {self.synthetic}")


@dataclass(frozen=True)
class Failure:
    check: str  # weights | layers | logits | beam | recommendation
    subject: str  # the tensor, layer, head or statistic
    message: str
    value: float | None = None
    limit: float | None = None


@dataclass(frozen=True)
class VerifyReport:
    ref: str
    cand: str
    contexts: dict
    thresholds: Thresholds
    weights: WeightReport
    behaviour: BehaviourReport | None
    behaviour_skipped: str | None
    failures: tuple[Failure, ...]
    culprits: tuple[str, ...]
    seconds: dict

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        d = {"ref": self.ref, "cand": self.cand, "passed": self.passed, "exit_code": self.exit_code,
             "culprits": list(self.culprits),
             "failures": [dataclasses.asdict(f) for f in self.failures], "contexts": self.contexts,
             "weights": dataclasses.asdict(self.weights), "behaviour": None,
             "behaviour_skipped": self.behaviour_skipped, "thresholds": self.thresholds.to_dict(),
             "seconds": self.seconds}
        if self.behaviour is not None:
            b = dataclasses.asdict(self.behaviour)
            if self.behaviour.rec is not None:
                b["rec"].update(recall_drop=self.behaviour.rec.recall_drop, ndcg_drop=self.behaviour.rec.ndcg_drop)
            d["behaviour"] = b
        return json.loads(json.dumps(d, default=_json_default), parse_constant=_nonfinite)


def _json_default(x):
    return str(x)


def _nonfinite(token: str):
    # JSON has no inf/nan: report them as strings a pipeline can still compare against.
    return {"Infinity": "inf", "-Infinity": "-inf", "NaN": "nan"}[token]


def check_inputs(opts: VerifyOptions):
    """Step 1: folders and configs. Returns (ref_cfg, cand_cfg_dict). Raises UserError (exit 2)."""
    from fp8conv.config import OneRecConfig, load_config, read_config_dict

    for role, path in (("REF", opts.ref), ("CAND", opts.cand)):
        if not path.is_dir():
            raise UserError(f"{role} {path}: not a folder")
    ref_cfg, cand_cfg = load_config(opts.ref), load_config(opts.cand)
    cand_dict = read_config_dict(opts.cand)
    if read_config_dict(opts.ref).get("quantization_config"):
        raise UserError(f"REF {opts.ref}: is itself quantized (config.json has quantization_config); "
                        f"REF must be the source-precision checkpoint")
    # CAND may record another activation dtype; everything that shapes the model must agree.
    diff = [f.name for f in dataclasses.fields(OneRecConfig)
            if f.name not in ("extra", "torch_dtype") and getattr(ref_cfg, f.name) != getattr(cand_cfg, f.name)]
    if diff:
        raise UserError("REF and CAND configs disagree on " + ", ".join(
            f"{k} ({getattr(ref_cfg, k)!r} vs {getattr(cand_cfg, k)!r})" for k in diff))
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
    elif opts.backend == "triton":
        raise UserError("--backend triton needs --device cuda")
    return ref_cfg, cand_dict


def resolve_contexts(opts: VerifyOptions, cfg):
    """Step 1b: the contexts both models run on, and a description for the report."""
    from fp8conv.runtime.inputs import load_contexts, sample_contexts, synthetic_contexts

    if opts.contexts is not None:
        ctx, desc = load_contexts(opts.contexts, cfg), {"source": "file", "path": str(opts.contexts)}
    elif opts.synthetic is None and (ctx := sample_contexts(opts.ref, cfg)) is not None:
        desc = {"source": "sample", "path": str(opts.ref / "contexts.safetensors")}
    else:
        n = opts.synthetic or DEFAULT_SYNTHETIC_USERS
        max_len = min(SYNTHETIC_MAX_LEN, cfg.max_context_length)
        ctx = synthetic_contexts(cfg, n, seed=opts.seed, min_len=min(SYNTHETIC_MIN_LEN, max_len), max_len=max_len)
        desc = {"source": "synthetic", "seed": opts.seed}
    desc.update(users=ctx.num_users, max_len=ctx.max_len, labels=ctx.labels is not None)
    return ctx, desc


def evaluate(thr: Thresholds, weights: WeightReport, beh: BehaviourReport | None) -> list[Failure]:
    """Every threshold, in report order."""
    out = [Failure("weights", f.tensor, f.problem) for f in weights.findings]
    if beh is None:
        return out
    lim = thr.layers.min_sqnr_db
    out += [Failure("layers", s.name, f"SQNR {s.sqnr_db:.1f} dB < {lim:g} dB", s.sqnr_db, lim)
            for s in beh.layers if s.sqnr_db < lim]
    for h in beh.heads:
        if not h.cosine >= thr.logits.min_cosine:
            out.append(Failure("logits", f"head {h.head}", f"cosine {h.cosine:.4f} < {thr.logits.min_cosine:g}",
                               h.cosine, thr.logits.min_cosine))
        if not h.kl <= thr.logits.max_kl:
            out.append(Failure("logits", f"head {h.head}", f"KL {h.kl:.4g} > {thr.logits.max_kl:g}",
                               h.kl, thr.logits.max_kl))
    b, bt = beh.beam, thr.beam
    for name, value, limit in (("top1_agreement_within_tie", b.top1_agreement_within_tie, bt.min_top1_agreement),
                               ("topk_overlap_within_tie", b.topk_overlap_within_tie, bt.min_topk_overlap),
                               ("rank_correlation", b.rank_correlation, bt.min_rank_correlation)):
        if not math.isnan(value) and value < limit:
            out.append(Failure("beam", name, f"{name} {value:.3f} < {limit:g}", value, limit))
    if b.regret > bt.max_regret:
        out.append(Failure("beam", "regret", f"REF prefers its own top-1 by {b.regret:.3f} nats on average "
                                             f"(> {bt.max_regret:g})", b.regret, bt.max_regret))
    if beh.rec is not None:
        rt = thr.recommendation
        for name, drop, limit in (("recall", beh.rec.recall_drop, rt.max_recall_drop),
                                  ("ndcg", beh.rec.ndcg_drop, rt.max_ndcg_drop)):
            if drop > limit:
                out.append(Failure("recommendation", f"{name}@{beh.rec.k}",
                                   f"{name}@{beh.rec.k} {100 * drop:.1f}% below REF (limit {100 * limit:g}%)",
                                   drop, limit))
    return out


def name_culprits(failures: list[Failure], beh: BehaviourReport | None) -> tuple[str, ...]:
    """Layers to blame (only when something failed). A weight finding names its layer exactly, and then
    the behavioural ranking would only add the layers that carry ordinary FP8 noise; without one, the
    recorded layers that added the most noise are the best evidence there is."""
    if not failures:
        return ()
    named = [_layer_of(f.subject) for f in failures if f.check == "weights"]
    if not named and beh is not None:
        named = [s.name for s in culprit_layers(beh.layers)]
    return tuple(dict.fromkeys(named))


def _layer_of(tensor: str) -> str:
    """model.layers.3.mlp.experts.5.up_proj.weight -> model.layers.3; other names stay whole."""
    parts = tensor.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return ".".join(parts[:3])
    return tensor


def run_verify(opts: VerifyOptions) -> VerifyReport:
    from fp8conv import ui
    from fp8conv.verify_behaviour import _Clock
    from fp8conv.verify_weights import Checkpoint, check_weights, read_manifest

    clock = _Clock()
    cfg, cand_dict = check_inputs(opts)
    ctx, ctx_desc = resolve_contexts(opts, cfg)
    ref_ck, cand_ck = Checkpoint(opts.ref, "REF"), Checkpoint(opts.cand, "CAND")
    clock.lap("inputs")
    with ui.progress("verify weights", len(ref_ck.names()), "tensors", quiet=not opts.progress) as p:
        weights = check_weights(ref_ck, cand_ck, cand_dict, read_manifest(opts.cand),
                                opts.thresholds.weights.min_sqnr_db, progress=p)
    clock.lap("weights")
    beh, skipped = None, None
    if weights.structural:
        skipped = "CAND's tensors do not fit the model (see the weight findings)"
    else:
        beh, skipped = _behaviour(opts, ctx, weights, clock)
    failures = evaluate(opts.thresholds, weights, beh)
    seconds = dict(clock.laps)
    seconds["total"] = round(sum(seconds.values()), 3)
    return VerifyReport(str(opts.ref), str(opts.cand), ctx_desc, opts.thresholds, weights, beh, skipped,
                        tuple(failures), name_culprits(failures, beh), seconds)


def _behaviour(opts: VerifyOptions, ctx, weights: WeightReport, clock):
    from fp8conv import ui
    from fp8conv.runtime.beam import load_catalogue
    from fp8conv.runtime.model import load_model
    from fp8conv.verify_behaviour import compare_behaviour

    try:
        ref_model = load_model(opts.ref, device=opts.device, backend=opts.backend)
        cand_model = load_model(opts.cand, device=opts.device, backend=opts.backend)
    except UserError as e:
        if weights.findings:  # the weight findings already explain why CAND does not load
            return None, f"CAND does not load ({e})"
        raise
    clock.lap("load")
    if opts.progress:
        ui.log(f"verify: beam search (width {opts.beam}) and replay on {ctx.num_users} users ...")
    catalogue = load_catalogue(opts.ref, ref_model.cfg.codebook_size)
    beh = compare_behaviour(ref_model, cand_model, ctx.to(opts.device), opts.beam, opts.top_n,
                            catalogue=catalogue, tie_margin=opts.thresholds.beam.tie_margin, clock=clock)
    return beh, None
