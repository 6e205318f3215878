"""The `trt-dm` command: arguments -> the settings of ``trt_dm.api`` -> printed results. No pipeline logic
lives here.

    trt-dm sample --model default --sampler ddim --steps 50 --n 64 --seed 0 --out grid.png
    trt-dm eval   --model default --steps 100 --n 2000 --out-dir reports/fp-ddim100
    trt-dm info   --model default

Exit codes: 0 success; 1 the work failed (a check found violations, an engine does not fit, a damaged cache);
2 a usage error (a bad argument, a model or file that cannot be used as given), reported in one line.
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


class UsageError(ValueError):
    """A bad command line: exit code 2, one line."""


# Distributions whose versions decide results, in `trt-dm --version` (for bug reports); absent ones are skipped.
_VERSIONED = ("torch", "diffusers", "nvidia-modelopt", "onnx", "onnxruntime", "tensorrt", "tensorrt-rtx-cu13",
              "openvino")


class _Version(argparse.Action):
    """``--version``: trt-dm's version and those of the libraries it runs on, one line; exit 0."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="print versions (trt-dm and its libraries) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        from . import __version__
        found = []
        for dist in _VERSIONED:
            try:
                found.append(f"{dist} {version(dist)}")
            except PackageNotFoundError:
                pass
        print(f"trt-dm {__version__} ({', '.join(found)})")  # stdout, as argparse's own version action
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _add_cond_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class-labels", type=int, nargs="+", default=None, metavar="L",
                   help="class-conditional models: the class labels, cycled over the images (image i gets L[i %% len])")
    g.add_argument("--classes", choices=["all"], default=None,
                   help="class-conditional models: every class in turn (calibration defaults to this)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--prompt", nargs="+", default=None, metavar="TEXT",
                   help="text-to-image pipelines: the prompt(s), cycled over the images")
    t.add_argument("--prompts", default=None, metavar="FILE", help="prompts from a file, one per line, cycled")
    t.add_argument("--embeddings", default=None, metavar="FILE",
                   help="precomputed text embeddings (safetensors: prompt_embeds (N, S, D), optionally "
                        "negative_prompt_embeds (1, S, D)), cycled; any text encoder")
    p.add_argument("--negative-prompt", default="", help="the prompt of guidance's unconditional half (default: empty)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance w (1 = none; default 7.5 for text-to-image pipelines, else 1); "
                        "needs the null class label the model was trained with, or a text encoder")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2024); 0 = off")
    p.add_argument("--null-label", type=int, default=None,
                   help="the model's null (unconditional) class label, when its directory does not name one")


TEXT_GUIDANCE_DEFAULT = 7.5  # Stable Diffusion pipelines' default


def _is_text_model(spec) -> bool:
    """A Stable Diffusion layout pipeline directory (a cheap look at the files, before loading anything)."""
    root = Path(str(spec))
    return root.is_dir() and (root / "unet").is_dir() and (root / "text_encoder").exists()


def _guidance_scale(args) -> float:
    """--guidance-scale, or its default: 7.5 for text (prompts, embeddings or a text-to-image pipeline), else 1."""
    if getattr(args, "guidance_scale", None) is not None:
        return args.guidance_scale
    texty = any(getattr(args, k, None) for k in ("prompt", "prompts", "embeddings", "calib_prompts"))
    return TEXT_GUIDANCE_DEFAULT if texty or _is_text_model(getattr(args, "model", "")) else 1.0


def _prompts(args) -> tuple[str, ...] | None:
    from .text import read_prompts
    if getattr(args, "prompt", None):
        return tuple(args.prompt)
    if getattr(args, "prompts", None):
        return read_prompts(args.prompts)
    return None


def _labels(args):
    """--class-labels / --classes as the API takes them: a tuple, "all", or None."""
    if getattr(args, "class_labels", None) is not None:
        return tuple(args.class_labels)
    return getattr(args, "classes", None)


def _load(args):
    from . import api
    loaded = api.load(args.model, allow_pickle=args.allow_pickle, threads=args.threads)
    if getattr(args, "null_label", None) is not None:
        loaded.set_null_label(args.null_label)
    return loaded


