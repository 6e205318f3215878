"""One function per `trt-dm` command: settings in (``trt_dm.cli.settings``), ``trt_dm.api`` calls, printed results."""
from __future__ import annotations

import json
import time
from pathlib import Path

from trt_dm import api
from trt_dm.cli.settings import (
    UsageError,
    build_options,
    format_search,
    load_model_of,
    quant_settings,
    sample_settings,
    searched,
)
from trt_dm.core.artifacts import ExportReport
from trt_dm.core.images import save_grid, save_samples
from trt_dm.core.io import write_json
from trt_dm.core.stages import StageLog
from trt_dm.eval import metrics as evaluate
from trt_dm.eval.profile import profile, write_report
from trt_dm.export.job import Exported
from trt_dm.export.onnx import check_qdq
from trt_dm.quant.config import DEFAULT_EXCLUDE
from trt_dm.targets import get_target
from trt_dm.targets.trt_builder import for_format


def cmd_sample(args) -> int:
    settings = sample_settings(args)
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"--out must end in .png, .jpg or .jpeg, got {args.out!r}")
    loaded = load_model_of(args)
    c = loaded.sample_shape[0]
    latents = loaded.text is None and loaded.vae is None and c not in (1, 3)  # a latent UNet saved alone
    if latents and not args.save_samples:
        raise UsageError(f"{loaded.name!r} samples {c}-channel latents and has no VAE to decode them into images: "
                         "give its pipeline directory (with vae/), or keep the latents with --save-samples "
                         "FILE.safetensors")
    with api.open_denoiser(loaded, engines=args.engine or (), onnx=args.onnx or (), openvino=args.openvino or (),
                           device=args.device, threads=args.threads, cuda_graph=args.cuda_graph,
                           ov_precision=args.ov_precision, ov_streams=args.ov_streams) as den:
        images, secs = api.draw(loaded, den, settings, progress=not args.no_progress)
    grid = "no image grid of latents" if latents else save_grid(images, args.out, nrow=args.nrow)
    cond = "" if settings.labels is None else f", classes {settings.labels if isinstance(settings.labels, str) else list(settings.labels)}"
    cond += f", {len(settings.prompts)} prompt(s)" if settings.prompts else ""
    cond += f", embeddings {settings.embeddings}" if settings.embeddings else ""
    interval = settings.for_model(loaded).guidance_interval
    cond += f", guidance {settings.guidance_scale:g}" if settings.guidance_scale != 1 else ""
    cond += f" at t in [{interval[0]}, {interval[1]}]" if interval else ""
    print(f"{len(images)} images ({args.sampler}, {args.steps} steps, seeds {args.seed}..{args.seed + args.n - 1}{cond}) "
          f"in {secs:.1f} s -> {grid}")
    if args.save_samples:
        meta = {"model": str(loaded.source), "sampler": args.sampler, "steps": str(args.steps),
                "eta": str(args.eta), "seed": str(args.seed), "n": str(args.n)}
        print(f"raw samples -> {save_samples(images, args.save_samples, meta)}")
    return 0



def cmd_eval(args) -> int:
    # Everything that can fail on bad input is checked before the (long) sampling run.
    settings = sample_settings(args)
    extractor = evaluate.InceptionFeatures(args.inception_weights) if args.inception_weights else None
    quant = quant_settings(args) if args.recipe else None
    loaded = load_model_of(args)
    quant = searched(args, loaded, quant) if quant is not None else None
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



def cmd_calibrate(args) -> int:
    import statistics

    if args.sensitivity == "layers" and args.recipe is None:
        args.recipe = "ptq4dm"  # one range set: each layer's range is the one every timestep sees
    quant = quant_settings(args)
    loaded = load_model_of(args)
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
            print("keep them in FP with: --keep-fp " + " ".join(f"'{p}'" for p in rep["together"][-1]["patterns"]))
        return 0
    if args.sensitivity == "layers":
        import fnmatch

        rows = api.sensitivity(loaded, quant, by="layers", progress=not args.no_progress)
        print(f"per-layer sensitivity (W{args.weight_bits}A8, recipe {quant.recipe}, one layer quantized at a time; "
              "relative MSE of the predicted noise vs FP):")
        print(f"{'layer':48s} {'type':8s} {'rel MSE':>10s}  default")
        for r in rows:
            ex = "excluded" if any(fnmatch.fnmatchcase(r["layer"], p) for p in DEFAULT_EXCLUDE) else ""
            print(f"{r['layer']:48s} {r['type']:8s} {r['rel_mse']:10.3e}  {ex}")
        return 0
    quant = searched(args, loaded, quant, table=True)
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
    if res.weights_path is not None and quant.qcfg.smooth:
        print(f"channel balancing factors (alpha {quant.qcfg.smooth}) -> {res.weights_path}")
    elif res.weights_path is not None:
        print(f"weights with learned rounding ({quant.qcfg.rounding}) -> {res.weights_path}")
    return 0



