"""`trt-dm engine` at SD 1.5's or SDXL's scale on this machine, with wall time and peak memory per stage.

    python tools/scale_run.py [--arch sd15|sdxl] [--dir /tmp/<arch>-scale] [--threads 2] [--sample-size S]
                              [-- extra trt-dm engine arguments]

Writes a random-weight pipeline at SD 1.5's sizes (trt_dm.models.builders.write_sd15_layout_pipeline: the 859.5 M
parameter UNet, a CLIP-L-sized text encoder, SD's VAE channels) or SDXL base's (write_sdxl_layout_pipeline: the
2.567 B UNet, CLIP-L- and bigG-sized encoders; latents of --sample-size, 128 = 1024 px) unless it is there, then runs `trt-dm engine` on it with a small calibration set (4 prompts' trajectories, DDIM 10,
guidance 7.5) and engine profiles for 1..4 images (2..8 UNet rows). The stage table (wall time and peak
resident memory per stage, `<dir>/engines/<arch>-*.stages.json`) and the log go to reports/scale/<arch>/. Needs
about 13 GB of disk; on a 24 GB machine pass `-- --precision fp32 --no-layer-comparison` (the FP16 conversion
and the layer comparison are refused there, with the numbers: see docs/text-to-image.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--dir", type=Path, default=None, help="default /tmp/<arch>-scale")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sample-size", type=int, default=None, help="sdxl: latent size (default 128: 1024 px)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more `trt-dm engine` arguments (after --)")
    args = p.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    args.dir = args.dir or Path(f"/tmp/{args.arch}-scale")
    model, out = args.dir / args.arch, ROOT / "reports" / "scale" / args.arch
    if not (model / "model_index.json").exists():
        from trt_dm.models.builders import write_sd15_layout_pipeline, write_sdxl_layout_pipeline
        t0 = time.perf_counter()
        if args.arch == "sdxl":
            write_sdxl_layout_pipeline(model, sample_size=args.sample_size or 128)
        else:
            write_sd15_layout_pipeline(model)
        print(f"wrote {model} in {time.perf_counter() - t0:.0f} s")
    cmd = [str(ROOT / ".venv" / "bin" / "trt-dm"), "engine", "--model", str(model), "--out-dir",
           str(args.dir / "engines"), "--cache-dir", str(args.dir / "cache"), "--calib-n", "4", "--calib-steps", "10",
           "--batch", "4", "--threads", str(args.threads), "--min-batch", "1", "--opt-batch", "1", "--max-batch", "4",
           "--recipe", "ptq4dm",  # 4 prompts cannot fill 4 timestep groups
           "--no-progress", *extra]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:  # (peaks per stage come from the stage table: /usr/bin/time's maximum
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)  # is reset with them at each stage)
    stages = sorted((args.dir / "engines").glob(f"{args.arch}-*.stages.json"))
    summary = {"command": " ".join(cmd[1:]), "exit": rc, "wall_seconds": round(time.perf_counter() - t0, 1),
               "stages": json.loads(stages[-1].read_text()) if stages else None}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
