"""fp8conv quantize against a plain safetensors load-and-save copy of the same checkpoint.

Each case runs in a fresh subprocess (peak RSS from os.wait4, so one run's memory does not hide
another's); cases alternate, baseline first, and the source is read once before every run so both
start from the same page-cache state. Prints one line per run and a summary table; writes JSON.

    python benchmarks/bench_quantize.py --ckpt /path/to/ckpt-4b --repeat 2 --json bench-quantize.json
    python benchmarks/bench_quantize.py --preset tiny            # synthesises the checkpoint first
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The baseline: what "copy this checkpoint with safetensors" costs on this machine.
BASELINE = r"""
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for p in sorted(src.iterdir()):
    if p.suffix == ".safetensors":
        tensors = load_file(str(p))
        save_file(tensors, str(dst / p.name), metadata={"format": "pt"})
        del tensors
    else:
        shutil.copyfile(p, dst / p.name)
"""


def run_case(cmd: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds user+sys) of one subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss is in KiB on Linux


def warm(src: Path) -> None:
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="source checkpoint (default: synthesise --preset)")
    ap.add_argument("--preset", default="tiny", help="synth preset when --ckpt is not given")
    ap.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=Path("bench-quantize.json"))
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    src = args.ckpt
    if src is None:
        src = work / f"src-{args.preset}"
        if not src.exists():
            subprocess.run([sys.executable, "-m", "fp8conv.cli", "synth", str(src), "--preset", args.preset],
                           check=True)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    quant = [sys.executable, "-m", "fp8conv.cli", "quantize", str(src), str(work / "out-fp8"), "--json"]
    if args.threads:
        quant += ["--threads", str(args.threads)]
    cases = {"safetensors load+save": [sys.executable, "-c", BASELINE, str(src), str(work / "out-copy")],
             "fp8conv quantize": quant}
    runs: dict[str, list[tuple[float, int, float]]] = {k: [] for k in cases}
    print(f"source {src}: {size / 1e9:.3f} GB, {os.cpu_count()} CPUs", flush=True)
    for i in range(args.repeat):
        for name, cmd in cases.items():
            shutil.rmtree(work / "out-copy", ignore_errors=True)
            shutil.rmtree(work / "out-fp8", ignore_errors=True)
            subprocess.run(["sync"], check=False)
            warm(src)
            wall, rss, cpu = run_case(cmd)
            runs[name].append((wall, rss, cpu))
            print(f"run {i + 1} {name:24s} {wall:8.2f} s  {size / wall / 1e9:6.3f} GB/s  "
                  f"CPU {cpu:7.2f} s  peak RSS {rss / 1e9:6.3f} GB", flush=True)
    base = statistics.median(w for w, _, _ in runs["safetensors load+save"])
    rows = []
    print(f"\n{'case':24s} | {'median s':>8s} | {'GB/s':>6s} | {'CPU s':>6s} | {'peak RSS GB':>11s} | x vs baseline")
    for name, rs in runs.items():
        med = statistics.median(w for w, _, _ in rs)
        cpu = statistics.median(c for _, _, c in rs)
        rss = max(r for _, r, _ in rs)
        rows.append({"case": name, "seconds": [round(w, 3) for w, _, _ in rs], "median_s": round(med, 3),
                     "cpu_s": round(cpu, 2), "gb_per_s": round(size / med / 1e9, 3), "peak_rss_bytes": rss,
                     "x_vs_baseline": round(med / base, 3)})
        print(f"{name:24s} | {med:8.2f} | {size / med / 1e9:6.3f} | {cpu:6.1f} | {rss / 1e9:11.3f} | "
              f"{med / base:.3f}")
    import safetensors
    import torch

    out = {"source": str(src), "bytes": size, "repeat": args.repeat, "cpus": os.cpu_count(),
           "machine": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
           "torch": torch.__version__, "safetensors": safetensors.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": rows}
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
