"""The README's quantization quality table: run its rows (resumable, in parts) and print it.

    python tools/quality_table.py list                     # rows, their commands, which are done
    python tools/quality_table.py run [--worker 0/2] [--only ROW ...] [--threads 1]
    python tools/quality_table.py table                    # Markdown table from reports/quality/*/result.json

Every row is one `trt-dm eval` on the default model with the same seeds (0..N-1) and N, so rows compare.
A row whose result.json exists is never recomputed (delete the folder to redo it). `--worker i/k` runs
every k-th pending row, so k processes on k cores share the list without overlap.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "quality"
N = 2000

# (row id, label, extra `trt-dm eval` arguments). DDIM 100 steps unless the arguments say otherwise.
ROWS: list[tuple[str, str, list[str]]] = [
    ("fp", "FP32", []),
    ("fp-seed100000", "FP32, other seeds (noise floor)", ["--seed", "100000"]),
    ("w8a8-ndtc-ptq4dm", "W8A8 ndtc, mse@pooled (ptq4dm, default)", ["--recipe", "ptq4dm"]),
    ("w8a8-single-ptq4dm", "W8A8 single (t at the last step), mse@pooled",
     ["--recipe", "ptq4dm", "--timesteps", "single"]),
    ("w8a8-uniform-ptq4dm", "W8A8 uniform, mse@pooled", ["--recipe", "ptq4dm", "--timesteps", "uniform"]),
    ("w8a8-ndtc-max", "W8A8 ndtc, max@pooled", ["--recipe", "max"]),
    ("w4a8-ndtc-ptq4dm", "W4A8 ndtc, mse@pooled", ["--recipe", "ptq4dm", "--weight-bits", "4"]),
    ("w4a8-ndtc-ptq4dm-split", "W4A8 ndtc, mse@pooled, shortcut split",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--shortcut-split"]),
    ("w8a8-ndtc-percentile", "W8A8 ndtc, percentile 99.99@pooled", ["--recipe", "percentile"]),
    ("w8a8-ndtc-mse-minmean", "W8A8 ndtc, mse@min-mean", ["--recipe", "mse:2.4@min-mean"]),
    ("w8a8-ndtc-mse-g4", "W8A8 ndtc, mse@groups=4 (4 range sets)", ["--recipe", "ptq4dm-g4"]),
    ("ddpm250-fp", "FP32, DDPM 250", ["--sampler", "ddpm", "--steps", "250"]),
    ("ddpm250-w8a8-ndtc-ptq4dm", "W8A8 ndtc, mse@pooled (ptq4dm), DDPM 250",
     ["--sampler", "ddpm", "--steps", "250", "--recipe", "ptq4dm"]),
]


def command(row: str, extra: list[str], threads: int) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "trt-dm"), "eval", "--model", "default", "--n", str(N),
            "--threads", str(threads), "--eps-n", "128", "--no-progress", "--out-dir", str(OUT / row), *extra]


def done(row: str) -> dict | None:
    p = OUT / row / "result.json"
    return json.loads(p.read_text()) if p.exists() else None


def cmd_list(args) -> int:
    for row, label, extra in ROWS:
        print(f"{'done ' if done(row) else '     '} {row:28s} {label}\n        {' '.join(command(row, extra, 1)[1:])}")
    return 0


def cmd_run(args) -> int:
    i, k = (int(v) for v in args.worker.split("/"))
    pending = [r for r in ROWS if not done(r[0]) and (not args.only or r[0] in args.only)]
    for row, label, extra in pending[i::k]:
        OUT.joinpath(row).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {row}: {label}", flush=True)
        with open(OUT / row / "log.txt", "w") as log:
            rc = subprocess.call(command(row, extra, args.threads), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"[{time.strftime('%H:%M:%S')}] {row}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
    return 0


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def cmd_table(args) -> int:
    fp = {}
    for key in ("fp", "ddpm250-fp"):
        r = done(key)
        if r:
            fp[(r["sampler"], r["steps"])] = r["fd"]
    print(f"| Configuration | Sampler | FD-EffNet | vs FP | PSNR vs FP (dB) | eps MSE vs FP | KID (x1e-3) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row, label, _ in ROWS:
        r = done(row)
        if r is None:
            print(f"| {label} | | not run yet | | | | |")
            continue
        ref = fp.get((r["sampler"], r["steps"]))
        change = None if ref is None or row in ("fp", "ddpm250-fp") else 100 * (r["fd"] - ref) / ref
        eps = r.get("eps", {})
        rel = eps.get("mse")
        print(f"| {label} | {r['sampler'].upper()} {r['steps']} | {r['fd']:.2f} | {_fmt(change, '+.1f')}{'%' if change is not None else ''} "
              f"| {_fmt(r.get('psnr_vs_fp'), '.2f')} | {_fmt(rel, '.2e')} | {r['kid_mean'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list").set_defaults(func=cmd_list)
    p = sub.add_parser("run")
    p.add_argument("--worker", default="0/1", help="i/k: run every k-th pending row starting at i")
    p.add_argument("--only", nargs="*", default=None, help="row ids to run (default: all pending)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_run)
    sub.add_parser("table").set_defaults(func=cmd_table)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
