"""Calibration, end to end: collect statistics ONCE per (model, calibration set, quantizer layout), then
compute ranges for MANY recipes as pure functions of them.

Cache layout (all writes atomic; a damaged file raises ``CalibCacheError``, never half-used)::

    calib_cache/<data key[:16]>/<stats key>/stats.safetensors + stats.json   # statistics
    calib_cache/<data key[:16]>/<stats key>/<recipe>.json                     # ranges + provenance

The data key (``LoadedModel.data_key``) hashes the UNet (config and weights) AND its noise schedule: the
same UNet under another scheduler config (a pipeline's v-prediction scheduler vs the DDPM default of its
bare unet/ folder, another timestep spacing) draws other trajectories and gets its own entry. The stats key hashes the calibration-set spec (timestep sampler, size, sampler, steps, seed), the
quantizer layout (which layers are quantized) and the histogram binning: change any of them and a new
entry is made; rerun with the same inputs and the entry is reused.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trt_dm.core.errors import InputError
from trt_dm.core.guidance import Guidance, cfg_denoiser
from trt_dm.core.ranges import RangeSet, group_index
from trt_dm.core.stages import stage
from trt_dm.models.loading import LoadedModel
from trt_dm.quant.calib import ranges as R
from trt_dm.quant.calib.reconstruct import ReconConfig, _rows, learned_input_amax, reconstruct, save_weights
from trt_dm.quant.calib.stats import DEFAULT_BINS, CalibCacheError, CalibStats
from trt_dm.quant.calib.trajectories import CalibSet, CalibSpec, collect
from trt_dm.quant.config import CALIB_CACHE_ROOT, QuantConfig, QuantSettings
from trt_dm.quant.fakequant import fake_quant_unet
from trt_dm.quant.modules import (
    concat_splits,
    observing,
    quantize_model,
    range_names,
    range_switch,
    sharing_copy,
)
from trt_dm.runtime.torch_runner import unet_denoiser

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    ranges: RangeSet
    ranges_path: Path
    stats_dir: Path
    stats_reused: bool
    seconds_collect: float = 0.0  # trajectories + statistics pass (0 when the cache was reused)
    seconds_ranges: float = 0.0
    seconds_trajectories: float = 0.0
    unet_calls: int = 0
    # safetensors: learned weight rounding's weights (qcfg.rounding "adaround") or channel balancing's factors
    # (qcfg.smooth, ``trt_dm.quant.calib.smooth``), what the fake-quant models take as ``weights``
    weights_path: Path | None = None


SMOOTH_FILE = "smooth.safetensors"  # channel balancing's factors, beside the statistics of the balanced inputs


def _smoothing(qcfg: QuantConfig) -> dict:
    return {"smooth": qcfg.smooth, "smooth_layers": list(qcfg.smooth_layers)} if qcfg.smooth else {}


def stats_key(spec: CalibSpec, layers: list[str], bins: int = DEFAULT_BINS, smoothing: dict | None = None) -> str:
    """The statistics' cache key: calibration set, layers, binning and (when on) channel balancing."""
    blob = json.dumps({"calib": spec.to_dict(), "layers": sorted(layers), "bins": bins, **(smoothing or {})},
                      sort_keys=True)
    return f"{spec.timesteps.kind}-n{spec.n}-{spec.sampler}{spec.steps}-s{spec.seed}-" + \
        hashlib.sha256(blob.encode()).hexdigest()[:12]


