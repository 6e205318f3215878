"""The `trt-dm` command.

    trt-dm sample --model default --sampler ddim --steps 50 --n 64 --seed 0 --out grid.png
    trt-dm eval   --model default --steps 100 --n 2000 --out-dir reports/fp-ddim100
    trt-dm info   --model default
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("trt_dm")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (the embedded Fashion-MNIST DDPM), a diffusers UNet directory "
                        "(save_pretrained layout) or a pipeline directory with unet/ and scheduler/")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept weights stored only as PyTorch pickles (.bin); loaded with weights_only=True")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_sampling_args(p: argparse.ArgumentParser, steps: int, n: int) -> None:
    from .sampling import SAMPLERS
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, default=steps, help="number of sampling steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--n", type=int, default=n, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    p.add_argument("--batch", type=int, default=64, help="images per UNet call")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise SystemExit(f"error: --{name} must be >= 1, got {value}")


def _load(args):
    from .models import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, allow_pickle=args.allow_pickle)


def _shape(loaded) -> tuple[int, int, int]:
    cfg = loaded.unet.config
    s = cfg.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return (cfg.in_channels, h, w)


def _draw(args, loaded, runner):
    from .runners import as_denoiser
    from .sampling import Schedule, sample_many
    if loaded.kind != "UNet2DModel":
        raise SystemExit(f"error: sampling {loaded.kind} needs conditioning inputs, which `trt-dm sample` "
                         "does not provide yet; unconditional UNet2DModel only")
    _positive("n", args.n)
    _positive("steps", args.steps)
    _positive("batch", args.batch)
    schedule = Schedule.from_config(loaded.scheduler_config)
    seeds = range(args.seed, args.seed + args.n)
    t0 = time.perf_counter()
    with runner:
        images = sample_many(as_denoiser(runner), schedule, seeds, _shape(loaded), batch_size=args.batch,
                             sampler=args.sampler, steps=args.steps, eta=args.eta,
                             progress=not args.no_progress, device=runner.device)
    return images, time.perf_counter() - t0


def _runner(args, loaded):
    from .runners import TorchRunner
    return TorchRunner(loaded.unet, device=args.device)


def cmd_sample(args) -> int:
    from .images import save_grid, save_samples
    loaded = _load(args)
    images, secs = _draw(args, loaded, _runner(args, loaded))
    grid = save_grid(images, args.out, nrow=args.nrow)
    print(f"{len(images)} images ({args.sampler}, {args.steps} steps, seeds {args.seed}..{args.seed + args.n - 1}) "
          f"in {secs:.1f} s -> {grid}")
    if args.save_samples:
        meta = {"model": str(loaded.source), "sampler": args.sampler, "steps": str(args.steps),
                "eta": str(args.eta), "seed": str(args.seed), "n": str(args.n)}
        print(f"raw samples -> {save_samples(images, args.save_samples, meta)}")
    return 0


def cmd_eval(args) -> int:
    from . import evaluate
    from .images import save_grid
    # Everything that can fail on bad input is checked before the (long) sampling run.
    if args.inception_weights:
        extractor, label = evaluate.InceptionFeatures(args.inception_weights), "FID (Inception)"
    else:
        extractor, label = evaluate.get_extractor("effnet"), "FD-EffNet"
    loaded = _load(args)
    images, secs = _draw(args, loaded, _runner(args, loaded))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(images[:64], out_dir / "grid.png")
    disable = True if args.no_progress else None
    feats = evaluate.extract_features(images, extractor, disable=disable)
    ref = evaluate.reference_features(args.ref, extractor, limit=args.ref_limit, disable=disable)
    fd = evaluate.frechet_distance(feats, ref)
    kid_size = min(1000, len(feats), len(ref))
    kid_mean, kid_std = evaluate.kid(feats, ref, subset_size=kid_size)
    result = {"model": str(loaded.source), "fingerprint": loaded.fingerprint(), "sampler": args.sampler,
              "steps": args.steps, "eta": args.eta, "n": args.n, "seed": args.seed,
              "reference": f"fashion-mnist-{args.ref}", "reference_n": len(ref), "metric": label, "fd": fd,
              "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": kid_size,
              "sampling_seconds": round(secs, 1), "threads": torch.get_num_threads()}
    tmp = out_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / "result.json")
    print(f"{label}: {fd:.3f}   KID: {kid_mean * 1e3:.3f} ± {kid_std * 1e3:.3f} (x1e-3)   "
          f"N={args.n} {args.sampler}-{args.steps} vs Fashion-MNIST {args.ref}   -> {out_dir}")
    return 0


def cmd_info(args) -> int:
    loaded = _load(args)
    n_params = sum(p.numel() for p in loaded.unet.parameters())
    print(json.dumps({"name": loaded.name, "kind": loaded.kind, "source": str(loaded.source),
                      "parameters": n_params, "fingerprint": loaded.fingerprint(),
                      "scheduler_source": loaded.scheduler_source,
                      "inputs": [dict(name=i.name, shape=list(i.shape), dtype=str(i.dtype)) for i in loaded.inputs]},
                     indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trt-dm", description="Post-training int8 quantization for "
                                     "diffusion UNets (PTQ4DM), deployed as TensorRT engines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="draw images and write a grid")
    _add_model_args(p)
    _add_sampling_args(p, steps=50, n=64)
    p.add_argument("--out", default="grid.png", help="grid image path (.png/.jpg)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square)")
    p.add_argument("--save-samples", default=None, help="also write raw samples to this .safetensors file")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="FD-EffNet and KID of samples against Fashion-MNIST")
    _add_model_args(p)
    _add_sampling_args(p, steps=100, n=2000)
    p.add_argument("--ref", choices=("test", "train"), default="test", help="reference split")
    p.add_argument("--ref-limit", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--inception-weights", default=None,
                   help="local pytorch-fid Inception weights (.pth): report standard FID instead of FD-EffNet")
    p.add_argument("--out-dir", default="reports/eval", help="where result.json and grid.png go")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="describe a model: class, parameters, inputs, fingerprint")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from .models import ModelLoadError
    try:
        return args.func(args)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
