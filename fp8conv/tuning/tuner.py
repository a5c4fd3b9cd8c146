"""What `fp8conv tune` does: derive the shapes, tune them on this GPU into a cache folder, report; and
`fp8conv tune --show`: what the caches hold and what a checkpoint would use."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from fp8conv.config import OneRecConfig, load_config, preset as get_preset
from fp8conv.errors import UserError
from fp8conv.tuning import cache, lookup, shapes


@dataclass(frozen=True)
class Source:
    cfg: OneRecConfig
    schemes: dict[str, str] | None
    label: str
    scheme_origin: str


def load_source(ckpt: Path | None, preset: str | None) -> Source | None:
    if ckpt is not None and preset is not None:
        raise UserError("give either CKPT or --preset, not both")
    if preset is not None:
        return Source(get_preset(preset), None, f"preset {preset}", "built-in OneRec-V2 recipe (preset)")
    if ckpt is None:
        return None
    cfg = load_config(ckpt)
    schemes = shapes.read_schemes(ckpt)
    origin = "safetensors headers (weight_scale shapes)"
    if schemes is None:
        origin = "built-in OneRec-V2 recipe (no model weights in the folder)"
    elif not any(s != "keep" for s in schemes.values()):
        raise UserError(f"{ckpt}: no FP8 weights (no *.weight_scale): tune an FP8 checkpoint written by "
                        f"`fp8conv quantize`, or use --preset")
    return Source(cfg, schemes, str(ckpt), origin)


def versions() -> tuple[str, str]:
    import torch

    return lookup.triton_version(), torch.__version__.split("+")[0]


def geomean(xs) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# -- tune ---------------------------------------------------------------------------------------------

def tune(src: Source, load: shapes.Load, out_dir: Path, budget_s: float | None, *, force: bool = False,
         keep: int = 24, patience: int = 8, quiet: bool = False, bench=None, timer=None,
         device: str | None = None, lim=None) -> dict:
    """Tune every target of ``src`` at ``load`` into ``out_dir``; returns the report. ``bench``, ``timer``,
    ``device`` and ``lim`` default to this CUDA GPU's (the tests inject fakes)."""
    import torch

    from fp8conv import ui
    from fp8conv.kernels.fp8_gemm import gluon_dense_ok
    from fp8conv.tuning import candidates, gpu, search

    if bench is None and not torch.cuda.is_available():
        raise UserError("fp8conv tune needs a CUDA GPU (torch.cuda.is_available() is False); "
                        "`fp8conv tune --show` lists the cache without one")
    problems = shapes.derive(src.cfg, load, src.schemes)
    targets = shapes.tuning_targets(problems)
    if not targets:
        raise UserError(f"{src.label}: no kernel to tune (no channel Linear, no block experts, no top-k)")
    device = device or torch.cuda.get_device_name()
    bench = bench or gpu.KernelBench("cuda")
    timer = timer or gpu.cuda_timer
    triton_v, torch_v = versions()
    lim = lim or candidates.device_limits()
    # fp8_gemm's promoted GEMMs run in Gluon on this GPU: WARP_SPEC variants of its forms are one kernel
    gluon = gluon_dense_ok(getattr(bench, "device", "cpu"))
    t0 = time.monotonic()
    if not quiet:
        ui.log(f"tune {src.label} on {device} (Triton {triton_v}, torch {torch_v}): {len(targets)} shapes, "
               f"batch {load.batch} beam {load.beam}, budget "
               f"{'none' if budget_s is None else f'{budget_s / 60:.1f} min'}, cache {out_dir}")
    with ui.progress("tune", len(targets), "shapes", quiet=quiet) as prog:
        def on_start(i, p, n):
            prog.advance(0, info=f"{p.label()}: {n} candidates")

        def on_trial(res, trial):
            b = res.best
            best = f"best {b.time_us:.1f} us" if b else "no correct config yet"
            d = res.default_us
            gain = f" ({d / b.time_us:.2f}x default)" if b and d else ""
            prog.advance(0, info=f"{res.problem.label()}: {len(res.trials)} tried, {best}{gain}")

        def on_done(i, out):
            e = out.entry
            info = f"{out.problem.label()}: {out.status}"
            if e is not None and e.speedup_vs_default:
                info += f", {e.time_us:.1f} us, {e.speedup_vs_default:.2f}x default"
            prog.advance(1, info=info)

        outcomes = search.run_targets(
            targets, out_dir, device, bench, timer,
            lambda p: candidates.distinct_kernels(candidates.candidates(p, lim, keep=keep), p, gluon),
            triton=triton_v, torch=torch_v,
            budget_s=budget_s, force=force, patience=patience, on_start=on_start, on_trial=on_trial,
            on_done=on_done, warn=ui.log)
    lookup.clear()
    entries = [o.entry for o in outcomes if o.entry is not None]
    report = {
        "source": src.label, "schemes_from": src.scheme_origin, "device": device, "triton": triton_v,
        "torch": torch_v, "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "load": {"batch": load.batch, "beam": load.beam, "context": load.context},
        "cache_dir": str(out_dir), "budget_s": budget_s, "elapsed_s": round(time.monotonic() - t0, 2),
        "limits": {"sms": lim.sms, "max_shared": lim.max_shared, "max_regs": lim.max_regs},
        "summary": {
            status: sum(o.status == status for o in outcomes) for status in ("tuned", "resumed", "failed", "skipped")
        },
        "geomean_speedup_vs_default": geomean(e.speedup_vs_default for e in entries),
        "geomean_speedup_vs_baseline": geomean(e.speedup_vs_baseline for e in entries),
        "shapes": [o.to_dict() for o in outcomes],
        "not_tuned": [p.to_dict() for p in problems if not p.tunable],
    }
    return report


