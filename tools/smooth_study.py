"""Channel balancing (``--smooth``) measured: against plain ranges and timestep groups, per block type.

    python tools/smooth_study.py [--model default-dit] [--alphas 0.5 0.8] [--recipes ptq4dm ptq4dm-g4] [--n 64]

For each recipe, the model quantized W8A8 without balancing, with every layer balanced at each alpha, and
with one block type balanced at a time (the first alpha): the relative MSE of the sampler's (guided) prediction
vs FP on held-out calibration trajectories (``trt_dm.quant.sensitivity.LeaveOut``, seed + 1, every class in turn),
overall, at the data end (t < T/10) and at the noisy steps (t >= 0.7 T, where a deviation decides the sampled
image: docs/quality.md). Also, per block type, how uneven its input channels are (max over median
of the per-channel abs-max, the outliers balancing moves into the weights). Writes
reports/sensitivity/smooth-<model>.txt and .json.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# block types of a DiT / PixArt transformer block (diffusers' module names) and its final modulation layer, and of
# a UNet; those a model has none of are left out
TYPES = {"adaLN modulation": ("*.norm1.linear", "proj_out_1"), "attention q/k/v": ("*.attn1.to_q", "*.attn1.to_k",
         "*.attn1.to_v"), "attention out": ("*.attn1.to_out.0",), "MLP in": ("*.ff.net.0.proj",),
         "MLP out": ("*.ff.net.2",), "resnet conv1": ("*.resnets.*.conv1",), "resnet conv2": ("*.resnets.*.conv2",),
         "resnet shortcut": ("*.conv_shortcut",), "up / down samplers": ("*samplers.*",),
         "attention linears": ("*.attentions.*",)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default-dit")
    ap.add_argument("--recipes", nargs="+", default=["ptq4dm", "ptq4dm-g4"])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.8])
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=64, help="held-out trajectories")
    ap.add_argument("--no-types", action="store_true", help="only no balancing and every layer balanced")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trt_dm import api
    from trt_dm.quant.calib import smooth
    from trt_dm.quant.calib.timesteps import parse
    from trt_dm.quant.calib.trajectories import CalibSpec
    from trt_dm.quant.calibrate import calibrate, fp_calibration_set
    from trt_dm.quant.config import QuantConfig
    from trt_dm.quant.fakequant import fake_quant_unet
    from trt_dm.quant.modules import quantize_model, sharing_copy
    from trt_dm.quant.sensitivity import LeaveOut
    loaded = api.load(args.model)
    labels = "all" if loaded.class_labels_spec is not None else None
    spec = CalibSpec(parse("ndtc"), labels=labels, guidance_scale=args.guidance_scale)
    held = dataclasses.replace(spec, n=args.n, seed=spec.seed + 1)
    calib, guidance = fp_calibration_set(loaded, held, progress=False)
    q = quantize_model(sharing_copy(loaded.unet), QuantConfig())
    layers = smooth.smoothed_layers(q)
    types = {k: pats for k, pats in TYPES.items()
             if all(any(fnmatch.fnmatchcase(n, p) for n in layers) for p in pats)}
    configs_types = {} if args.no_types else types
    configs = [("none", 0.0, ())] + [(f"all, alpha {a}", a, ()) for a in args.alphas] + \
              [(f"{kind} only, alpha {args.alphas[0]}", args.alphas[0], pats) for kind, pats in configs_types.items()]
    rows = []
    for recipe in args.recipes:
        for label, alpha, pats in configs:
            t0 = time.perf_counter()
            qcfg = QuantConfig(smooth=alpha, smooth_layers=pats)
            res = calibrate(loaded, spec, qcfg, recipe, progress=False)
            qunet = fake_quant_unet(loaded, qcfg, res.ranges, weights=res.weights_path)
            noisy = calib.t >= int(0.7 * loaded.schedule().num_train_timesteps)  # where sampled images are decided
            err = LeaveOut(loaded, qunet, res.ranges, calib, guidance, qcfg, 64).errors([], rows={"noisy": noisy})
            rows.append({"recipe": recipe, "balanced": label, "alpha": alpha, "layers": list(pats),
                         **{k: err[k] for k in ("rel_mse", "rel_mse_data_end", "rel_mse_noisy")}})
            r = rows[-1]
            print(f"{recipe:10s} {label:38s} rel MSE {r['rel_mse']:.3e}  t < T/10 {r['rel_mse_data_end']:.3e}  "
                  f"t >= 0.7 T {r['rel_mse_noisy']:.3e} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # how uneven each block type's input channels are, on the held-out rows (FP model)
    amax = smooth.channel_absmax(q, layers, calib.unet_batches(64, guidance))
    spread = {}
    for kind, pats in types.items():
        names = smooth.smoothed_layers(q, pats)
        spread[kind] = sorted(float(amax[n].max() / amax[n].median()) for n in names)
    scale = "" if args.guidance_scale == 1 else f"-w{args.guidance_scale:g}"
    out = ROOT / "reports" / "sensitivity" / f"smooth-{args.model}{scale}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "guidance_scale": args.guidance_scale,
                                                    "n": len(calib.t), "rows": rows, "channel_spread": spread},
                                                   indent=1) + "\n")
    lines = [f"model {args.model}, guidance {args.guidance_scale}, {len(calib.t)} held-out rows; relative MSE of the "
             "prediction vs FP", "", "| recipe | balanced | rel. MSE | vs none | t < T/10 | t >= 0.7 T | vs none |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = {r["recipe"]: r["rel_mse"] for r in rows if r["alpha"] == 0}
    base_noisy = {r["recipe"]: r["rel_mse_noisy"] for r in rows if r["alpha"] == 0}
    for r in rows:
        ratio = r["rel_mse"] / base[r["recipe"]]
        lines.append(f"| {r['recipe']} | {r['balanced']} | {r['rel_mse']:.3e} | {ratio:.2f}x | "
                     f"{r['rel_mse_data_end']:.3e} | {r['rel_mse_noisy']:.3e} | "
                     f"{r['rel_mse_noisy'] / base_noisy[r['recipe']]:.2f}x |")
    lines += ["", "channel spread (max / median of the per-channel abs-max of each layer's input; min .. max over "
              "the layers of a type):"]
    lines += [f"- {k}: {min(v):.1f} .. {max(v):.1f}" for k, v in spread.items()]
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
