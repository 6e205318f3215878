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


def _draw(args, loaded, runners):
    """Sample with one runner, or with K runners switched by timestep (engines of a groups=K recipe)."""
    import contextlib

    from .runners import as_denoiser, switched_denoiser
    from .sampling import Schedule, sample_many
    if loaded.kind != "UNet2DModel":
        raise SystemExit(f"error: sampling {loaded.kind} needs conditioning inputs, which `trt-dm sample` "
                         "does not provide yet; unconditional UNet2DModel only")
    _positive("n", args.n)
    _positive("steps", args.steps)
    _positive("batch", args.batch)
    runners, t_ranges = runners if isinstance(runners, tuple) else ([runners], None)
    schedule = Schedule.from_config(loaded.scheduler_config)
    seeds = range(args.seed, args.seed + args.n)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for r in runners:
            stack.enter_context(r)
        denoiser = (switched_denoiser([as_denoiser(r) for r in runners], t_ranges) if t_ranges
                    else as_denoiser(runners[0]))
        images = sample_many(denoiser, schedule, seeds, loaded.sample_shape, batch_size=args.batch,
                             sampler=args.sampler, steps=args.steps, eta=args.eta,
                             progress=not args.no_progress, device=runners[0].device)
    return images, time.perf_counter() - t0


def _runner(args, loaded):
    """A runner, or for several --engine plans (one per timestep group) a (runners, t_ranges) pair."""
    from .engine import load_sidecar
    from .runners import OrtRunner, TorchRunner, TrtRunner
    if getattr(args, "engine", None):
        runners = [TrtRunner(p, cuda_graph=args.cuda_graph) for p in args.engine]
        if len(runners) == 1:
            return runners[0]
        ranges = [load_sidecar(p).get("t_range") for p in args.engine]
        if any(r is None for r in ranges):
            raise ValueError("several --engine plans must be the timestep groups of one groups=K recipe "
                             "(their sidecars carry t_range); got plans without one")
        return runners, [tuple(r) for r in ranges]
    if getattr(args, "onnx", None):
        if not Path(args.onnx).is_file():
            raise FileNotFoundError(f"--onnx {args.onnx}: no such file")
        return OrtRunner(args.onnx, threads=args.threads)
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


def _fp_samples(args, loaded):
    """FP samples for (model, sampler, steps, eta, seeds), cached so that every recipe row of a
    comparison reuses the same FP images instead of sampling them again."""
    from safetensors.torch import load_file

    from .images import save_samples
    path = (Path(args.cache_dir) / loaded.fingerprint()[:16] / "samples" /
            f"{args.sampler}{args.steps}-eta{args.eta:g}-s{args.seed}-n{args.n}.safetensors")
    if path.exists():
        log.info("reusing FP samples %s", path)
        return load_file(str(path))["samples"], 0.0
    images, secs = _draw(args, loaded, _runner(args, loaded))
    save_samples(images, path, {"sampler": args.sampler, "steps": str(args.steps), "seed": str(args.seed)})
    return images, secs


