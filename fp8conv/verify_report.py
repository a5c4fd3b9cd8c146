"""How ``fp8conv verify`` shows its report: rich tables on a terminal, plain lines in CI logs (both on
stderr), and the verdict line last. ``--json`` is VerifyReport.to_dict on stdout (see commands/verify).
"""

from __future__ import annotations

import math

from fp8conv.verify import VerifyReport
from fp8conv.verify_weights import min_sqnr


def _f(x: float | None, fmt: str = ".2f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, fmt)


def _rel(ref: float, cand: float) -> str:
    return f"{100 * (cand - ref) / ref:+.2f}% relative" if ref else "n/a"


def summary_lines(r: VerifyReport) -> list[str]:
    """The headline facts, one per line (shared by both renderings)."""
    c = r.contexts
    lines = [f"verify {r.ref} -> {r.cand}",
             f"contexts: {c['source']}, {c['users']} users, up to {c['max_len']} tokens"
             f"{', with labels' if c['labels'] else ''}; thresholds: {r.thresholds.source}"]
    w = r.weights
    worst = min_sqnr(w)
    lines.append(f"weights ({w.mode}{', recipe ' + w.recipe if w.recipe else ''}): {w.checked} tensors, "
                 f"{w.quantized} quantized, {len(w.findings)} finding(s)"
                 + (f"; lowest SQNR {_f(worst[1], '.1f')} dB ({worst[0]})" if worst else ""))
    b = r.behaviour
    if b is None:
        lines.append(f"behaviour: skipped ({r.behaviour_skipped})")
        return lines
    bm = b.beam
    lines.append(f"beam (width {bm.beam_width}, top {bm.top_n}): top-1 agreement {100 * bm.top1_agreement:.1f}% "
                 f"({bm.users - len(bm.top1_disagreeing_users)}/{bm.users}), top-{bm.top_n} overlap "
                 f"{100 * bm.topk_overlap:.1f}%, Kendall tau {_f(bm.rank_correlation, '.3f')}")
    lines.append(f"  within a {bm.tie_margin:g}-nat tie: top-1 {100 * bm.top1_agreement_within_tie:.1f}%, "
                 f"top-{bm.top_n} {100 * bm.topk_overlap_within_tie:.1f}%; REF-score regret of CAND's top-1 "
                 f"{bm.regret:.4f} nats")
    if b.rec is not None:
        rc = b.rec
        lines.append(f"Recall@{rc.k} {rc.recall_ref:.4f} -> {rc.recall_cand:.4f} ({_rel(rc.recall_ref, rc.recall_cand)}), "
                     f"NDCG@{rc.k} {rc.ndcg_ref:.4f} -> {rc.ndcg_cand:.4f} ({_rel(rc.ndcg_ref, rc.ndcg_cand)})")
    return lines


def verdict(r: VerifyReport) -> str:
    if r.passed:
        return f"PASS ({r.seconds.get('total', 0):.1f} s)"
    blame = ", ".join(r.culprits) if r.culprits else "see the failures above"
    return f"REGRESSION: {len(r.failures)} check(s) failed; layers that contribute most: {blame}"


def render_plain(r: VerifyReport, log) -> None:
    for line in summary_lines(r):
        log(line)
    if r.behaviour is not None:
        for s in r.behaviour.layers:
            log(f"  {s.name:<28} rel_err {_f(s.rel_error, '.4f'):>8}  SQNR {_f(s.sqnr_db, '.1f'):>6} dB"
                f"  drop {_f(s.drop_db, '.1f'):>6} dB")
        for h in r.behaviour.heads:
            log(f"  head {h.head}: cosine {h.cosine:.5f}  KL {h.kl:.3g}  argmax agreement "
                f"{100 * h.top1_agreement:.1f}%")
    for f in r.failures:
        log(f"FAIL [{f.check}] {f.subject}: {f.message}")
    log(verdict(r))


def render_rich(r: VerifyReport, console) -> None:
    from rich.table import Table

    for line in summary_lines(r):
        console.print(line, markup=False)
    if r.behaviour is not None:
        lim = r.thresholds.layers.min_sqnr_db
        t = Table(title="per-layer output error (CAND vs REF)", title_justify="left")
        for col in ("tensor", "rel error", "SQNR dB", "drop dB", "noise added"):
            t.add_column(col, justify="left" if col == "tensor" else "right")
        for s in r.behaviour.layers:
            style = "red" if s.sqnr_db < lim else None
            t.add_row(s.name, _f(s.rel_error, ".4f"), _f(s.sqnr_db, ".1f"), _f(s.drop_db, ".1f"),
                      _f(s.contribution, ".2e"), style=style)
        console.print(t)
        h = Table(title="head logits", title_justify="left")
        for col in ("head", "cosine", "KL (nats)", "argmax agreement"):
            h.add_column(col, justify="right")
        for s in r.behaviour.heads:
            h.add_row(str(s.head), f"{s.cosine:.5f}", f"{s.kl:.3g}", f"{100 * s.top1_agreement:.1f}%")
        console.print(h)
    if r.failures:
        f = Table(title="failures", title_justify="left", style="red")
        for col in ("check", "subject", "problem"):
            f.add_column(col)
        for x in r.failures:
            f.add_row(x.check, x.subject, x.message)
        console.print(f)
    console.print(verdict(r), style="bold green" if r.passed else "bold red", markup=False)