def _settings(args):
    from .api import SampleSettings
    try:
        return SampleSettings(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed, n=args.n,
                              batch=args.batch, labels=_labels(args), guidance_scale=_guidance_scale(args),
                              guidance_rescale=args.guidance_rescale, prompts=_prompts(args),
                              negative_prompt=getattr(args, "negative_prompt", ""),
                              embeddings=getattr(args, "embeddings", None))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _quant(args):
    from .api import QuantSettings
    from .calib.timesteps import parse
    from .calib.trajectories import CalibSpec
    from .quant import DEFAULT_EXCLUDE, QuantConfig
    from .core.guidance import check_scale
    from .text import read_prompts
    labels = _labels(args)
    scale = _guidance_scale(args)
    try:
        check_scale(scale)
    except ValueError as e:
        raise UsageError(str(e)) from None
    prompts = read_prompts(args.calib_prompts) if getattr(args, "calib_prompts", None) else None
    spec = CalibSpec(parse(args.timesteps), n=args.calib_n, sampler=args.calib_sampler, steps=args.calib_steps,
                     seed=args.calib_seed, labels=labels if labels is None or labels == "all" else ",".join(map(str, labels)),
                     guidance_scale=scale, guidance_rescale=args.guidance_rescale, prompts=prompts,
                     negative_prompt=getattr(args, "negative_prompt", ""))
    base = tuple(args.exclude) if args.exclude is not None else DEFAULT_EXCLUDE  # --keep-fp adds to it
    more = tuple(p for p in dict.fromkeys(args.keep_fp) if p not in base)
    if args.keep_fp_from_t is not None and not more:
        raise UsageError("--keep-fp-from-t T keeps the --keep-fp layers in FP at the steps t >= T: give --keep-fp "
                         "PATTERN ... (layers not in --exclude)")
    keep = (dict(exclude=base + more) if args.keep_fp_from_t is None
            else dict(exclude=base, noisy_fp=more, fp_from_t=args.keep_fp_from_t))
    qcfg = QuantConfig(weight_bits=args.weight_bits, weight_calib=args.weight_calib, shortcut_split=args.shortcut_split,
                       rounding=args.rounding, recon_iters=args.recon_iters, recon_act_iters=args.recon_act_iters,
                       recon_temb=args.recon_temb, w8_layers=tuple(args.w8_layers or ()),
                       quantize_attention=args.quantize_attention, **keep)
    recipe = args.recipe
    if recipe is None:  # the default for these settings (and target), said when it is not the usual one
        from .api import default_recipe
        recipe, why = default_recipe(qcfg, spec, getattr(args, "target", None))
        if why:
            print(why, file=sys.stderr)
    return QuantSettings(recipe=recipe, spec=spec, qcfg=qcfg, cache_root=Path(args.cache_dir),
                         batch=args.batch).resolved()


def cmd_sample(args) -> int:
    from . import api
    from .images import save_grid, save_samples
    settings = _settings(args)
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"--out must end in .png, .jpg or .jpeg, got {args.out!r}")
    loaded = _load(args)
    with api.open_denoiser(loaded, engines=args.engine or (), onnx=args.onnx or (), openvino=args.openvino or (),
                           device=args.device, threads=args.threads, cuda_graph=args.cuda_graph,
                           ov_precision=args.ov_precision, ov_streams=args.ov_streams) as den:
        images, secs = api.draw(loaded, den, settings, progress=not args.no_progress)
    grid = save_grid(images, args.out, nrow=args.nrow)
    cond = "" if settings.labels is None else f", classes {settings.labels if isinstance(settings.labels, str) else list(settings.labels)}"
    cond += f", {len(settings.prompts)} prompt(s)" if settings.prompts else ""
    cond += f", embeddings {settings.embeddings}" if settings.embeddings else ""
    cond += f", guidance {settings.guidance_scale:g}" if settings.guidance_scale != 1 else ""
    print(f"{len(images)} images ({args.sampler}, {args.steps} steps, seeds {args.seed}..{args.seed + args.n - 1}{cond}) "
          f"in {secs:.1f} s -> {grid}")
    if args.save_samples:
        meta = {"model": str(loaded.source), "sampler": args.sampler, "steps": str(args.steps),
                "eta": str(args.eta), "seed": str(args.seed), "n": str(args.n)}
        print(f"raw samples -> {save_samples(images, args.save_samples, meta)}")
    return 0


