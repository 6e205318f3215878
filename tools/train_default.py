"""Train the embedded default models: a DDPM on Fashion-MNIST (32x32, 1 channel), unconditional or
class-conditional.

Reproduce with (CPU, 2 threads, bf16 autocast):
    python tools/train_default.py --out models/default --work .train_default --steps 8000
The class-conditional model (`--model default-cond`; classifier-free guidance by label dropout):
    python tools/train_default.py --out models/default-cond --work .train_default_cond --classes 10 \
        --label-dropout 0.1 --no-bf16 --steps 8000
It has num_class_embeds = classes + 1: labels 0..classes-1 are the data's classes, label `classes` is the null
(unconditional) label that replaces a training label with probability --label-dropout (Ho & Salimans 2021,
"Classifier-Free Diffusion Guidance", Algorithm 1); the null label is written to <out>/trt_dm.json.
A class-conditional DiT instead of the UNet (`--arch dit`, DIT_CONFIG; written to <out>/transformer/):
    python tools/train_default.py --arch dit --out models/default-dit --work .train_default_dit --classes 10 \
        --label-dropout 0.15 --steps 16000 --lr-schedule cosine
(measured: 3.7 s per step of 64 images on one busy core of the 2-core EPYC, 2.82 M parameters, 11 MB).

Deterministic for a given seed and thread count; resumable (rerun the same command: it continues from
the newest checkpoint in --work); keeps EMA weights; logs the loss to <work>/loss.csv. The EMA weights
are written in diffusers pipeline layout (unet/ or transformer/, + scheduler/) to --out, with a training record
(train_record.json) that the model card quotes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trt_dm.eval import data  # noqa: E402

# The default model's architecture: 3 resolution levels (32, 16, 8 px), self-attention at 8 px,
# skip connections between the down and up paths (UNet2DModel's own), ~1.1M parameters.
UNET_CONFIG = dict(
    sample_size=32, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=None,
)
# `--arch dit`: a class-conditional DiT (Peebles & Xie 2023) on the same 32 px images: patch 4 (64 tokens), 8 blocks
# of width 128 (4 heads), adaLN-Zero with the class table's extra row as the null label, noise prediction only
# (no learned variance); ~2.8 M parameters, ~11 MB in float32.
DIT_CONFIG = dict(
    sample_size=32, in_channels=1, out_channels=1, patch_size=4, num_layers=8, num_attention_heads=4,
    attention_head_dim=32, norm_num_groups=1,
)
# DDPM (Ho et al. 2020): linear betas 1e-4..0.02 over T=1000, epsilon prediction.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="linear", prediction_type="epsilon", clip_sample=True)


def _atomic_save(tensors: dict, path: Path, as_torch: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if as_torch:
        torch.save(tensors, tmp)
    else:
        save_file(tensors, str(tmp))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/default"))
    p.add_argument("--work", type=Path, default=Path(".train_default"), help="checkpoints and loss log")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay ceiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--classes", type=int, default=0, help="class-conditional with this many classes (0: unconditional)")
    p.add_argument("--arch", choices=("unet", "dit"), default="unet",
                   help="unet: the default models' UNet2DModel; dit: a DiTTransformer2DModel (needs --classes)")
    p.add_argument("--label-dropout", type=float, default=0.1,
                   help="class-conditional: probability of training on the null label instead (for CFG)")
    p.add_argument("--init", type=Path, default=None,
                   help="warm start: a diffusers UNet directory of the same architecture (e.g. models/default-cond/unet) "
                        "whose weights start both the trained and the EMA model; ignored when --work has a checkpoint")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warm-up: constant, or cosine decay to 0 at --steps")
    p.add_argument("--guidance-interval", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="class-conditional: the model's default guidance interval, recorded in trt_dm.json (measure it "
                        "with tools/guidance_curve.py; the model card says why)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (after a checkpoint) once this much wall time has passed in this run")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    x_train, y_train = data.load("train")
    if args.arch == "dit" and not args.classes:
        p.error("--arch dit trains the class-conditional DiT: give --classes N")
    if args.arch == "dit":  # its class table holds the null label after the N classes itself
        cls, config = DiTTransformer2DModel, dict(DIT_CONFIG, num_embeds_ada_norm=args.classes)
    else:
        cls = UNet2DModel
        config = dict(UNET_CONFIG, num_class_embeds=args.classes + 1) if args.classes else dict(UNET_CONFIG)
    if args.classes and not 0 < args.label_dropout < 1:
        p.error(f"--label-dropout must be in (0, 1) for a class-conditional model, got {args.label_dropout}")
    # diffusers' DiT drops labels itself while training (its class embedder's class_dropout_prob 0.1): drop the rest
    # here, so that labels are dropped with probability --label-dropout in all
    inner = 0.1 if args.arch == "dit" else 0.0
    if args.classes and args.label_dropout < inner:
        p.error(f"--label-dropout {args.label_dropout}: a DiT drops {inner} of the labels itself; give >= {inner}")
    own_dropout = 1 - (1 - args.label_dropout) / (1 - inner)
    model = cls(**config)
    ema = cls(**config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_at(s: int) -> float:  # linear warm-up, then constant or cosine decay (Loshchilov & Hutter 2017)
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        if args.lr_schedule == "cosine":
            return args.lr * 0.5 * (1 + math.cos(math.pi * (s - args.warmup) / max(1, args.steps - args.warmup)))
        return args.lr

    step, elapsed = 0, 0.0
    ckpt = args.work / "checkpoint.safetensors"
    if ckpt.exists():  # resume: model, EMA, optimizer, RNG state, step
        state = load_file(str(ckpt))
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
        extra = torch.load(args.work / "checkpoint_extra.pt", weights_only=True)
        opt.load_state_dict(extra["opt"])
        torch.set_rng_state(extra["rng"])
        step, elapsed = int(extra["step"]), float(extra["elapsed"])
        print(f"resumed from step {step}")
    elif args.init is not None:  # warm start: same architecture, weights only (optimizer and EMA start afresh)
        init = cls.from_pretrained(args.init)
        try:
            model.load_state_dict(init.state_dict())  # strict: refuses another architecture
        except RuntimeError as e:
            p.error(f"--init {args.init}: not the architecture trained here ({str(e).splitlines()[0]})")
        ema.load_state_dict(init.state_dict())
        print(f"warm start from {args.init}")

    def save_checkpoint() -> None:
        tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()})
        _atomic_save({"opt": opt.state_dict(), "rng": torch.get_rng_state(), "step": step,
                      "elapsed": elapsed}, args.work / "checkpoint_extra.pt", as_torch=True)
        _atomic_save(tensors, ckpt)

    n = x_train.shape[0]
    log = open(args.work / "loss.csv", "a")
    if step == 0:
        log.write("step,loss,lr,elapsed_s\n")
    t_run = time.time()
    t_last = t_run
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step")
    while step < args.steps:
        # Batch indices and flips come from the global RNG, restored on resume, so runs are reproducible.
        idx = torch.randint(0, n, (args.batch,))
        x0 = x_train[idx]
        flip = torch.rand(args.batch) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (args.batch,))
        x_t = sched.add_noise(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        cond = {}
        if args.classes:  # the null label (index `classes`) replaces the true label with probability p
            drop = torch.rand(args.batch) < own_dropout
            cond["class_labels"] = torch.where(drop, torch.full_like(y_train[idx], args.classes), y_train[idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            pred = model(x_t, t, **cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        log.write(f"{step},{loss.item():.5f},{lr_at(step - 1):.2e},{elapsed:.1f}\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        out_of_time = args.max_minutes is not None and (now - t_run) > 60 * args.max_minutes
        if step % args.ckpt_every == 0 or step == args.steps or out_of_time:
            log.flush()
            save_checkpoint()
        if out_of_time:
            print(f"stopping at step {step}: --max-minutes reached")
            break
    bar.close()
    log.close()

    # Export the EMA weights in diffusers pipeline layout.
    folder = args.out / ("transformer" if args.arch == "dit" else "unet")
    folder.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(folder, safe_serialization=True)
    sched.save_pretrained(args.out / "scheduler")
    if args.classes:
        (args.out / "trt_dm.json").write_text(json.dumps(
            {"null_class_label": args.classes, "num_classes": args.classes, "label_dropout": args.label_dropout,
             "class_names": list(data.CLASS_NAMES),
             **({"guidance_interval": args.guidance_interval} if args.guidance_interval else {})}, indent=2) + "\n")
    record = dict(arch=args.arch, steps=step, batch=args.batch, classes=args.classes or None,
                  label_dropout=args.label_dropout if args.classes else None, lr=args.lr, warmup=args.warmup,
                  lr_schedule=args.lr_schedule, init=str(args.init) if args.init else None, ema=args.ema,
                  seed=args.seed, threads=args.threads, bf16_autocast=not args.no_bf16,
                  wall_time_s=round(elapsed, 1), params=sum(p.numel() for p in ema.parameters()),
                  final_loss_mean_last_200=None, cpu=platform.processor() or platform.machine(),
                  torch=torch.__version__, data="Fashion-MNIST train (60000), Debian dataset-fashion-mnist")
    losses = [float(l.split(",")[1]) for l in open(args.work / "loss.csv").read().splitlines()[1:]]
    record["final_loss_mean_last_200"] = round(sum(losses[-200:]) / max(1, len(losses[-200:])), 5)
    (args.out / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
