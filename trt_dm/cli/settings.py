"""Command-line arguments -> the library's settings (``SampleSettings``, ``QuantSettings``, build options), with
usage errors (exit code 2) for what cannot be turned into them."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from trt_dm import api
from trt_dm.core.guidance import check_scale
from trt_dm.models.text import read_prompts
from trt_dm.quant.calib.timesteps import parse
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.config import DEFAULT_EXCLUDE, QuantConfig, QuantSettings, default_recipe
from trt_dm.quant.search import FormatSearch
from trt_dm.sampling import SampleSettings
from trt_dm.targets.trt_builder import BuildOptions


class UsageError(ValueError):
    """A bad command line: exit code 2, one line."""



TEXT_GUIDANCE_DEFAULT = 7.5  # Stable Diffusion pipelines' default



def is_text_model(spec) -> bool:
    """A Stable Diffusion / SDXL / SD3 layout pipeline directory (a cheap look at the files, before loading)."""
    root = Path(str(spec))
    return (root.is_dir() and any((root / d).is_dir() for d in ("unet", "transformer"))
            and (root / "text_encoder").exists())



def _flux_default(spec) -> float | None:
    """FluxPipeline's default for a Flux.1 transformer (alone or in its pipeline): 3.5 as the embedded guidance of a
    guidance-distilled one (Flux.1-dev), 1 (no guidance) for another (Flux.1-schnell); None for other models."""
    root = Path(str(spec))
    for config in (root / "transformer" / "config.json", root / "config.json"):
        try:
            doc = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("_class_name") == "FluxTransformer2DModel":
            return 3.5 if doc.get("guidance_embeds") else 1.0
    return None


def guidance_scale_of(args) -> float:
    """--guidance-scale, or its default: Flux's pipeline's (``_flux_default``), 7.5 for text (prompts, embeddings or a
    text-to-image pipeline), else 1."""
    if getattr(args, "guidance_scale", None) is not None:
        return args.guidance_scale
    flux = _flux_default(getattr(args, "model", ""))
    if flux is not None:
        return flux
    texty = any(getattr(args, k, None)
                for k in ("prompt", "prompts", "embeddings", "calib_prompts", "calib_embeddings"))
    return TEXT_GUIDANCE_DEFAULT if texty or is_text_model(getattr(args, "model", "")) else 1.0



def prompts_of(args) -> tuple[str, ...] | None:
    if getattr(args, "prompt", None):
        return tuple(args.prompt)
    if getattr(args, "prompts", None):
        return read_prompts(args.prompts)
    return None



def labels_of(args):
    """--class-labels / --classes as the API takes them: a tuple, "all", or None."""
    if getattr(args, "class_labels", None) is not None:
        return tuple(args.class_labels)
    return getattr(args, "classes", None)



def load_model_of(args):
    loaded = api.load(args.model, allow_pickle=args.allow_pickle, threads=args.threads)
    if getattr(args, "null_label", None) is not None:
        loaded.set_null_label(args.null_label)
    return loaded



def _interval(args) -> tuple[int, int] | None:
    v = getattr(args, "guidance_interval", None)
    return tuple(v) if v is not None else None


def sample_settings(args):
    try:
        return SampleSettings(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed, n=args.n,
                              batch=args.batch, labels=labels_of(args), guidance_scale=guidance_scale_of(args),
                              guidance_rescale=args.guidance_rescale, prompts=prompts_of(args),
                              guidance_interval=_interval(args),
                              negative_prompt=getattr(args, "negative_prompt", ""),
                              embeddings=getattr(args, "embeddings", None))
    except ValueError as e:
        raise UsageError(str(e)) from None



def quant_settings(args):
    labels = labels_of(args)
    scale = guidance_scale_of(args)
    try:
        check_scale(scale)
    except ValueError as e:
        raise UsageError(str(e)) from None
    prompts = read_prompts(args.calib_prompts) if getattr(args, "calib_prompts", None) else None
    spec = CalibSpec(parse(args.timesteps), n=args.calib_n, sampler=args.calib_sampler, steps=args.calib_steps,
                     seed=args.calib_seed, labels=labels if labels is None or labels == "all" else ",".join(map(str, labels)),
                     guidance_scale=scale, guidance_rescale=args.guidance_rescale, prompts=prompts,
                     guidance_interval=_interval(args),
                     negative_prompt=getattr(args, "negative_prompt", ""),
                     embeddings=getattr(args, "calib_embeddings", None))
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
                       quantize_attention=args.quantize_attention, format=args.format,
                       smooth=getattr(args, "smooth", 0.0),
                       smooth_layers=tuple(getattr(args, "smooth_layers", None) or ()),
                       **keep)
    search = format_search(args)
    if search is not None:
        try:
            search.check_base(qcfg)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if "fp8" in search.formats and getattr(args, "target", None) in ("ort-cpu", "openvino"):
            raise UsageError(f"--formats {args.formats} may choose FP8, which --target {args.target} has no kernels "
                             "for; give --formats int8,fp16 (or --target tensorrt)")
    recipe = args.recipe
    if recipe is None:  # the default for these settings (and target), said when it is not the usual one
        recipe, why = default_recipe(qcfg, spec, getattr(args, "target", None))
        if why:
            print(why, file=sys.stderr)
    return QuantSettings(recipe=recipe, spec=spec, qcfg=qcfg, cache_root=Path(args.cache_dir),
                         batch=args.batch).resolved()



def build_options(args):
    return BuildOptions(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                        opt_level=args.opt_level, timing_cache=args.timing_cache,
                        rtx_targets=tuple(args.rtx_targets), workspace_mib=args.workspace_mib)



def format_search(args):
    """--formats / --budget / --min-8bit-macs as a ``FormatSearch``, or None without --formats."""
    if getattr(args, "formats", None) is None:
        if getattr(args, "budget", None) is not None or getattr(args, "budget_on", "step") != "step":
            raise UsageError("--budget / --budget-on are the quality budget of a format search: give --formats auto "
                             "(or a list)")
        return None
    try:
        return FormatSearch.parse(args.formats, args.budget, args.min_8bit_macs, getattr(args, "budget_on", "step"))
    except ValueError as e:
        raise UsageError(str(e)) from None


def searched(args, loaded, quant, *, table: bool = False):
    """``quant`` with the searched format mix (--formats) in place of its config, the mix said on stdout (``table``:
    every layer's row); ``quant`` itself without --formats."""
    search = format_search(args)
    if search is None:
        return quant
    mix = api.search_formats(loaded, quant, search, progress=not args.no_progress)
    print_mix(mix, table=table)
    return replace(quant, qcfg=mix.qcfg)


def print_mix(mix, *, table: bool = False) -> None:
    share, total = mix.macs_share(), sum(r["macs"] for r in mix.layers) + mix.other_macs
    if table:
        print(f"{'layer':48s} {'MACs':>6s} {'int8 err':>10s} {'fp8 err':>10s}  format")
        for r in mix.layers:
            errs = "".join(f" {r[f]:10.3e}" if f in r else f" {'-':>10s}" for f in ("int8", "fp8"))
            print(f"{r['layer']:48s} {r['macs'] / total:6.1%}{errs}  {r['format']}")
    key = "sampled_rel_mse" if mix.measure == "sampled" else "rel_mse"
    alone = ", ".join(f"all {f} {mix.all_8bit[f][key]:.3e}" for f in ("int8", "fp8") if f in mix.all_8bit)
    on = " of sampled images" if mix.measure == "sampled" else ""
    print(f"format mix: relative MSE{on} {mix.rel_mse:.3e} (budget {mix.budget:.3g}; {alone}); MACs int8 "
          f"{share['int8']:.1%}, fp8 {share['fp8']:.1%}, fp16 {share['fp16']:.1%} ({len(mix.qcfg.fp8_layers)} FP8 "
          f"layers, {sum(r['format'] == 'fp16' for r in mix.layers)} searched layers in FP16) -> {mix.path}")