def print_tune(report: dict) -> None:
    from fp8conv import ui

    # top-k: N = row length C, K = k kept, M = rows
    ui.log("kernel                 N     K       M  bucket |   tuned us  default us  baseline us | "
           "x default  x base | config")
    for s in report["shapes"]:
        p, e = s["problem"], s["entry"]
        if e is None:
            ui.log(f"{p['kernel']:<16} {p['N']:>7} {p['K']:>5} {p['M']:>7} {p['bucket']:>7} | {s['status']}")
            continue
        cfg = _config_label(e["config"], p["kernel"])
        ui.log(f"{p['kernel']:<16} {p['N']:>7} {p['K']:>5} {p['M']:>7} {p['bucket']:>7} | "
               f"{e['time_us']:>10.1f} {_f(e['default_time_us']):>11} {_f(e['baseline_time_us']):>12} | "
               f"{_f(e['speedup_vs_default'], 2):>9} {_f(e['speedup_vs_baseline'], 2):>7} | {cfg}"
               f"{'' if s['status'] == 'tuned' else ' (' + s['status'] + ')'}")
    sm = report["summary"]
    ui.log(f"{sm['tuned']} tuned, {sm['resumed']} already in the cache, {sm['failed']} failed, "
           f"{sm['skipped']} skipped (budget) in {report['elapsed_s']:.0f} s; geometric mean "
           f"{_f(report['geomean_speedup_vs_default'], 3)}x the default configs, "
           f"{_f(report['geomean_speedup_vs_baseline'], 3)}x the library baselines; wrote {report['cache_dir']}")
    for p in report["not_tuned"]:
        ui.log(f"not tuned: {p['kernel']} N={p['N']} K={p['K']} M={p['M']} (no tunable kernel: its documented "
               f"default runs)")


def _config_label(c: dict, kernel: str = "") -> str:
    """A KernelConfig dict as one token: 128x256x128 g8 w8 s3; top-k, the fields its kernels read:
    chunk 131072 step 2048 w8 (the chunk only matters on rows longer than kernels/topk.py's SMALL_C)."""
    if kernel == "topk":
        return f"chunk {c['BLOCK_N']} step {c['BLOCK_K']} w{c['num_warps']}"
    split = f" split{c['SPLIT_K']}" if c.get("SPLIT_K", 1) > 1 else ""
    ws = " ws" if c.get("WARP_SPEC", 0) else ""
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} g{c['GROUP_M']} w{c['num_warps']} s{c['num_stages']}{split}{ws}"


