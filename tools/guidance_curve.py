"""The guidance curve of a class-conditional model: FD-EffNet and class accuracy at each guidance scale.

    python tools/guidance_curve.py --model default-cond --scales 1 1.5 2 3 4 5 --n 1000 --steps 50 \\
        --out reports/guidance/default-cond-interval.json
    python tools/guidance_curve.py ... --interval 0 999          # guidance at every timestep (no interval)
    python tools/guidance_curve.py ... --classifier DIR          # also score with another classifier
    python tools/guidance_curve.py --table A.json B.json [--write models/default-cond/README.md]

Every scale draws the same seeds (seed .. seed + n - 1) with every class in turn (``--classes all``, so each
class n / 10 times), through ``trt_dm.api.evaluate`` (FD-EffNet and KID against the Fashion-MNIST test set, class
accuracy by the project's classifier, FP samples cached like `trt-dm eval`'s). ``--interval``: the guidance
interval (default: the model's own, from its trt_dm.json). ``--classifier DIR``: a second classifier (e.g. one
trained by ``tools/train_classifier.py --seed 1``) scores the same images, with per-class accuracies. Results
are written after each scale (to a temporary name, then renamed), and scales already in the file are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trt_dm import api  # noqa: E402
from trt_dm.eval.classify import load_classifier, predict  # noqa: E402


def _per_class(images: torch.Tensor, labels: torch.Tensor, net) -> tuple[float, list[float]]:
    ok = predict(images, net) == labels
    return float(ok.double().mean()), [round(float(ok[labels == c].double().mean()), 4) for c in range(10)]


def table(files: list[Path], write: Path | None) -> None:
    """The Markdown table of curve files (rows by interval, then scale); printed, or written between the
    ``<!-- guidance-curve:begin/end -->`` markers of ``write``."""
    rows = [r for f in files for r in json.loads(f.read_text())["rows"]]
    other = any("class_accuracy_other" in r for r in rows)
    lines = ["| guidance | applied at | FD-EffNet | class accuracy" + (" | (second classifier)" if other else "") + " |",
             "|---:|---|---:|---:|" + ("---:|" if other else "")]
    def key(r):  # no guidance, then the interval rows, then guidance at every step
        full = r["guidance_interval"] in (None, [0, 999])
        return (0 if r["guidance_scale"] == 1 else 2 if full else 1, r["guidance_scale"])
    for r in sorted(rows, key=key):
        where = ("-" if r["guidance_scale"] == 1 else "every step" if r["guidance_interval"] in (None, [0, 999])
                 else f"t in [{r['guidance_interval'][0]}, {r['guidance_interval'][1]}]")
        lines.append(f"| {r['guidance_scale']:g} | {where} | {r['fd_effnet']:.2f} | {100 * r['class_accuracy']:.1f} %"
                     + (f" | {100 * r['class_accuracy_other']:.1f} %" if other and "class_accuracy_other" in r else
                        " | " if other else "") + " |")
    text = "\n".join(lines) + "\n"
    if write is None:
        print(text, end="")
        return
    doc = write.read_text()
    a, b = "<!-- guidance-curve:begin -->\n", "<!-- guidance-curve:end -->"
    i, j = doc.index(a) + len(a), doc.index(b)
    write.write_text(doc[:i] + text + doc[j:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, nargs="+", default=None, help="print (or --write) the table of these files")
    p.add_argument("--write", type=Path, default=None)
    p.add_argument("--model", default="default-cond")
    p.add_argument("--scales", type=float, nargs="+", default=[1, 1.5, 2, 3, 4, 5])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--interval", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--classifier", type=Path, default=None, help="a second classifier directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.table:
        return table(args.table, args.write)
    if args.out is None:
        p.error("--out FILE.json is needed (or --table FILE ...)")
    torch.set_num_threads(args.threads)
    loaded = api.load(args.model)
    own, other = load_classifier(), (load_classifier(args.classifier) if args.classifier else None)
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {"model": args.model, "rows": []}
    done = {r["guidance_scale"] for r in doc["rows"]}
    for w in args.scales:
        if w in done:
            continue
        settings = api.SampleSettings(sampler="ddim", steps=args.steps, n=args.n, seed=args.seed, batch=args.batch,
                                      labels="all", guidance_scale=w,
                                      guidance_interval=tuple(args.interval) if args.interval else None)
        t0 = time.perf_counter()
        res = api.evaluate(loaded, settings, progress=False)
        labels = loaded.conditioning_for(args.n, "all")["class_labels"]
        acc, per_class = _per_class(res.images, labels, own)
        row = {"guidance_scale": w, "guidance_interval": res.guidance_interval, "n": args.n, "steps": args.steps,
               "seed": args.seed, "fd_effnet": round(res.fd, 3), "kid_mean": res.kid_mean,
               "class_accuracy": round(acc, 4), "per_class": per_class, "seconds": round(time.perf_counter() - t0, 1)}
        if other is not None:
            row["class_accuracy_other"], row["per_class_other"] = (round(v, 4) if isinstance(v, float) else v
                                                                   for v in _per_class(res.images, labels, other))
        doc["rows"].append(row)
        doc.update(fingerprint=loaded.fingerprint(), classifier_other=str(args.classifier) if other else None,
                   cpu_threads=args.threads)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, args.out)
        print(f"w={w:g} interval={res.guidance_interval} FD-EffNet={res.fd:.2f} acc={acc:.3f}"
              + (f" acc(other)={row['class_accuracy_other']:.3f}" if other is not None else "")
              + f" ({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