def cmd_eval(args) -> int:
    from . import evaluate
    from .images import save_grid
    # Everything that can fail on bad input is checked before the (long) sampling run.
    if args.inception_weights:
        extractor, label = evaluate.InceptionFeatures(args.inception_weights), "FID (Inception)"
    else:
        extractor, label = evaluate.get_extractor("effnet"), "FD-EffNet"
    if args.recipe and args.onnx:
        raise ValueError("--recipe evaluates the torch fake-quant model, --onnx an exported graph: give one")
    if args.onnx and not Path(args.onnx).is_file():
        raise FileNotFoundError(f"--onnx {args.onnx}: no such file")
    if args.recipe:
        from .calib.ranges import get_recipe
        get_recipe(args.recipe)
    loaded = _load(args)
    disable = True if args.no_progress else None
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = evaluate.reference_features(args.ref, extractor, limit=args.ref_limit, disable=disable)
    kid_size = min(1000, args.n, len(ref))
    result = {"model": str(loaded.source), "fingerprint": loaded.fingerprint(), "sampler": args.sampler,
              "steps": args.steps, "eta": args.eta, "n": args.n, "seed": args.seed,
              "reference": f"fashion-mnist-{args.ref}", "reference_n": len(ref), "metric": label,
              "kid_subset_size": kid_size, "threads": torch.get_num_threads()}

    def score(images, prefix: str) -> None:
        feats = evaluate.extract_features(images, extractor, disable=disable)
        result[f"{prefix}fd"] = evaluate.frechet_distance(feats, ref)
        result[f"{prefix}kid_mean"], result[f"{prefix}kid_std"] = evaluate.kid(feats, ref, subset_size=kid_size)

    if not args.recipe and not args.onnx:
        images, secs = _fp_samples(args, loaded)
        result["sampling_seconds"] = round(secs, 1)
        score(images, "")
        line = f"{label}: {result['fd']:.3f}   KID: {result['kid_mean'] * 1e3:.3f} ± {result['kid_std'] * 1e3:.3f} (x1e-3)"
    else:  # a quantized model (fake-quant from --recipe, or an exported --onnx graph) against FP, same seeds
        import contextlib

        from .calibrate import fake_quant_unet, grouped_denoiser
        from .runners import OrtRunner, TorchRunner, as_denoiser
        from .sampling import Schedule, sample_many
        fp_images, _ = _fp_samples(args, loaded)
        with contextlib.ExitStack() as stack:
            if args.onnx:
                test = as_denoiser(stack.enter_context(OrtRunner(args.onnx, threads=args.threads)))
                result.update({"onnx": str(args.onnx), "recipe": args.recipe})
            else:
                calib, qcfg = _calibration(args, loaded, args.recipe, progress=not args.no_progress)
                qunet = fake_quant_unet(loaded, qcfg, calib.ranges, fold_weights=True)
                grouped = any(isinstance(v, list) for v in calib.ranges.values())
                q_runner = stack.enter_context(TorchRunner(qunet, device="cpu", dtype=torch.float32, name="fakequant"))
                test = grouped_denoiser(qunet, calib.ranges) if grouped else as_denoiser(q_runner)
                result.update({"recipe": args.recipe, "ranges": str(calib.ranges_path), "weight_bits": args.weight_bits,
                               "weight_calib": args.weight_calib, "shortcut_split": args.shortcut_split,
                               "calibration": args.timesteps, "calib_n": args.calib_n})
            fp_runner = stack.enter_context(TorchRunner(loaded.unet, device=args.device))
            schedule = Schedule.from_config(loaded.scheduler_config)
            t0 = time.perf_counter()
            images = sample_many(test, schedule, range(args.seed, args.seed + args.n), loaded.sample_shape,
                                 batch_size=args.batch, sampler=args.sampler, steps=args.steps, eta=args.eta,
                                 progress=not args.no_progress)
            result["sampling_seconds"] = round(time.perf_counter() - t0, 1)
            n_eps = min(args.n, args.eps_n)
            cmp = evaluate.compare_denoisers(as_denoiser(fp_runner), test, schedule,
                                             range(args.seed, args.seed + n_eps), loaded.sample_shape,
                                             sampler=args.sampler, steps=args.steps, eta=args.eta,
                                             batch_size=args.batch, progress=not args.no_progress)
        score(images, "")
        score(fp_images, "fp_")
        result.update({"psnr_vs_fp": evaluate.psnr(fp_images, images), "eps_n": n_eps, "eps": cmp["eps"]})
        result["fd_change_vs_fp_pct"] = 100 * (result["fd"] - result["fp_fd"]) / result["fp_fd"]
        line = (f"{label}: {result['fd']:.3f} (FP {result['fp_fd']:.3f}, {result['fd_change_vs_fp_pct']:+.1f}%)   "
                f"PSNR vs FP: {result['psnr_vs_fp']:.2f} dB   eps MSE {cmp['eps']['mse']:.2e} cos {cmp['eps']['cosine']:.5f}   "
                f"KID: {result['kid_mean'] * 1e3:.3f} (x1e-3)")
    save_grid(images[:64], out_dir / "grid.png")
    tmp = out_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / "result.json")
    print(f"{line}   N={args.n} {args.sampler}-{args.steps} vs Fashion-MNIST {args.ref}   -> {out_dir}")
    return 0


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timesteps", default="ndtc",
                   help="calibration timestep sampler: ndtc[:mu,sigma] (PTQ4DM; default mu=0.5, sigma=0.35), "
                        "uniform, single[:step], all")
    p.add_argument("--calib-n", type=int, default=256, help="calibration samples (PTQ4DM used 1024)")
    p.add_argument("--calib-sampler", default="ddim", help="FP sampler whose trajectories are recorded")
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--weight-bits", type=int, default=8, choices=(8, 4), help="4 = W4A8 fake-quant study")
    p.add_argument("--weight-calib", default="max", choices=("max", "mse"),
                   help="weight ranges per output channel: max = abs-max; mse = ModelOpt's data-free search for the "
                        "clip with the least squared weight error (matters for --weight-bits 4)")
    p.add_argument("--shortcut-split", action="store_true",
                   help="Q-Diffusion's split: separate ranges for the h / skip halves of up-path concatenations "
                        "(fake-quant only)")
    p.add_argument("--quantize-attention", action="store_true", help="also quantize the attention matmul inputs")
    p.add_argument("--exclude", nargs="*", default=None,
                   help="layer name patterns kept in high precision (default: trt_dm.quant.DEFAULT_EXCLUDE)")
    p.add_argument("--cache-dir", default="calib_cache")