def _f(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


# -- show -----------------------------------------------------------------------------------------------

def show(src: Source | None, load: shapes.Load, extra_dirs: list[Path], device: str | None) -> dict:
    if device:
        try:
            cache.device_key(device)
        except ValueError as e:
            raise UserError(f"--device: {e}") from None
    dirs = cache.search_dirs(extra_dirs)
    files, problems_found, devices = [], [], set()
    for d in dirs:
        good, bad = cache.scan(d)
        for path, cf in good:
            devices.add(cf.device)
            files.append({"path": str(path), "device": cf.device, "kernel": cf.kernel, "N": cf.n, "K": cf.k,
                          "entries": {str(b): e.to_dict() for b, e in sorted(cf.entries.items())}})
        problems_found += [{"path": str(e.path), "problem": e.reason} for e in bad]
    out = {"search_dirs": [str(d) for d in dirs], "files": files, "bad_files": problems_found,
           "triton": lookup.triton_version()}
    if src is not None:
        here = lookup.current_device()
        devs = [device] if device else [here] if here else sorted(devices) or [candidates_h100_name()]
        d, inter = src.cfg.hidden_size, src.cfg.moe_intermediate_size
        out["checkpoint"] = {"source": src.label, "schemes_from": src.scheme_origin,
                             "load": {"batch": load.batch, "beam": load.beam, "context": load.context},
                             "devices": {}}
        lookup.clear()
        import warnings

        with warnings.catch_warnings():  # bad files are in "bad_files" (SKIPPED): no second, raw report
            warnings.simplefilter("ignore", lookup.TuningFallbackWarning)
            for dev in devs:
                # the experts' kernels as the backend runs them on that device: this GPU's rule here, the
                # rule for its name elsewhere (the Gluon kernels on Hopper)
                layout = shapes.expert_layout(d, inter) if dev == here else shapes.expert_layout_on(dev, d, inter)
                targets = shapes.tuning_targets(shapes.derive(src.cfg, load, src.schemes, layout=layout))
                out["checkpoint"]["devices"][dev] = [
                    lookup.lookup(p.kernel, p.n, p.k, p.m, device=dev, dirs=dirs).to_dict() | {"label": p.label()}
                    for p in targets]
        lookup.clear()  # what was read here was not reported: a later look-up warns afresh
    return out


def candidates_h100_name() -> str:
    from fp8conv.tuning.candidates import H100

    return H100.name


def print_show(rep: dict) -> None:
    from fp8conv import ui

    ui.log("searched (first wins): " + ", ".join(rep["search_dirs"]))
    if not rep["files"]:
        ui.log("the caches hold no tuned configs")
    for f in rep["files"]:
        ui.log(f"{f['path']}: {f['device']} {f['kernel']} N={f['N']} K={f['K']}")
        for b, e in f["entries"].items():
            ui.log(f"  bucket {b:>6} (M={e['m']}): {_config_label(e['config'], f['kernel'])}  {e['time_us']:.1f} us, "
                   f"{_f(e.get('speedup_vs_default'), 2)}x default, {_f(e.get('speedup_vs_baseline'), 2)}x "
                   f"{e.get('baseline') or 'baseline'}; Triton {e['triton']}, torch {e['torch']}, {e['date']}")
    for b in rep["bad_files"]:
        ui.log(f"SKIPPED {b['path']}: {b['problem']}")
    ck = rep.get("checkpoint")
    if ck:
        ui.log(f"{ck['source']} at batch {ck['load']['batch']} beam {ck['load']['beam']} "
               f"(schemes from {ck['schemes_from']}), Triton {rep['triton']}:")
        for dev, choices in ck["devices"].items():
            ui.log(f"  on {dev}:")
            for c in choices:
                how = c["level"] if c["level"] != "default" else "DEFAULT"
                detail = f" ({c['reason']})" if c["reason"] else ""
                ui.log(f"    {c['label']:<70} {how}{detail}")