def cmd_eval(args) -> int:
    from . import api, evaluate
    from .core.artifacts import write_json
    from .images import save_grid
    # Everything that can fail on bad input is checked before the (long) sampling run.
    settings = _settings(args)
    extractor = evaluate.InceptionFeatures(args.inception_weights) if args.inception_weights else None
    given = [f for f in ("recipe", "onnx", "openvino") if getattr(args, f)]
    if len(given) > 1:
        raise UsageError("--recipe evaluates the torch fake-quant model, --onnx / --openvino an exported graph in "
                         f"ONNX Runtime / OpenVINO: give one, not {' and '.join('--' + f for f in given)}")
    quant = _quant(args) if args.recipe else None
    loaded = _load(args)
    res = api.evaluate(loaded, settings, quant=quant, onnx=args.onnx, openvino=args.openvino,
                       ov_precision=args.ov_precision, ov_streams=args.ov_streams, extractor=extractor, ref=args.ref,
                       ref_limit=args.ref_limit, eps_n=args.eps_n, cache_root=Path(args.cache_dir), device=args.device,
                       threads=args.threads, progress=not args.no_progress)
    out_dir = Path(args.out_dir)
    save_grid(res.images[:64], out_dir / "grid.png")
    write_json(out_dir / "result.json", res.to_dict(), indent=2)
    ref = "" if res.reference == "none" else f" vs Fashion-MNIST {args.ref}"
    print(f"{res.line()}   N={args.n} {args.sampler}-{args.steps}{ref}   -> {out_dir}")
    return 0


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timesteps", default="ndtc",
                   help="calibration timestep sampler: ndtc[:mu,sigma] (PTQ4DM; default mu=0.5, sigma=0.35), "
                        "uniform, single[:step], all")
    p.add_argument("--calib-n", type=int, default=256, help="calibration samples (PTQ4DM used 1024)")
    p.add_argument("--calib-sampler", default="ddim", help="FP sampler whose trajectories are recorded")
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--calib-prompts", default=None, metavar="FILE",
                   help="text-to-image pipelines: calibration prompts, one per line (default: trt_dm's built-in 141)")
    p.add_argument("--weight-bits", type=int, default=8, choices=(8, 7, 4),
                   help="4 = W4A8: 4-bit weights (exported on the int8 grid, integers in [-8, 7], for int8 engines); "
                        "7 = W7A8: integers in [-64, 63], for int8 CPU kernels without VNNI (AVX2 only), which "
                        "saturate on 8-bit weights (docs/deployment.md, OpenVINO)")
    p.add_argument("--w8-layers", nargs="+", default=None, metavar="PATTERN",
                   help="with --weight-bits 4 or 7: these layers' weights stay 8-bit (fnmatch on module names, e.g. "
                        "'down_blocks.0.*' 'up_blocks.2.*' for the first resolution of a three-level UNet)")
    p.add_argument("--rounding", default="nearest", choices=("nearest", "adaround"),
                   help="weight rounding: to nearest, or learned by block reconstruction against the FP model on "
                        "the calibration set (AdaRound; cached beside the statistics; under a groups=K recipe each "
                        "calibration row runs with its timestep group's ranges)")
    p.add_argument("--recon-iters", type=int, default=500,
                   help="--rounding adaround: Adam steps per block (W4A8 on the default model: 2000 gain 5.9 dB "
                        "over 500 at 4x the time; docs/quality.md)")
    p.add_argument("--recon-act-iters", type=int, default=0,
                   help="--rounding adaround: then learn each block's input ranges (LSQ) for this many Adam steps; "
                        "the learned ranges replace the recipe's (0 = keep the recipe's)")
    p.add_argument("--recon-temb", default="block", choices=("block", "separate"),
                   help="--rounding adaround: reconstruct the resnets' time-embedding projections in their resnet "
                        "(block) or first, all together on their own outputs (separate: TFMQ-DM's time block)")
    p.add_argument("--weight-calib", default="max", choices=("max", "mse"),
                   help="weight ranges per output channel: max = abs-max; mse = ModelOpt's data-free search for the "
                        "clip with the least squared weight error (matters for --weight-bits 4)")
    p.add_argument("--shortcut-split", action="store_true",
                   help="Q-Diffusion's split: separate ranges for the h / skip halves of up-path concatenations "
                        "(fake-quant only)")
    p.add_argument("--quantize-attention", action="store_true", help="also quantize the attention matmul inputs")
    p.add_argument("--exclude", nargs="*", default=None,
                   help="layer name patterns kept in high precision, replacing the defaults "
                        "(trt_dm.quant.DEFAULT_EXCLUDE: time_embedding.* conv_in conv_out)")
    p.add_argument("--keep-fp", nargs="+", default=(), metavar="PATTERN",
                   help="more layer name patterns kept in high precision, added to --exclude (or its defaults), "
                        "e.g. 'down_blocks.0.*' 'up_blocks.2.*'; `calibrate --sensitivity blocks` ranks the blocks")
    p.add_argument("--keep-fp-from-t", type=int, default=None, metavar="T",
                   help="the --keep-fp layers in FP only at the noisy steps t >= T, quantized below: two graphs / "
                        "engines switched by t (e.g. 500: the first resolution at the noisy half of the steps)")
    p.add_argument("--cache-dir", default="calib_cache")


