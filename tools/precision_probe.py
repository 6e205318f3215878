"""Where int8 precision is lost under classifier-free guidance (docs/quality.md, issue #12): two studies of the
fake-quant model that `trt-dm calibrate --sensitivity blocks` does not run.

    python tools/precision_probe.py channels   # per layer of the top blocks: its activations alone in FP;
                                               # and per-channel activation ranges in those blocks (an upper bound)
    python tools/precision_probe.py timesteps  # the --keep-fp layers in FP only at some steps: PSNR vs FP

Both on `default-cond`, guidance 3, recipe `ptq4dm-g4` unless told otherwise; the relative MSE is that of the
guided prediction vs FP on 64 held-out calibration samples, as in the block report. Deterministic on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from trt_dm import api
from trt_dm.core.guidance import cfg_denoiser
from trt_dm.core.ranges import group_index
from trt_dm.eval.metrics import psnr
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.calibrate import calibrate, fp_calibration_set
from trt_dm.quant.config import DEFAULT_EXCLUDE, QuantConfig
from trt_dm.quant.fakequant import fake_quant_unet, grouped_denoiser
from trt_dm.quant.modules import apply_ranges
from trt_dm.quant.sensitivity import block_of
from trt_dm.runtime.base import switched_denoiser

TOP = ("down_blocks.0.resnets.0", "up_blocks.2.resnets.0", "up_blocks.2.resnets.1")
FIRST_RESOLUTION = ("down_blocks.0.*", "up_blocks.2.*")


def quantized(loaded, spec: CalibSpec, recipe: str, keep_fp: tuple[str, ...] = ()):
    qcfg = QuantConfig(exclude=DEFAULT_EXCLUDE + keep_fp)
    res = calibrate(loaded, spec, qcfg, recipe, progress=False)
    qunet = fake_quant_unet(loaded, qcfg, res.ranges)
    return qunet, res.ranges


def as_denoiser(qunet, ranges):
    if ranges.is_grouped:
        return grouped_denoiser(qunet, ranges)  # each row with its timestep group's ranges
    return lambda x, t, **c: qunet(x, t, **c).sample


def channels(loaded, spec: CalibSpec, recipe: str, blocks: tuple[str, ...]) -> None:
    qunet, ranges = quantized(loaded, spec, recipe)
    calib, guidance = fp_calibration_set(loaded, dataclasses.replace(spec, n=64, seed=spec.seed + 1), progress=False)
    groups = (group_index(calib.t, ranges.t_ranges) if ranges.is_grouped
              else torch.zeros(len(calib.t), dtype=torch.int64))
    mods = dict(qunet.named_modules())
    layers = [n for n, m in mods.items() if hasattr(m, "input_quantizer") and m.input_quantizer.is_enabled
              and block_of(n) in blocks]
    fp_mods = dict(loaded.unet.named_modules())
    convs = [n for n in layers if isinstance(fp_mods[n], torch.nn.Conv2d)]

    def predict(fn, rows) -> torch.Tensor:
        with torch.no_grad():
            cond = {c: v[rows] for c, v in calib.cond.items()}
            return cfg_denoiser(fn, guidance)(calib.x[rows], calib.t[rows], **cond)

    def set_amax(name: str, amax: torch.Tensor) -> None:
        q = mods[name].input_quantizer
        del q._amax  # modelopt refuses a change of shape through the amax setter
        q.register_buffer("_amax", amax.clone())

    def rel(disabled=(), channel_amax=None) -> float:
        """Guided rel. MSE vs FP with ``disabled`` layers' activations in FP, or with per-channel input ranges."""
        out = torch.empty_like(calib.x)
        for k in torch.unique(groups).tolist():
            rows = groups == k
            apply_ranges(qunet, ranges.amax(k))  # with every quantizer enabled: it checks the names
            for n in disabled:
                mods[n].input_quantizer.disable()
            for n, a in (channel_amax or {}).items():
                set_amax(n, torch.minimum(a, torch.tensor(ranges.amax(k)[n])).reshape(1, -1, 1, 1))
            try:
                out[rows] = predict(lambda x, t, **c: qunet(x, t, **c).sample, rows)
            finally:
                for n in disabled:
                    mods[n].input_quantizer.enable()
                for n in channel_amax or {}:
                    set_amax(n, torch.tensor(ranges.amax(k)[n]))
        return float((out - ref).double().square().mean() / ref.double().square().mean())

    everything = torch.ones(len(calib.t), dtype=torch.bool)
    ref = predict(lambda x, t, **c: loaded.unet(x, t, **c).sample, everything)
    full = rel()
    print(f"recipe {recipe}, guidance {guidance.scale:g}: guided rel. MSE vs FP {full:.3e}; each layer's activations "
          "alone in FP:")
    for n in layers:
        e = rel(disabled=(n,))
        print(f"  {n:45s} {e:.3e}  removed {1 - e / full:6.1%}")
    # each input channel its own range: its abs-max on these samples, clipped at the layer's per-tensor range
    # (where the recipe clips). TensorRT's int8 convolutions take one activation scale per tensor: this is an
    # upper bound for moving range differences between channels into the weights (SmoothQuant's migration).
    seen: dict[str, torch.Tensor] = {}

    def observe(name):
        return lambda mod, inp: seen.__setitem__(name, torch.maximum(seen.get(name, torch.zeros(())),
                                                                     inp[0].detach().abs().amax(dim=(0, 2, 3))))

    hooks = [fp_mods[n].register_forward_pre_hook(observe(n)) for n in convs]
    predict(lambda x, t, **c: loaded.unet(x, t, **c).sample, everything)
    for h in hooks:
        h.remove()
    e = rel(channel_amax=seen)
    print(f"per-channel activation ranges in the {len(convs)} convolutions of {', '.join(blocks)}: {e:.3e}  "
          f"removed {1 - e / full:6.1%}")