def _calib_spec(args):
    from .calib.timesteps import parse
    from .calib.trajectories import CalibSpec
    return CalibSpec(parse(args.timesteps), n=args.calib_n, sampler=args.calib_sampler, steps=args.calib_steps,
                     seed=args.calib_seed)


def _quant_config(args):
    from .quant import DEFAULT_EXCLUDE, QuantConfig
    return QuantConfig(weight_bits=args.weight_bits, weight_calib=args.weight_calib,
                       shortcut_split=args.shortcut_split, quantize_attention=args.quantize_attention,
                       exclude=tuple(args.exclude) if args.exclude is not None else DEFAULT_EXCLUDE)


def _calibration(args, loaded, recipe: str, progress: bool):
    from .calibrate import calibrate
    qcfg = _quant_config(args)
    return calibrate(loaded, _calib_spec(args), qcfg, recipe, cache_root=Path(args.cache_dir), batch_size=args.batch,
                     progress=progress), qcfg


def cmd_calibrate(args) -> int:
    import statistics
    loaded = _load(args)
    if args.sensitivity:
        import fnmatch

        from .calibrate import layer_sensitivity
        from .quant import DEFAULT_EXCLUDE
        rows = layer_sensitivity(loaded, _calib_spec(args), args.recipe, cache_root=Path(args.cache_dir), weight_bits=args.weight_bits,
                                 batch_size=args.batch, progress=not args.no_progress)
        print(f"per-layer sensitivity (W{args.weight_bits}A8, recipe {args.recipe}, one layer quantized at a time; "
              "relative MSE of the predicted noise vs FP):")
        print(f"{'layer':48s} {'type':8s} {'rel MSE':>10s}  default")
        for r in rows:
            ex = "excluded" if any(fnmatch.fnmatchcase(r["layer"], p) for p in DEFAULT_EXCLUDE) else ""
            print(f"{r['layer']:48s} {r['type']:8s} {r['rel_mse']:10.3e}  {ex}")
        return 0
    res, _ = _calibration(args, loaded, args.recipe, progress=not args.no_progress)
    vals = [g["amax"] for v in res.ranges.values() for g in (v if isinstance(v, list) else [{"amax": v}])]
    print(f"recipe {args.recipe}: {len(res.ranges)} quantized layers (activation ranges), amax min "
          f"{min(vals):.4g} / median {statistics.median(vals):.4g} / max {max(vals):.4g}")
    if res.stats_reused:
        print(f"statistics: reused from cache {res.stats_dir}")
    else:
        print(f"statistics: collected in {res.seconds_collect:.1f} s ({res.seconds_trajectories:.1f} s FP "
              f"trajectories, {res.unet_calls} UNet batch calls) -> {res.stats_dir}")
    print(f"ranges: computed in {res.seconds_ranges:.2f} s -> {res.ranges_path}")
    return 0


def _exported(args, loaded, progress=print):
    """calibrate (cached) -> checked Q/DQ ONNX: the shared first half of `export` and `engine`."""
    from .deploy import check_target, export_checked
    check_target(_quant_config(args), args.recipe, args.target)  # before calibrating: no work on what can't export
    res, qcfg = _calibration(args, loaded, args.recipe, progress=not args.no_progress)
    how = ("reused from cache" if res.stats_reused else
           f"collected in {res.seconds_collect:.1f} s: FP trajectories {res.seconds_trajectories:.1f} s + statistics "
           f"pass {res.seconds_collect - res.seconds_trajectories:.1f} s")
    progress(f"calibration: recipe {args.recipe}, {len(res.ranges)} activation ranges -> {res.ranges_path} "
             f"(statistics {how})")
    if args.target == "ort-cpu":
        from .deploy import export_ort_cpu
        return export_ort_cpu(loaded, qcfg, res, args.recipe, _calib_spec(args), Path(args.out_dir),
                              batch_size=args.batch, ops=args.ort_ops, progress=progress)
    return export_checked(loaded, qcfg, res, args.recipe, Path(args.out_dir), precision=args.precision,
                          progress=progress)


def cmd_export(args) -> int:
    loaded = _load(args)
    _exported(args, loaded)
    return 0