def _deploy(args, build: bool):
    quant = quant_settings(args)
    if build and getattr(args, "formats", None) and "fp8" in format_search(args).formats:
        try:  # TensorRT-RTX targets without FP8, refused before the search's work
            for_format(build_options(args), "fp8")
        except ValueError as e:
            raise UsageError(f"{e} (--formats {args.formats} may choose FP8)") from None
    loaded = load_model_of(args)
    quant = searched(args, loaded, quant)
    if build:
        print(f"model {loaded.name} ({loaded.kind}, {loaded.source}); fingerprint {loaded.fingerprint()[:16]}")
    return api.deploy(loaded, quant, target=args.target, out_dir=Path(args.out_dir), precision=args.precision,
                      options={"ops": args.ort_ops, "one_graph": args.one_graph, "group_engines": args.group_engines,
                               "layer_comparison": not args.no_layer_comparison},
                      build=build, baseline=not getattr(args, "no_baseline", True),
                      build_options=build_options(args) if build else None, flavour=getattr(args, "flavour", None),
                      show_progress=not args.no_progress, release=True)  # (the process ends with the run)



def cmd_export(args) -> int:
    _deploy(args, build=False)
    return 0



def cmd_build(args) -> int:
    path = Path(args.onnx)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    report = ExportReport.load(path)
    if report is None:  # a graph trt-dm did not export: int8 exactly when it has Q/DQ nodes
        report = ExportReport(onnx=path.name, target="tensorrt", int8=check_qdq(path).quantize > 0)
    get_target("tensorrt").build([Exported(path, report)], build_options(args), flavour=args.flavour)
    return 0



def cmd_engine(args) -> int:
    """make engine: calibrate (cached) -> export -> check -> build (TensorRT, else TensorRT-RTX, else stop)."""
    t0 = time.perf_counter()
    made = _deploy(args, build=True)
    print(f"stages (wall time, peak resident memory) -> {made.stages_path}\n{StageLog(made.stages).table()}")
    if made.not_built:
        print(f"stopping after the checked ONNX: {made.not_built}")
        return 0
    print(f"done in {time.perf_counter() - t0:.0f} s; {made.usage}")
    return 0



def cmd_profile(args) -> int:
    results = []
    for arch in args.arch or ["default"]:
        print(f"profiling {arch} ({args.threads} threads)")
        results.append(profile(arch, args.batches, threads=args.threads, steps=args.steps, warmup=args.warmup,
                               iters=args.iters, runners=args.runners, engines=args.engine,
                               guidance_scale=args.guidance_scale, spread=args.timesteps == "spread"))
    paths = write_report(results, Path(args.out_dir))
    print(paths["md"].read_text())
    print("->", ", ".join(str(p) for p in paths.values()))
    return 0



def cmd_check(args) -> int:
    import onnx

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



def _conditioning_info(loaded) -> dict:
    """The model's trt_dm.json facts (null label, classes, default guidance interval), those it has."""
    info = {"null_class_label": loaded.null_class_label, "num_classes": loaded.num_classes,
            "class_names": list(loaded.class_names) if loaded.class_names else None,
            "guidance_interval": list(loaded.guidance_interval) if loaded.guidance_interval else None}
    return {k: v for k, v in info.items() if v is not None}


def cmd_info(args) -> int:
    loaded = load_model_of(args)
    n_params = sum(p.numel() for p in loaded.unet.parameters())
    print(json.dumps({"name": loaded.name, "kind": loaded.kind, "source": str(loaded.source),
                      "parameters": n_params, "fingerprint": loaded.fingerprint(),
                      "schedule_fingerprint": loaded.schedule_fingerprint(),
                      "scheduler_source": loaded.scheduler_source, "signature": loaded.signature.to_dict(),
                      **({"vae": loaded.vae.describe()} if loaded.vae is not None else {}),
                      **_conditioning_info(loaded)}, indent=2))
    return 0