def timesteps(loaded, spec: CalibSpec, recipe: str, keep_fp: tuple[str, ...], splits: list[int], n: int) -> None:
    settings = api.SampleSettings(sampler="ddim", steps=100, n=n, labels="all", guidance_scale=spec.guidance_scale)
    a, ra = quantized(loaded, spec, recipe)
    b, rb = quantized(loaded, spec, recipe, keep_fp)
    int8, kept = as_denoiser(a, ra), as_denoiser(b, rb)

    last = api.schedule(loaded).num_train_timesteps - 1

    def switched(t0: int, above: bool):  # two "timestep groups", (t_max, t_min) each, as group engines are run
        return switched_denoiser([kept, int8] if above else [int8, kept], [(last, t0), (t0 - 1, 0)])

    def draw(fn):
        return api.draw(loaded, api.Denoiser(fn, torch.device("cpu"), {}), settings, progress=False)[0]

    fp = draw(lambda x, t, **c: loaded.unet(x, t, **c).sample)
    print(f"{n} images, DDIM 100, guidance {spec.guidance_scale:g}, recipe {recipe}; {' '.join(keep_fp)} in FP:")
    variants = [("nowhere (int8 everywhere)", int8)]
    variants += [(f"at t >= {s}", switched(s, True)) for s in sorted(splits, reverse=True)]
    variants += [(f"at t < {s}", switched(s, False)) for s in sorted(splits)]
    variants += [("at every step", kept)]
    for name, fn in variants:
        print(f"  {name:26s} PSNR vs FP {psnr(draw(fn), fp):6.2f} dB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=("channels", "timesteps"))
    ap.add_argument("--model", default="default-cond")
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--recipe", default="ptq4dm-g4")
    ap.add_argument("--blocks", nargs="+", default=list(TOP), help="channels: the blocks studied")
    ap.add_argument("--keep-fp", nargs="+", default=list(FIRST_RESOLUTION), help="timesteps: the layers kept in FP")
    ap.add_argument("--splits", nargs="+", type=int, default=[100, 500, 750, 900])
    ap.add_argument("--n", type=int, default=128, help="timesteps: images (seeds 0..n-1, every class in turn)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = api.load(args.model)
    quant = api.QuantSettings(recipe=args.recipe, spec=CalibSpec(guidance_scale=args.guidance_scale))
    spec = quant.resolved(loaded).spec  # every class in turn
    if args.study == "channels":
        channels(loaded, spec, args.recipe, tuple(args.blocks))
    else:
        timesteps(loaded, spec, args.recipe, tuple(args.keep_fp), args.splits, args.n)


if __name__ == "__main__":
    main()