def _build_options(args):
    from .engine import BuildOptions
    return BuildOptions(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                        opt_level=args.opt_level, timing_cache=args.timing_cache,
                        rtx_targets=tuple(args.rtx_targets))


def cmd_build(args) -> int:
    from .deploy import ExportedModel, build_all
    path = Path(args.onnx)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    report_path = Path(f"{path}.json")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    build_all([ExportedModel(path, report)], _build_options(args), flavour=args.flavour)
    return 0


def cmd_engine(args) -> int:
    """make engine: calibrate (cached) -> export -> check -> build (TensorRT, else TensorRT-RTX, else stop)."""
    from .deploy import build_all, export_baseline
    from .engine import EngineError, trt_module
    t0 = time.perf_counter()
    loaded = _load(args)
    print(f"model {loaded.name} ({loaded.kind}, {loaded.source}); fingerprint {loaded.fingerprint()[:16]}")
    models = _exported(args, loaded)
    if args.target == "ort-cpu":
        print(f"done in {time.perf_counter() - t0:.0f} s; sample on CPU with: trt-dm sample --onnx {models}")
        return 0
    if not args.no_baseline:
        base = export_baseline(loaded, Path(args.out_dir), precision=args.precision)
        print(f"  {base.onnx}: unquantized baseline, checked")
        models.append(base)
    try:
        _, flavour = trt_module(args.flavour)
    except EngineError as e:
        print(f"stopping after the checked ONNX: {e}")
        return 0
    build_all(models, _build_options(args), flavour=flavour)
    print(f"done in {time.perf_counter() - t0:.0f} s; sample with: trt-dm sample --engine "
          f"{' '.join(str(m.onnx.with_suffix('.plan')) for m in models if m.report.get('recipe'))} (needs a GPU)")
    return 0


def cmd_profile(args) -> int:
    from .profile import profile, write_report
    results = []
    for arch in args.arch or ["default"]:
        print(f"profiling {arch} ({args.threads} threads)")
        results.append(profile(arch, args.batches, threads=args.threads, steps=args.steps, warmup=args.warmup,
                               iters=args.iters, runners=args.runners, engines=args.engine))
    paths = write_report(results, Path(args.out_dir))
    print(paths["md"].read_text())
    print("->", ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_check(args) -> int:
    import onnx
    from .export import check_qdq
    if not Path(args.onnx).is_file():
        raise FileNotFoundError(f"{args.onnx}: no such file")
    onnx.checker.check_model(args.onnx)
    rep = check_qdq(args.onnx)
    print(f"{args.onnx}: ONNX checker OK; {rep.quantize} Q / {rep.dequantize} DQ, {rep.per_channel} per-channel")
    for v in rep.violations:
        print(f"  violation: {v}")
    return 0 if rep.ok else 1


def cmd_info(args) -> int:
    loaded = _load(args)
    n_params = sum(p.numel() for p in loaded.unet.parameters())
    print(json.dumps({"name": loaded.name, "kind": loaded.kind, "source": str(loaded.source),
                      "parameters": n_params, "fingerprint": loaded.fingerprint(),
                      "scheduler_source": loaded.scheduler_source,
                      "inputs": [dict(name=i.name, shape=list(i.shape), dtype=str(i.dtype)) for i in loaded.inputs]},
                     indent=2))
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="ptq4dm", help="calibration recipe (see `trt-dm calibrate --help`)")
    p.add_argument("--target", choices=("tensorrt", "ort-cpu"), default="tensorrt",
                   help="tensorrt: symmetric Q/DQ on layer inputs (TensorRT / TensorRT-RTX); ort-cpu: ONNX "
                        "Runtime's fast int8 CPU layout (uint8 activations, Q/DQ around inputs and outputs)")
    p.add_argument("--ort-ops", choices=("layers", "all"), default="layers",
                   help="ort-cpu: quantize the recipe's Conv/Linear layers only (as TensorRT; default), or every "
                        "operator ONNX Runtime can (SiLU, residual adds, concat, softmax too): a study option, "
                        "measured no faster here and less accurate (see README)")
    p.add_argument("--out-dir", default="engines", help="where ONNX files, reports and engines go")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                   help="precision of the non-quantized math in the deployed graph (fp16 for strongly typed "
                        "TensorRT; the fp32 Q/DQ graph is always written too)")
    p.add_argument("--batch", type=int, default=64, help="images per UNet call during calibration")
    p.add_argument("--no-progress", action="store_true")
    _calib_args(p)