def collect_stats(loaded: LoadedModel, spec: CalibSpec, qcfg: QuantConfig, *, cache_root: Path = CALIB_CACHE_ROOT,
                  batch_size: int = 64, progress: bool = True, bins: int = DEFAULT_BINS
                  ) -> tuple[CalibStats, Path, bool, dict]:
    """Statistics of every quantized layer's input per timestep, from the cache or collected now.

    Conditional models: the trajectories run with the spec's class labels and classifier-free guidance, and
    the statistics pass feeds the UNet exactly what a guided sampler does, both halves of every 2B call."""
    schedule = loaded.schedule()
    schedule.check_steps(spec.steps, "--calib-steps", loaded.name)
    qunet = quantize_model(sharing_copy(loaded.unet), qcfg)  # observed only: the FP weights are not copied
    layers = range_names(qunet, qcfg)
    directory = Path(cache_root) / loaded.data_key()[:16] / stats_key(spec, layers, bins, _smoothing(qcfg))
    if (directory / "stats.json").exists():
        stats = CalibStats.load(directory)  # raises CalibCacheError when damaged
        if sorted(stats.names) != layers:
            raise CalibCacheError(f"{directory}: statistics cover other layers than the model's quantized "
                                    "layers; delete the folder to recollect")
        if qcfg.smooth and not (directory / SMOOTH_FILE).exists():
            raise CalibCacheError(f"{directory}: statistics of balanced inputs without their {SMOOTH_FILE}; "
                                  "delete the folder to recollect")
        log.info("reusing calibration statistics %s", directory)
        return stats, directory, True, {}
    meta = {"calib": json.dumps(spec.to_dict(), sort_keys=True), "model": loaded.fingerprint(),
            "schedule": loaded.schedule_fingerprint(), "quant": json.dumps(qcfg.activation_dict()),
            **({"smooth": json.dumps(_smoothing(qcfg), sort_keys=True)} if qcfg.smooth else {})}
    stats = None if qcfg.smooth else _subset_of_cached(directory, layers, bins, meta)
    if stats is not None:
        return stats, directory, True, {}
    t0 = time.perf_counter()
    with stage("calibration: FP trajectories"):
        calib, guidance = fp_calibration_set(loaded, spec, batch_size=batch_size, progress=progress)
    batches = list(calib.unet_batches(batch_size, guidance))  # with guidance: both halves of every call, as sampled
    divide = None
    if qcfg.smooth:  # the factors first (they decide what the statistics see), then the balanced inputs' statistics
        divide = _smoothing_factors(qunet, qcfg, batches, directory, meta)
    t1 = time.perf_counter()
    stats = CalibStats(bins, sampler_timesteps=schedule.timesteps(spec.steps), meta=meta)
    current_t: list[torch.Tensor] = []
    from tqdm.auto import tqdm
    splits = concat_splits(qunet) if qcfg.shortcut_split else None
    with stage("calibration: statistics pass"), torch.no_grad(), \
            observing(qunet, lambda name, x: stats.observe_batch(name, current_t[0], x), splits, divide):
        for x, t, c in tqdm(batches, desc="statistics", unit="batch", disable=not progress):
            current_t[:] = [t]
            stats.add_samples(t)
            qunet(x, t, **c)
    t2 = time.perf_counter()
    stats.save(directory)
    timings = {"seconds_trajectories": t1 - t0, "seconds_statistics": t2 - t1, "unet_calls": calib.unet_calls}
    return stats, directory, False, timings


def _smoothing_factors(qunet, qcfg: QuantConfig, batches: list, directory: Path, meta: dict) -> dict:
    """Channel balancing's factors for ``qcfg`` from the FP model's inputs on the calibration batches, saved as
    ``directory/SMOOTH_FILE`` (before the statistics, whose manifest marks the entry complete)."""
    from trt_dm.quant.calib import smooth
    with stage(f"calibration: channel balancing (alpha {qcfg.smooth})"):
        layers = smooth.smoothed_layers(qunet, qcfg.smooth_layers)
        scales = smooth.factors(layers, smooth.channel_absmax(qunet, layers, batches), qcfg.smooth)
        directory.mkdir(parents=True, exist_ok=True)
        smooth.save(directory / SMOOTH_FILE, scales, {"smooth": meta["smooth"], "model": meta["model"]})
    log.info("channel balancing: %d layers, alpha %s", len(scales), qcfg.smooth)
    return {n: smooth.input_view(layers[n], s) for n, s in scales.items()}  # what the statistics pass divides by


def _subset_of_cached(directory: Path, layers: list[str], bins: int, meta: dict) -> CalibStats | None:
    """The statistics of ``layers`` taken from a cached collection of the same calibration set over more layers
    (another config that quantizes more of them, e.g. a format mix's FP16 layers not excluded), saved as
    ``directory``; None when there is none. The statistics are of FP activations, so a layer's are the same
    whichever other layers are quantized: the subset is what a collection of its own would give, bit for bit."""
    for manifest in sorted(directory.parent.glob("*/stats.json")):
        try:
            m = json.loads(manifest.read_text())
            same = m["bins"] == bins and all(m["meta"].get(k) == meta[k] for k in ("calib", "model", "schedule")) \
                and m["meta"].get("smooth") == meta.get("smooth")  # balanced inputs are other statistics
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not same or not set(layers) <= set(m["names"]) or manifest.parent == directory:
            continue
        full = CalibStats.load(manifest.parent)  # verified; raises CalibCacheError when damaged
        stats = CalibStats(bins, sampler_timesteps=full.sampler_timesteps,
                           meta={**meta, "subset_of": manifest.parent.name})
        stats.hists = {k: h for k, h in full.hists.items() if k[0] in layers}
        stats.counts = dict(full.counts)
        stats.save(directory)
        log.info("calibration statistics of %d layers taken from %s", len(layers), manifest.parent)
        return stats
    return None


