"""(Re)generate the cached Fashion-MNIST reference features and print the FD-EffNet anchors.

    python tools/reference_stats.py                          # test (10k) and train (60k), cached
    python tools/reference_stats.py --train-limit 10000 --threads 1
    python tools/reference_stats.py --split test --force     # recompute the test features only

Features are EfficientNet-Lite0 pooled features (trt_dm.evaluate.EffNetFeatures); the distance is
FD-EffNet, not FID. Anchors printed:
  * floor: train split vs test split (what a perfect generator of Fashion-MNIST would score, up to
    the sample-size bias), when both splits are selected;
  * noise: Gaussian noise images (seeded, clipped to [-1, 1]) vs the test split.
The cache folder is --cache-dir, else $TRT_DM_CACHE/reference, else ~/.cache/trt_dm/reference.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trt_dm.eval import metrics as evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("test", "train", "both"), default="both", help="splits to build or load")
    p.add_argument("--limit", type=int, default=None, help="first N images of each split (default: all)")
    p.add_argument("--train-limit", type=int, default=None, help="override --limit for the train split")
    p.add_argument("--force", action="store_true", help="recompute even if cached")
    p.add_argument("--noise", type=int, default=2000, help="number of noise images for the noise anchor")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--floor-n", type=int, default=None,
                   help="compare only the first N train images in the floor anchor (match your sample size)")
    p.add_argument("--json", type=Path, default=None, help="also write the anchors to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    net = evaluate.EffNetFeatures()
    print(f"extractor: {net.identity}  cache: {evaluate.reference_cache_dir(args.cache_dir)}  "
          f"threads: {torch.get_num_threads()}")
    splits = ("test", "train") if args.split == "both" else (args.split,)
    feats = {}
    for split in splits:
        limit = args.train_limit if (split == "train" and args.train_limit is not None) else args.limit
        t0 = time.perf_counter()
        feats[split] = evaluate.reference_features(split, net, args.cache_dir, limit, force=args.force,
                                                   batch_size=args.batch_size, disable=args.quiet or None)
        print(f"{split}: {feats[split].shape[0]} images -> features {feats[split].shape} "
              f"in {time.perf_counter() - t0:.1f} s")

    anchors = {"extractor": net.identity}

    def kid_of(a, b):
        mean, std = evaluate.kid(a, b, subset_size=min(1000, len(a), len(b)))
        return {"kid_mean": mean, "kid_std": std}

    if "test" in feats and "train" in feats:
        train = feats["train"][:args.floor_n] if args.floor_n else feats["train"]
        fd = evaluate.frechet_distance(train, feats["test"])
        anchors["floor"] = {"fd": fd, "n": len(train), "reference_n": len(feats["test"]), **kid_of(train, feats["test"])}
        print(f"FD-EffNet floor   train ({len(train)}) vs test ({feats['test'].shape[0]}): {fd:.4f}  "
              f"KID {anchors['floor']['kid_mean'] * 1e3:.3f}e-3")
    if "test" in feats and args.noise > 0:
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(args.noise, 1, 32, 32, generator=g).clamp(-1, 1)
        t0 = time.perf_counter()
        noise_feats = evaluate.extract_features(noise, net, batch_size=args.batch_size,
                                                disable=args.quiet or None)
        fd = evaluate.frechet_distance(noise_feats, feats["test"])
        anchors["noise"] = {"fd": fd, "n": args.noise, "seed": args.seed, **kid_of(noise_feats, feats["test"])}
        print(f"FD-EffNet noise   N(0,1) clipped, seed {args.seed} ({args.noise}) vs test "
              f"({feats['test'].shape[0]}): {fd:.4f}  KID {anchors['noise']['kid_mean'] * 1e3:.3f}e-3  "
              f"(noise features {time.perf_counter() - t0:.1f} s)")
    if args.json:
        import json
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(anchors, indent=2) + "\n")


if __name__ == "__main__":
    main()