def _build_args(p: argparse.ArgumentParser) -> None:
    from .engine import BuildOptions
    d = BuildOptions()
    p.add_argument("--flavour", choices=("tensorrt", "tensorrt_rtx"), default=None,
                   help="TensorRT package to build with (default: tensorrt if importable, else tensorrt_rtx)")
    p.add_argument("--min-batch", type=int, default=d.min_batch)
    p.add_argument("--opt-batch", type=int, default=d.opt_batch)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--opt-level", type=int, default=d.opt_level, help="builder optimization level 0..5")
    p.add_argument("--timing-cache", default="engines/timing.cache", help="TensorRT timing cache file (not RTX)")
    p.add_argument("--rtx-targets", nargs="+", default=list(d.rtx_targets),
                   help="TensorRT-RTX compute-capability targets, e.g. SM86 SM89 SM120")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trt-dm", description="Post-training int8 quantization for "
                                     "diffusion UNets (PTQ4DM), deployed as TensorRT engines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO) and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="draw images and write a grid")
    _add_model_args(p)
    _add_sampling_args(p, steps=50, n=64)
    p.add_argument("--out", default="grid.png", help="grid image path (.png/.jpg)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square)")
    p.add_argument("--save-samples", default=None, help="also write raw samples to this .safetensors file")
    p.add_argument("--onnx", default=None, help="run this exported ONNX UNet in ONNX Runtime (CPU) instead of torch; "
                   "--model still supplies the noise schedule and image shape")
    p.add_argument("--engine", nargs="+", default=None,
                   help="run this TensorRT / TensorRT-RTX engine (GPU); K plans of a groups=K recipe are "
                        "switched by timestep")
    p.add_argument("--cuda-graph", action="store_true", help="with --engine: replay the engine call as a CUDA graph")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="FD-EffNet and KID of samples against Fashion-MNIST")
    _add_model_args(p)
    _add_sampling_args(p, steps=100, n=2000)
    p.add_argument("--ref", choices=("test", "train"), default="test", help="reference split")
    p.add_argument("--ref-limit", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--inception-weights", default=None,
                   help="local pytorch-fid Inception weights (.pth): report standard FID instead of FD-EffNet")
    p.add_argument("--out-dir", default="reports/eval", help="where result.json and grid.png go")
    p.add_argument("--recipe", default=None,
                   help="evaluate the fake-quant model calibrated with this recipe against FP (same seeds)")
    p.add_argument("--onnx", default=None,
                   help="evaluate this exported ONNX graph in ONNX Runtime (e.g. the ort-cpu int8 target) against FP")
    p.add_argument("--eps-n", type=int, default=256,
                   help="images whose per-timestep noise-prediction error is measured (recipe runs)")
    _calib_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="timestep-stratified calibration (PTQ4DM): statistics once, ranges per recipe")
    _add_model_args(p)
    p.add_argument("--recipe", default="ptq4dm",
                   help="preset (ptq4dm, qdiffusion, max, percentile, entropy, minmean, meanmax, ptq4dm-g4) "
                        "or METRIC@MERGE, e.g. mse:2.4@pooled, percentile:99.9@uniform, max@groups=4")
    p.add_argument("--batch", type=int, default=64, help="images per UNet call")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sensitivity", action="store_true",
                   help="print the per-layer sensitivity report (decides the default exclusion list)")
    _calib_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="calibrate (cached) and export the fake-quant UNet to Q/DQ ONNX, checked")
    _add_model_args(p)
    _export_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="build a TensorRT / TensorRT-RTX engine (+ sidecar) from an exported ONNX")
    p.add_argument("onnx")
    _build_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("engine", help="calibrate -> export -> check -> build (what `make engine` runs)")
    _add_model_args(p)
    _export_args(p)
    _build_args(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the unquantized FP16 baseline engine")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("profile", help="latency / throughput / memory of every runner available here")
    p.add_argument("--arch", action="append", default=None,
                   help="default (embedded model), ddpm-cifar10 (35.7 M), sd15-unet (860 M); repeatable")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampling run (0: skip it)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--runners", nargs="*", default=None, help="only these runners (names as in the report)")
    p.add_argument("--engine", nargs="*", default=[], help="TensorRT engines to time too (GPU)")
    p.add_argument("--out-dir", default="reports/profile")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("check", help="check a Q/DQ ONNX file against TensorRT's explicit-quantization rules")
    p.add_argument("onnx")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("info", help="describe a model: class, parameters, inputs, fingerprint")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings
    warnings.filterwarnings("ignore", message="Cannot find transformers package")  # modelopt, irrelevant here
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .engine import EngineError
    from .models import ModelLoadError
    try:
        return args.func(args)
    except (ModelLoadError, FileNotFoundError, ValueError, EngineError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