def cmd_calibrate(args) -> int:
    import statistics

    from . import api
    if args.sensitivity == "layers" and args.recipe is None:
        args.recipe = "ptq4dm"  # one range set: each layer's range is the one every timestep sees
    quant = _quant(args)
    loaded = _load(args)
    if args.sensitivity == "blocks":
        rep = api.sensitivity(loaded, quant, by="blocks", progress=not args.no_progress)
        what = f"guided prediction (guidance {rep['guidance_scale']:g})" if rep["guidance_scale"] != 1 else "prediction"
        end = rep["rel_mse_data_end"]
        print(f"per-block sensitivity (W{args.weight_bits}A8, recipe {quant.recipe}, {rep['n']} held-out calibration "
              f"samples): relative MSE of the {what} vs FP with all {rep['quantized_macs_share']:.1%} of the MACs "
              f"quantized: {rep['rel_mse']:.3e}" + (f" (t < T/10: {end:.3e})" if end is not None else "")
              + "; and with each block alone kept in FP:")
        print(f"{'block':34s} {'layers':>6s} {'MACs':>6s} {'rel MSE':>10s} {'t < T/10':>10s} {'removed':>8s}")
        lines = [(r["block"], f"{r['layers']:6d}", r) for r in rep["blocks"]]
        lines += [(f"the first {len(r['blocks'])} together", "", r) for r in rep["together"]]
        for name, layers, r in lines:
            e = "" if r["rel_mse_data_end"] is None else f"{r['rel_mse_data_end']:.3e}"
            print(f"{name:34s} {layers:>6s} {r['macs_share']:6.1%} {r['rel_mse']:10.3e} {e:>10s} {r['removed']:8.1%}")
        w, a = rep["weights_only"], rep["activations_only"]
        print(f"weights or activations: with only the weights quantized {w['rel_mse']:.3e}, only the activations "
              f"{a['rel_mse']:.3e}; share of the error removed by the weights / the activations alone in FP:")
        for r in rep["blocks"]:
            if "removed_by_weights" in r:
                print(f"{r['block']:34s} weights {r['removed_by_weights']:6.1%}   activations "
                      f"{r['removed_by_activations']:6.1%}")
        if rep["together"]:
            print("keep them in FP with: --keep-fp " + " ".join(f"'{b}.*'" for b in rep["together"][-1]["blocks"]))
        return 0
    if args.sensitivity == "layers":
        import fnmatch

        from .quant import DEFAULT_EXCLUDE
        rows = api.sensitivity(loaded, quant, by="layers", progress=not args.no_progress)
        print(f"per-layer sensitivity (W{args.weight_bits}A8, recipe {quant.recipe}, one layer quantized at a time; "
              "relative MSE of the predicted noise vs FP):")
        print(f"{'layer':48s} {'type':8s} {'rel MSE':>10s}  default")
        for r in rows:
            ex = "excluded" if any(fnmatch.fnmatchcase(r["layer"], p) for p in DEFAULT_EXCLUDE) else ""
            print(f"{r['layer']:48s} {r['type']:8s} {r['rel_mse']:10.3e}  {ex}")
        return 0
    res = api.calibrate(loaded, quant, progress=not args.no_progress)
    vals = [v for g in res.ranges.groups for v in g.amax.values()]
    print(f"recipe {quant.recipe}: {len(res.ranges)} quantized layers (activation ranges), amax min "
          f"{min(vals):.4g} / median {statistics.median(vals):.4g} / max {max(vals):.4g}")
    if res.stats_reused:
        print(f"statistics: reused from cache {res.stats_dir}")
    else:
        print(f"statistics: collected in {res.seconds_collect:.1f} s ({res.seconds_trajectories:.1f} s FP "
              f"trajectories, {res.unet_calls} UNet batch calls) -> {res.stats_dir}")
    print(f"ranges: computed in {res.seconds_ranges:.2f} s -> {res.ranges_path}")
    if res.weights_path is not None:
        print(f"weights with learned rounding ({quant.qcfg.rounding}) -> {res.weights_path}")
    return 0


