"""`trt-dm engine` at a given model scale on this machine, with wall time and peak memory per stage.

    python tools/scale_run.py [--arch default|ddpm-cifar10|sd15|sdxl|dit-xl-2|sd3-medium|pixart-sigma]
                              [--dir /tmp/<arch>-scale] [--threads 2]
                              [--sample-size S] [-- extra trt-dm engine arguments]

The same small calibration set for every scale (4 samples' trajectories, DDIM 10, the paper's one-range recipe;
text pipelines: 4 built-in prompts at guidance 7.5) and engine profiles for 1..4 images. Writes a random-weight
model unless it is there (``default`` is the embedded one): DDPM-CIFAR10's UNet (35.7 M,
trt_dm.models.builders.write_arch_pipeline), a pipeline at SD 1.5's sizes (write_sd15_layout_pipeline: the 859.5 M
UNet, a CLIP-L-sized text encoder, SD's VAE channels) or at SDXL base's (write_sdxl_layout_pipeline: the 2.567 B
UNet, CLIP-L- and bigG-sized encoders; latents of --sample-size, 128 = 1024 px) or DiT-XL/2 (749.8 M, class-
conditional: calibrated on every class in turn) or SD3 medium's (write_sd3_layout_pipeline: the 2.03 B MMDiT,
CLIP-L- and bigG-sized encoders, no T5) or PixArt-Sigma's (write_pixart_layout_pipeline: the 0.61 B transformer, a
2-layer T5 of T5-XXL's width), in a process of its own. The
stage table (wall time and peak resident memory per stage), the UNet's parameter count, the machine and the log go
to reports/scale/<arch>/; tools/cost_growth.py tabulates and plots them (docs/performance.md). Stages that do not
fit this machine's memory are refused before they start, naming the flag that skips them (see
docs/text-to-image.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


WRITERS = {"ddpm-cifar10": "write_arch_pipeline({path!r}, 'ddpm-cifar10')",
           "sd15": "write_sd15_layout_pipeline({path!r})",
           "sdxl": "write_sdxl_layout_pipeline({path!r}, sample_size={size})",
           "dit-xl-2": "write_arch_pipeline({path!r}, 'dit-xl-2')",
           "sd3-medium": "write_sd3_layout_pipeline({path!r}, sample_size={size})",
           "pixart-sigma": "write_pixart_layout_pipeline({path!r}, sample_size={size})"}


def unet_params(model: Path) -> int:
    """Parameters of the UNet (or transformer) in ``model`` (its safetensors headers: nothing loaded)."""
    from safetensors import safe_open
    n = 0
    for f in sorted((model / "unet").glob("*.safetensors")) + sorted((model / "transformer").glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n += int(__import__("math").prod(shape))
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("default", *WRITERS), default="sd15")
    p.add_argument("--dir", type=Path, default=None, help="default /tmp/<arch>-scale")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sample-size", type=int, default=None,
                   help="sdxl, sd3-medium, pixart-sigma: latent size (default 128: 1024 px)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more `trt-dm engine` arguments (after --)")
    args = p.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    args.dir = args.dir or Path(f"/tmp/{args.arch}-scale")
    model = Path(__file__).resolve().parent.parent / "models" / "default" if args.arch == "default" \
        else args.dir / args.arch
    out = ROOT / "reports" / "scale" / args.arch
    if not (model / "model_index.json").exists() and args.arch != "default":  # by a process of its own, which ends
        t0 = time.perf_counter()                                                # (and frees) before the run starts
        call = WRITERS[args.arch].format(path=str(model), size=args.sample_size or 128)
        subprocess.check_call([sys.executable, "-c", f"from trt_dm.models.builders import *; {call}"])
        print(f"wrote {model} in {time.perf_counter() - t0:.0f} s")
    text = args.arch in ("sd15", "sdxl", "sd3-medium", "pixart-sigma")
    cmd = [str(ROOT / ".venv" / "bin" / "trt-dm"), "engine", "--model", str(model), "--out-dir",
           str(args.dir / "engines"), "--cache-dir", str(args.dir / "cache"), "--calib-n", "4", "--calib-steps", "10",
           "--batch", "4", "--threads", str(args.threads), "--min-batch", "1", "--opt-batch", "1", "--max-batch", "4",
           "--recipe", "ptq4dm",  # 4 samples cannot fill 4 timestep groups
           *(["--timesteps", "uniform"] if not text else []), *(["--classes", "all"] if "dit" in args.arch else []),
           "--no-progress", *extra]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:  # (peaks per stage come from the stage table: /usr/bin/time's maximum
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)  # is reset with them at each stage)
    stages = sorted((args.dir / "engines").glob(f"{model.name}-*.stages.json"), key=lambda f: f.stat().st_mtime)
    summary = {"command": " ".join(cmd[1:]), "exit": rc, "wall_seconds": round(time.perf_counter() - t0, 1),
               "unet_params": unet_params(model), "threads": args.threads, "machine": cpu_line(),
               "stages": json.loads(stages[-1].read_text()) if stages else None}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, indent=2))
    return rc


def cpu_line() -> dict:
    """The machine (CPU model, int8 flags, memory): stage times compare only within one machine."""
    from trt_dm.eval.profile import machine
    m = machine()
    return {k: m[k] for k in ("cpu", "cpu_count", "cpu_flags", "int8_isa", "torch")} | {
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


if __name__ == "__main__":
    sys.exit(main())