def calib_conditioning(loaded: LoadedModel, spec: CalibSpec) -> tuple[dict[str, torch.Tensor], Guidance]:
    """(conditioning of the ``spec.n`` trajectories, their guidance): class labels, prompts encoded by the pipeline,
    or a bare text UNet's embeddings file (``--calib-embeddings``, checked against the UNet's inputs)."""
    embeds = negative = None
    if spec.embeddings is not None:
        if not loaded.text_conditioned:
            raise InputError(f"--calib-embeddings was given, but {loaded.name!r} is not text-conditional",
                             field="calib_embeddings", flag="--calib-embeddings")
        embeds, negative = loaded.embeddings_file(spec.embeddings, flag="--calib-embeddings")
    cond = loaded.conditioning_for(spec.n, spec.label_list, prompts=spec.prompts, embeddings=embeds,
                                   guidance_scale=spec.guidance_scale)
    guidance = loaded.guidance(spec.guidance_scale, spec.guidance_rescale, negative_prompt=spec.negative_prompt,
                               negative_embeddings=negative, interval=spec.guidance_interval)
    return cond, guidance


def fp_calibration_set(loaded: LoadedModel, spec: CalibSpec, *, batch_size: int = 64, progress: bool = True
                       ) -> tuple[CalibSet, Guidance]:
    """The FP model's calibration set for ``spec``: trajectories sampled with its class labels and classifier-free
    guidance (labels and guidance are checked first), and that guidance, for feeding the UNet what it sees."""
    cond, guidance = calib_conditioning(loaded, spec)
    calib = collect(cfg_denoiser(unet_denoiser(loaded.unet), guidance), loaded.schedule(),
                    loaded.sample_shape, spec, batch_size=batch_size, conditioning=cond, progress=progress)
    return calib, guidance