def _deploy(args, build: bool):
    from . import api
    quant = _quant(args)
    loaded = _load(args)
    if build:
        print(f"model {loaded.name} ({loaded.kind}, {loaded.source}); fingerprint {loaded.fingerprint()[:16]}")
    return api.deploy(loaded, quant, target=args.target, out_dir=Path(args.out_dir), precision=args.precision,
                      options={"ops": args.ort_ops, "one_graph": args.one_graph, "group_engines": args.group_engines,
                               "layer_comparison": not args.no_layer_comparison},
                      build=build, baseline=not getattr(args, "no_baseline", True),
                      build_options=_build_options(args) if build else None, flavour=getattr(args, "flavour", None),
                      show_progress=not args.no_progress)


def cmd_export(args) -> int:
    _deploy(args, build=False)
    return 0


def _build_options(args):
    from .engine import BuildOptions
    return BuildOptions(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                        opt_level=args.opt_level, timing_cache=args.timing_cache,
                        rtx_targets=tuple(args.rtx_targets), workspace_mib=args.workspace_mib)


def cmd_build(args) -> int:
    from .core.artifacts import ExportReport
    from .targets import Exported, get_target
    path = Path(args.onnx)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    report = ExportReport.load(path)
    if report is None:  # a graph trt-dm did not export: int8 exactly when it has Q/DQ nodes
        from .export import check_qdq
        report = ExportReport(onnx=path.name, target="tensorrt", int8=check_qdq(path).quantize > 0)
    get_target("tensorrt").build([Exported(path, report)], _build_options(args), flavour=args.flavour)
    return 0


def cmd_engine(args) -> int:
    """make engine: calibrate (cached) -> export -> check -> build (TensorRT, else TensorRT-RTX, else stop)."""
    t0 = time.perf_counter()
    made = _deploy(args, build=True)
    from .core.stages import StageLog
    print(f"stages (wall time, peak resident memory) -> {made.stages_path}\n{StageLog(made.stages).table()}")
    if made.not_built:
        print(f"stopping after the checked ONNX: {made.not_built}")
        return 0
    print(f"done in {time.perf_counter() - t0:.0f} s; {made.usage}")
    return 0


def cmd_profile(args) -> int:
    from .profile import profile, write_report
    results = []
    for arch in args.arch or ["default"]:
        print(f"profiling {arch} ({args.threads} threads)")
        results.append(profile(arch, args.batches, threads=args.threads, steps=args.steps, warmup=args.warmup,
                               iters=args.iters, runners=args.runners, engines=args.engine,
                               guidance_scale=args.guidance_scale))
    paths = write_report(results, Path(args.out_dir))
    print(paths["md"].read_text())
    print("->", ", ".join(str(p) for p in paths.values()))
    return 0


