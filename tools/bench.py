"""`make bench`: the CPU benchmark matrix, side by side in one run, written to BENCHMARKS.md.

    python tools/bench.py [--threads 2] [--quick]

1. `trt-dm profile` on the default model and the DDPM CIFAR-10 architecture (random weights): torch fp32,
   ONNX Runtime fp32, int8 in ONNX Runtime's layout (the recipe's layers, or all ops) and int8 in the
   TensorRT layout, batches 1 / 8 / 32.
2. The pipeline's own cost: `trt-dm engine` on the default model with a cold calibration cache (a fresh
   folder) and warm (the same folder again), and the statistics pass's overhead over the FP sampling.
Absolute times are this machine's; every ratio compares numbers measured in this same run.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRT_DM = str(ROOT / ".venv" / "bin" / "trt-dm")


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return secs, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer iterations and batches (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    out_dir = ROOT / "docs" / "bench"
    batches = ["1", "8"] if args.quick else ["1", "8", "32"]
    iters = ["--warmup", "1", "--iters", "3"] if args.quick else ["--warmup", "3", "--iters", "10"]
    profile_cmd = [TRT_DM, "profile", "--arch", "default", "--arch", "ddpm-cifar10", "--batches", *batches,
                   "--threads", str(args.threads), "--steps", "10", *iters, "--out-dir", str(out_dir)]
    t_profile, _ = run(profile_cmd)
    doc = json.loads((out_dir / "profile.json").read_text())

    with tempfile.TemporaryDirectory() as tmp:
        engine_cmd = [TRT_DM, "engine", "--model", "default", "--threads", str(args.threads), "--no-progress",
                      "--cache-dir", f"{tmp}/calib_cache", "--out-dir", f"{tmp}/engines"]
        t_cold, cold_out = run(engine_cmd)
        t_warm, warm_out = run(engine_cmd)
    m = re.search(r"collected in ([\d.]+) s: FP trajectories ([\d.]+) s \+ statistics pass ([\d.]+) s", cold_out)
    collect, traj, stats_pass = (float(v) for v in m.groups()) if m else (float("nan"),) * 3

    from trt_dm.eval.profile import markdown, ratios  # noqa: E402  (after the runs: the report module only)
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (`python tools/bench.py --threads {args.threads}`) on "
             f"{time.strftime('%Y-%m-%d')}; the raw numbers are in `docs/bench/profile.json`.", "",
             "## UNet calls and sampling, per runner (CPU)", "", f"Command: `{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(profile_cmd)).replace(str(out_dir), 'docs/bench')}`", "",
             markdown(doc["results"], doc["machine"]), "![images/s per UNet call vs batch](docs/bench/profile.png)", ""]
    cols = [("ort-int8", "ORT int8, ORT layout (recipe's layers)"), ("ort-int8-all-ops", "ORT int8, all ops"),
            ("ort-int8-trt-layout", "ORT int8, TensorRT layout"), ("ov-int8", "OpenVINO int8 (TensorRT layout, 2 streams)"),
            ("ov-int8-1stream", "OpenVINO int8, one stream"),
            ("ov-int8-onegraph", "OpenVINO int8, one graph of 4 range sets (TensorRT's form of the default recipe)"),
            ("ov-int8-groups", "OpenVINO int8, 4 graphs switched by timestep (the openvino target's default)"),
            ("ov-int8-bf16", "OpenVINO int8, bf16 non-quantized math"),
            ("ov-int8-groups-bf16", "OpenVINO int8, 4 graphs, bf16 math"), ("ov-bf16", "OpenVINO bf16"),
            ("ov-fp32", "OpenVINO fp32"), ("torch-fp32", "torch fp32")]
    have = [(k, label) for k, label in cols if any(k in res["runners"] for res in doc["results"])]
    lines += ["## Int8 on CPU (ONNX Runtime, OpenVINO): speed-up over ONNX Runtime fp32 (same run)", "",
              "Each cell: ratio of median latencies (ratio of the fastest calls). Other load on a shared machine "
              "only adds time, so where the two differ the fastest calls are the less disturbed estimate. "
              "OpenVINO int8 over OpenVINO bf16 is the calibration-free alternative int8 has to beat.", "",
              "| architecture | batch | " + " | ".join(label for _, label in have) + " |",
              "|---|---:|" + "---:|" * len(have)]
    for res in doc["results"]:
        med, fast = ratios(res), ratios(res, key="min_ms")

        def cell(name, b):
            return f"{med[name][b]:.2f}x ({fast[name][b]:.2f}x)" if b in med.get(name, {}) else "n/a"
        for b in sorted(med.get("ort-int8", {})):
            lines.append(f"| {res['arch']} | {b} | " + " | ".join(cell(k, b) for k, _ in have) + " |")
    lines += ["", "## The pipeline's own cost (default model)", "",
              "| what | seconds |", "|---|---:|",
              f"| `trt-dm engine` (= `make engine`), calibration cache cold | {t_cold:.0f} |",
              f"| `trt-dm engine`, calibration cache warm | {t_warm:.0f} |",
              f"| statistics collection: FP trajectories (the sampling it rides on) | {traj:.1f} |",
              f"| statistics collection: statistics pass | {stats_pass:.1f} |",
              f"| collection / plain FP sampling | {collect / traj:.2f}x |", "",
              f"Command: `trt-dm engine --model default --threads {args.threads} --cache-dir <fresh folder>` twice. "
              f"Profile run: {t_profile:.0f} s.", ""]
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    keep = old[old.index("## Serving:"):] if "## Serving:" in old else ""  # `make serve-bench`'s section stays
    out.write_text("\n".join(lines).rstrip() + "\n" + ("\n" + keep if keep else ""))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