def calibrate(loaded: LoadedModel, spec: CalibSpec, qcfg: QuantConfig, recipe: str, *,
              cache_root: Path = CALIB_CACHE_ROOT, batch_size: int = 64, progress: bool = True) -> CalibrationResult:
    """Ranges for ``recipe`` (a preset name or "<metric>@<merge>"), cached as <stats dir>/<recipe>.json."""
    rec = R.get_recipe(recipe)  # validate before any work
    rec.metric.check_format("fp8" if qcfg.uses_fp8 else "int8")
    stats, directory, reused, timings = collect_stats(loaded, spec, qcfg, cache_root=cache_root,
                                                      batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    with stage(f"calibration: ranges ({rec.name})"):
        ranges = RangeSet.from_dict(R.compute_ranges(stats, rec, fmt=qcfg.format_of if qcfg.fp8_layers else qcfg.format))
    seconds_ranges = time.perf_counter() - t0
    path = directory / qcfg.ranges_name(rec.name)
    provenance = {"recipe": rec.name, "recipe_spec": rec.spec, "model": loaded.fingerprint(),
                  "schedule": loaded.schedule_fingerprint(), "model_source": str(loaded.source),
                  "calib": spec.to_dict(), "quant": qcfg.activation_dict(), "stats": str(directory),
                  **({"format": qcfg.precision} if qcfg.uses_fp8 else {}),
                  **({"fp8_layers": list(qcfg.fp8_layers)} if qcfg.fp8_layers else {})}
    # every caller of this stats dir gets the same activation ranges, whatever its weight settings: the file records
    # only what decides them (a W4A8 run rewriting it must not make it read as a W4A8 calibration)
    R.save_ranges(path, ranges.to_dict(), provenance)
    weights_path = directory / SMOOTH_FILE if qcfg.smooth else None
    if qcfg.rounding != "nearest":
        weights_path = reconstructed_weights(loaded, spec, qcfg, ranges, rec.name, directory, batch_size=batch_size,
                                             progress=progress)
        if qcfg.recon_act_iters:  # the input ranges learned with the rounding replace the recipe's for those layers
            ranges = RangeSet.pooled({**ranges.amax(0), **learned_input_amax(weights_path)})
            path = weights_path.with_suffix(".json")
            R.save_ranges(path, ranges.to_dict(),
                          {**provenance, "quant": qcfg.to_dict(), "refined_by": weights_path.name})
    return CalibrationResult(ranges=ranges, ranges_path=path, stats_dir=directory, stats_reused=reused,
                             weights_path=weights_path,
                             seconds_collect=timings.get("seconds_trajectories", 0) + timings.get("seconds_statistics", 0),
                             seconds_ranges=seconds_ranges,
                             seconds_trajectories=timings.get("seconds_trajectories", 0.0),
                             unet_calls=timings.get("unet_calls", 0))


def calibrate_settings(loaded: LoadedModel, quant: QuantSettings, *, progress: bool = True) -> CalibrationResult:
    """``calibrate`` as ``quant`` (a ``QuantSettings``) says, its defaults resolved for ``loaded``."""
    q = quant.resolved(loaded)
    return calibrate(loaded, q.spec, q.qcfg, q.recipe, cache_root=q.cache_root, batch_size=q.batch, progress=progress)


def reconstructed_weights(loaded: LoadedModel, spec: CalibSpec, qcfg: QuantConfig, ranges: RangeSet, recipe: str,
                          directory: Path, *, batch_size: int = 64, progress: bool = True) -> Path:
    """The weights with learned rounding (``qcfg.rounding``) for these ranges, cached beside the statistics as
    ``<recipe>.<rounding>-<key>.safetensors`` (key: quantization config, ranges, reconstruction settings)."""
    if ranges.is_grouped and qcfg.recon_act_iters:
        raise ValueError(f"--recon-act-iters learns one input range per layer: it needs one range set; {recipe!r} has "
                         f"{len(ranges.groups)} timestep groups (use --rounding adaround alone, or a pooled recipe)")
    rc = ReconConfig(iters=qcfg.recon_iters, seed=spec.seed, act_iters=qcfg.recon_act_iters, temb=qcfg.recon_temb)
    blob = json.dumps({"quant": qcfg.to_dict(), "ranges": ranges.to_dict(), "recon": rc.key()}, sort_keys=True)
    path = directory / f"{recipe}.{qcfg.rounding}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.safetensors"
    if path.exists():
        log.info("reusing reconstructed weights %s", path)
        return path
    with stage(f"calibration: weight reconstruction ({qcfg.rounding}, {rc.iters} steps per block)"):
        t0 = time.perf_counter()
        qunet = fake_quant_unet(loaded, dataclasses.replace(qcfg, rounding="nearest", recon_act_iters=0,
                                                                recon_temb="block"), ranges)
        calib, guidance = fp_calibration_set(loaded, spec, batch_size=batch_size, progress=progress)
        batches = list(calib.unet_batches(batch_size, guidance))
        grouping = {}
        if ranges.is_grouped:  # each row with its timestep group's ranges, as the one-graph / K engines run it
            batches, groups = _split_batches_by_group(batches, ranges.t_ranges)
            grouping = {"batch_groups": groups, "set_group": range_switch(qunet, ranges)}
        weights, act_amax = reconstruct(qunet, copy.deepcopy(loaded.unet), batches, rc, progress=progress,
                                        **grouping)
        save_weights(path, weights, {"quant": qcfg.to_dict(), "recon": dataclasses.asdict(rc), "recipe": recipe,
                                     "model": loaded.fingerprint(), "seconds": round(time.perf_counter() - t0, 1),
                                     **({"input_amax": act_amax} if rc.act_iters else {})})
    return path


def _split_batches_by_group(batches: list, t_ranges) -> tuple[list, list[int]]:
    """The UNet batches [(x, t, conditioning)] cut so that each holds rows of one timestep group; and each one's group."""
    out, groups = [], []
    for x, t, cond in batches:
        gi = group_index(t, t_ranges)
        for k in torch.unique(gi).tolist():
            (xk, tk), ck = _rows(((x, t), cond), torch.nonzero(gi == k).flatten(), len(t))
            out.append((xk, tk, ck))
            groups.append(k)
    return out, groups