def open_service(args, stack, *, replica: str | None = None):
    """The service `trt-dm serve` runs, from its parsed arguments: model, denoiser (engines, ONNX / OpenVINO graphs,
    a recipe's fake-quant model or FP torch), the step scheduler and the FastAPI app. Shared by the uvicorn server
    and each Ray Serve replica (``trt_dm.serve.ray_app``); the denoiser stays active until ``stack`` closes."""
    from . import api
    from .serve.app import Service, create_app
    api_key = args.api_key or os.environ.get("TRT_DM_API_KEY") or None
    loaded = _load(args)
    ranges, qcfg, describe, weights = None, None, {}, None
    if args.recipe:
        quant = _quant(args)
        res = api.calibrate(loaded, quant, progress=not args.no_progress)
        ranges, qcfg, describe = res.ranges, quant.qcfg, {"recipe": args.recipe, "ranges": str(res.ranges_path)}
        weights = res.weights_path
    den = stack.enter_context(api.open_denoiser(loaded, engines=args.engine or (), onnx=args.onnx or (),
                                                openvino=args.openvino or (), ov_precision=args.ov_precision,
                                                ov_streams=args.ov_streams, ranges=ranges, qcfg=qcfg,
                                                device=args.device, threads=args.threads, weights=weights,
                                                ort_spin=args.ort_spin))
    describe.update(den.describe)
    service = Service(loaded, den, max_rows=args.max_rows, max_queue=args.max_queue, describe=describe,
                      policy=args.batching)
    app = create_app(service, api_key=api_key, max_body=args.max_body, max_n=args.max_n, timeout_s=args.timeout,
                     replica=replica)
    return service, app, api_key


def cmd_serve(args) -> int:
    import contextlib
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise UsageError(f"trt-dm serve needs the [serve] extra (pip install 'trt_dm[serve]'): {e}") from None
    if args.max_rows < 2 or args.max_queue < 1 or args.max_n < 1:
        raise UsageError("--max-rows must be >= 2, --max-queue and --max-n >= 1")
    if args.ray:
        from .serve.ray_app import run_cli
        return run_cli(args)
    if args.replicas != 1 or args.max_replicas is not None or args.ray_address is not None:
        raise UsageError("--replicas, --max-replicas and --ray-address need --ray")
    with contextlib.ExitStack() as stack:
        service, app, api_key = open_service(args, stack)
        print(f"serving {service.loaded.name} ({service.describe.get('runner')}) on http://{args.host}:{args.port} "
              f"(max {args.max_rows} rows per UNet call, queue {args.max_queue}, API key {'on' if api_key else 'off'})")
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def cmd_check(args) -> int:
    import onnx

    from .export import check_qdq
    if not Path(args.onnx).is_file():
        raise FileNotFoundError(f"{args.onnx}: no such file")
    try:
        onnx.checker.check_model(args.onnx)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:  # type: ignore[attr-defined]
        raise UsageError(f"{args.onnx} is not a valid ONNX model: {str(e).splitlines()[0]}") from None
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
                      "schedule_fingerprint": loaded.schedule_fingerprint(),
                      "scheduler_source": loaded.scheduler_source, "signature": loaded.signature.to_dict()},
                     indent=2))
    return 0


