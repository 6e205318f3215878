"""Train the class-accuracy classifier (``trt_dm.classify.FashionCNN``) on Fashion-MNIST and ship it.

    python tools/train_classifier.py --out models/classifier --epochs 4

Seeded; trains on the 60,000 training images (random horizontal flips, 1-pixel random shifts), keeps the
weights as safetensors (< 2 MB) and writes the test accuracy (10,000 test images) to the model card's
record, ``<out>/config.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trt_dm.eval import data  # noqa: E402
from trt_dm.eval.classify import WEIGHTS, FashionCNN  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/classifier"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = data.load("train")
    xt, yt = data.load("test")
    net = FashionCNN()
    steps = args.epochs * (len(x) // args.batch)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - args.batch + 1, args.batch):
            idx = perm[i:i + args.batch]
            xb = x[idx]
            flip = torch.rand(len(idx)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,)))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        net.eval()
        with torch.no_grad():
            acc = float(torch.cat([net(xt[j:j + 500]).argmax(1) for j in range(0, len(xt), 500)]).eq(yt).double().mean())
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {acc:.4f}, {time.time() - t0:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / WEIGHTS))
    record = {"architecture": "trt_dm.classify.FashionCNN", "num_classes": 10, "class_names": list(data.CLASS_NAMES),
              "params": sum(p.numel() for p in net.parameters()), "epochs": args.epochs, "batch": args.batch,
              "lr": args.lr, "seed": args.seed, "steps": step, "test_accuracy": round(acc, 4),
              "test_images": len(xt), "wall_time_s": round(time.time() - t0, 1), "torch": torch.__version__}
    (args.out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