def _openvino_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--openvino", nargs="+", default=None, metavar="GRAPH",
                   help="run this exported graph in OpenVINO on the CPU (e.g. the openvino / tensorrt target's "
                        "M-R.fp32.onnx: its Q/DQ layers run as int8 kernels; K graphs of a groups=K recipe are "
                        "switched by timestep); compiled once into a cache beside the graph (<stem>.ovcache/)")
    p.add_argument("--ov-precision", choices=("fp32", "bf16"), default="fp32",
                   help="with --openvino: precision of the non-quantized math (bf16 needs a CPU with native bf16, "
                        "AVX512_BF16 or AMX; elsewhere OpenVINO runs fp32 and says so)")
    p.add_argument("--ov-streams", type=int, default=None, metavar="K",
                   help="with --openvino: OpenVINO streams; a UNet call of >= K rows is split into K slices run at "
                        "once, smaller calls use all threads in one stream (default: 2 with >= 2 threads, else 1; "
                        "1 = one request on all threads)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None,
                   help="calibration recipe (see `trt-dm calibrate --help`; default ptq4dm-g4 in one graph, ptq4dm "
                        "for the ort-cpu target and for settings that take one range set)")
    from .targets import targets
    p.add_argument("--target", choices=list(targets()), default="tensorrt",
                   help="; ".join(f"{n}: {t.help}" for n, t in targets().items()))
    p.add_argument("--ort-ops", choices=("layers", "all"), default="layers",
                   help="ort-cpu: quantize the recipe's Conv/Linear layers only (as TensorRT; default), or every "
                        "operator ONNX Runtime can (SiLU, residual adds, concat, softmax too): a study option, "
                        "measured no faster here and less accurate (see docs/performance.md)")
    p.add_argument("--out-dir", default="engines", help="where ONNX files, reports and engines go")
    p.add_argument("--one-graph", action="store_true",
                   help="tensorrt / openvino targets, groups=K recipes: ONE graph / engine whose layers pick their "
                        "input range per row by the timestep's group (exact to the K-range model up to rounding "
                        "flips); the default for groups=K recipes, this flag only insists on it")
    p.add_argument("--group-engines", action="store_true",
                   help="tensorrt / openvino targets, groups=K recipes: K graphs / engines, one per timestep group "
                        "(switched by timestep at run time) instead of one")
    p.add_argument("--no-layer-comparison", action="store_true",
                   help="tensorrt target: skip the int8-code comparison of torch fake-quant and ONNX Runtime, layer "
                        "by layer (it needs about 3.4x the graph's size in memory: refused when that is not "
                        "available); the Q/DQ conformance and coverage checks still run")
    p.add_argument("--precision", choices=("fp16", "fp32"), default=None,
                   help="precision of the non-quantized math in the deployed graph (default: the target's; fp16 for "
                        "strongly typed TensorRT, the fp32 Q/DQ graph is always written too; fp32 for openvino)")
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
    p.add_argument("--workspace-mib", type=int, default=None,
                   help="builder workspace memory-pool limit in MiB (Jetson: its GPU shares the system memory)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trt-dm", description="Post-training int8 quantization for "
                                     "diffusion UNets (PTQ4DM), deployed as TensorRT engines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO) and show tracebacks")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("sample", help="draw images and write a grid")
    _add_model_args(p)
    _add_sampling_args(p, steps=50, n=64)
    _add_cond_args(p)
    p.add_argument("--out", default="grid.png", help="grid image path (.png/.jpg)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square)")
    p.add_argument("--save-samples", default=None, help="also write raw samples to this .safetensors file")
    p.add_argument("--onnx", nargs="+", default=None,
                   help="run this exported ONNX UNet in ONNX Runtime (CPU) instead of torch (K graphs of a groups=K "
                        "recipe are switched by timestep); --model still supplies the noise schedule and image shape")
    p.add_argument("--engine", nargs="+", default=None,
                   help="run this TensorRT / TensorRT-RTX engine (GPU); K plans of a groups=K recipe are "
                        "switched by timestep")
    p.add_argument("--cuda-graph", action="store_true", help="with --engine: replay the engine call as a CUDA graph")
    _openvino_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="FD-EffNet and KID of samples against Fashion-MNIST")
    _add_model_args(p)
    _add_sampling_args(p, steps=100, n=2000)
    _add_cond_args(p)
    p.add_argument("--ref", choices=("test", "train"), default="test", help="reference split")
    p.add_argument("--ref-limit", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--inception-weights", default=None,
                   help="local pytorch-fid Inception weights (.pth): report standard FID instead of FD-EffNet")
    p.add_argument("--out-dir", default="reports/eval", help="where result.json and grid.png go")
    p.add_argument("--recipe", default=None,
                   help="evaluate the fake-quant model calibrated with this recipe against FP (same seeds)")
    p.add_argument("--onnx", nargs="+", default=None,
                   help="evaluate this exported ONNX graph in ONNX Runtime (e.g. the ort-cpu int8 target) against FP; "
                        "several: the timestep groups / segments of one deployment, switched by t")
    p.add_argument("--eps-n", type=int, default=256,
                   help="images whose per-timestep noise-prediction error is measured (recipe runs)")
    _openvino_args(p)
    _calib_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="timestep-stratified calibration (PTQ4DM): statistics once, ranges per recipe")
    _add_model_args(p)
    p.add_argument("--recipe", default=None,
                   help="preset (ptq4dm-g4: the default; ptq4dm: the paper's, the default where the settings take "
                        "one range set; qdiffusion, max, percentile, entropy, minmean, meanmax) or METRIC@MERGE, e.g. "
                        "mse:2.4@pooled, percentile:99.9@uniform, max@groups=4")
    p.add_argument("--batch", type=int, default=64, help="images per UNet call")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sensitivity", nargs="?", const="layers", default=None, choices=("layers", "blocks"),
                   help="layers: one layer quantized at a time, the error of each half's prediction (decides the "
                        "default exclusion list); blocks: the model quantized as the other options say, one block "
                        "kept in FP at a time, the error of the prediction the sampler uses (guided with "
                        "--guidance-scale), with each block's share of the MACs (what to pass to --keep-fp)")
    _calib_args(p)
    _add_cond_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="calibrate (cached) and export the fake-quant UNet to Q/DQ ONNX, checked")
    _add_model_args(p)
    _export_args(p)
    _add_cond_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="build a TensorRT / TensorRT-RTX engine (+ sidecar) from an exported ONNX")
    p.add_argument("onnx")
    _build_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("engine", help="calibrate -> export -> check -> build (what `make engine` runs)")
    _add_model_args(p)
    _export_args(p)
    _add_cond_args(p)
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
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="class-conditional architectures: the sampling run uses classifier-free guidance (2 rows per "
                        "image per call); latency rows time UNet calls of the given batch")
    p.add_argument("--out-dir", default="reports/profile")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("serve", help="HTTP sampler service with step-level batching (FastAPI + uvicorn)")
    _add_model_args(p)
    p.add_argument("--onnx", nargs="+", default=None, help="serve this ONNX graph (K graphs of a groups=K recipe)")
    p.add_argument("--engine", nargs="+", default=None, help="serve this TensorRT engine (K plans of a groups=K recipe)")
    _openvino_args(p)
    p.add_argument("--ort-spin", action="store_true",
                   help="--onnx: let ONNX Runtime's threads busy-wait between UNet calls (its default; off here: "
                        "spinning threads slow the service's HTTP and PNG work, see BENCHMARKS.md)")
    p.add_argument("--recipe", default=None, help="serve the torch fake-quant model of this recipe (calibrated, cached)")
    p.add_argument("--device", default=None, help="torch device of the FP / fake-quant model")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-rows", type=int, default=64, help="most rows per UNet call (a guided image takes 2)")
    p.add_argument("--max-queue", type=int, default=256, help="most images waiting; more: 429 with Retry-After")
    p.add_argument("--batching", choices=("step", "request", "none"), default="step",
                   help="step: step-level continuous batching; request / none: the serving benchmark's baselines "
                        "(whole requests batched as they arrive; one request at a time)")
    p.add_argument("--max-n", type=int, default=64, help="most images per request")
    p.add_argument("--max-body", type=int, default=64 * 1024, help="largest request body in bytes (413 above)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request is cancelled (504)")
    p.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer / X-API-Key); or set "
                                                    "TRT_DM_API_KEY")
    p.add_argument("--null-label", type=int, default=None, help="the model's null class label, if not in trt_dm.json")
    p.add_argument("--ray", action="store_true",
                   help="deploy with Ray Serve: one step scheduler per replica, Ray's HTTP proxy, routing and "
                        "autoscaling (needs the [ray] extra)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (the minimum with --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="with --ray: autoscale between --replicas and this many, on ongoing requests per replica")
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="with --ray: CPUs Ray reserves per replica (default: --threads, or 1)")
    p.add_argument("--replica-gpus", type=float, default=None,
                   help="with --ray: GPUs per replica (default: 1 when serving engines or a CUDA device, else 0)")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: the Ray cluster to join (default: start a local Ray instance)")
    p.add_argument("--no-progress", action="store_true")
    _calib_args(p)
    p.set_defaults(func=cmd_serve, guidance_scale=None, guidance_rescale=0.0, class_labels=None, classes=None, batch=64)

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
    if not args.verbose:  # the libraries' tracing and conversion chatter: shown with -v only
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"modelopt\..*")
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
    from .calib.stats import CalibCacheError
    from .core.artifacts import EngineError
    from .models import ModelLoadError
    try:
        return args.func(args)
    except (CalibCacheError, EngineError, RuntimeError) as e:  # the work failed: exit 1
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UsageError, ModelLoadError, FileNotFoundError, ValueError) as e:  # bad input: exit 2, one line
        if args.verbose:
            raise
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
