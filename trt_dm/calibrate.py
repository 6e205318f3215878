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

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .calib import ranges as R
from .calib.stats import DEFAULT_BINS, CalibCacheError, CalibStats
from .calib.trajectories import CalibSet, CalibSpec, collect
from .core.artifacts import RangeSet, group_index, split_by_group
from .core.guidance import Guidance, cfg_denoiser
from .core.stages import stage
from .models import LoadedModel
from .quant import (QuantConfig, apply_ranges, concat_splits, observing, quantize_model, quantized_layers, range_names,
                    range_switch)
from .sampling import Schedule, unet_denoiser

log = logging.getLogger(__name__)
DEFAULT_CACHE_ROOT = Path("calib_cache")


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
    weights_path: Path | None = None  # learned weight rounding (qcfg.rounding "adaround"), safetensors


def stats_key(spec: CalibSpec, layers: list[str], bins: int = DEFAULT_BINS) -> str:
    blob = json.dumps({"calib": spec.to_dict(), "layers": sorted(layers), "bins": bins}, sort_keys=True)
    return f"{spec.timesteps.kind}-n{spec.n}-{spec.sampler}{spec.steps}-s{spec.seed}-" + \
        hashlib.sha256(blob.encode()).hexdigest()[:12]


def collect_stats(loaded: LoadedModel, spec: CalibSpec, qcfg: QuantConfig, *, cache_root: Path = DEFAULT_CACHE_ROOT,
                  batch_size: int = 64, progress: bool = True, bins: int = DEFAULT_BINS
                  ) -> tuple[CalibStats, Path, bool, dict]:
    """Statistics of every quantized layer's input per timestep, from the cache or collected now.

    Conditional models: the trajectories run with the spec's class labels and classifier-free guidance, and
    the statistics pass feeds the UNet exactly what a guided sampler does, both halves of every 2B call."""
    schedule = Schedule.from_config(loaded.scheduler_config)
    schedule.check_steps(spec.steps, "--calib-steps", loaded.name)
    qunet = quantize_model(copy.deepcopy(loaded.unet), qcfg)
    layers = range_names(qunet, qcfg)
    directory = Path(cache_root) / loaded.data_key()[:16] / stats_key(spec, layers, bins)
    if (directory / "stats.json").exists():
        stats = CalibStats.load(directory)  # raises CalibCacheError when damaged
        if sorted(stats.names) != layers:
            raise CalibCacheError(f"{directory}: statistics cover other layers than the model's quantized "
                                    "layers; delete the folder to recollect")
        log.info("reusing calibration statistics %s", directory)
        return stats, directory, True, {}
    t0 = time.perf_counter()
    with stage("calibration: FP trajectories"):
        calib, guidance = fp_calibration_set(loaded, spec, batch_size=batch_size, progress=progress)
    t1 = time.perf_counter()
    stats = CalibStats(bins, sampler_timesteps=schedule.timesteps(spec.steps),
                       meta={"calib": json.dumps(spec.to_dict(), sort_keys=True), "model": loaded.fingerprint(),
                             "schedule": loaded.schedule_fingerprint(),
                             "quant": json.dumps(qcfg.activation_dict())})
    current_t: list[torch.Tensor] = []
    from tqdm.auto import tqdm
    splits = concat_splits(qunet) if qcfg.shortcut_split else None
    with stage("calibration: statistics pass"), torch.no_grad(), \
            observing(qunet, lambda name, x: stats.observe_batch(name, current_t[0], x), splits):
        for x, t, c in tqdm(list(calib.unet_batches(batch_size, guidance)), desc="statistics", unit="batch",
                            disable=not progress):  # with guidance: both halves of every call, as the sampler's
            current_t[:] = [t]
            stats.add_samples(t)
            qunet(x, t, **c)
    t2 = time.perf_counter()
    stats.save(directory)
    timings = {"seconds_trajectories": t1 - t0, "seconds_statistics": t2 - t1, "unet_calls": calib.unet_calls}
    return stats, directory, False, timings


def fp_calibration_set(loaded: LoadedModel, spec: CalibSpec, *, batch_size: int = 64, progress: bool = True
                       ) -> tuple[CalibSet, Guidance]:
    """The FP model's calibration set for ``spec``: trajectories sampled with its class labels and classifier-free
    guidance (labels and guidance are checked first), and that guidance, for feeding the UNet what it sees."""
    cond = loaded.conditioning_for(spec.n, spec.label_list, prompts=spec.prompts)
    guidance = loaded.guidance(spec.guidance_scale, spec.guidance_rescale, negative_prompt=spec.negative_prompt)
    calib = collect(cfg_denoiser(unet_denoiser(loaded.unet), guidance), Schedule.from_config(loaded.scheduler_config),
                    loaded.sample_shape, spec, batch_size=batch_size, conditioning=cond, progress=progress)
    return calib, guidance


def calibrate(loaded: LoadedModel, spec: CalibSpec, qcfg: QuantConfig, recipe: str, *,
              cache_root: Path = DEFAULT_CACHE_ROOT, batch_size: int = 64, progress: bool = True) -> CalibrationResult:
    """Ranges for ``recipe`` (a preset name or "<metric>@<merge>"), cached as <stats dir>/<recipe>.json."""
    rec = R.get_recipe(recipe)  # validate before any work
    stats, directory, reused, timings = collect_stats(loaded, spec, qcfg, cache_root=cache_root,
                                                      batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    with stage(f"calibration: ranges ({rec.name})"):
        ranges = RangeSet.from_dict(R.compute_ranges(stats, rec))
    seconds_ranges = time.perf_counter() - t0
    path = directory / f"{rec.name}.json"
    provenance = {"recipe": rec.name, "recipe_spec": rec.spec, "model": loaded.fingerprint(),
                  "schedule": loaded.schedule_fingerprint(), "model_source": str(loaded.source),
                  "calib": spec.to_dict(), "quant": qcfg.activation_dict(), "stats": str(directory)}
    # every caller of this stats dir gets the same activation ranges, whatever its weight settings: the file records
    # only what decides them (a W4A8 run rewriting it must not make it read as a W4A8 calibration)
    R.save_ranges(path, ranges.to_dict(), provenance)
    weights_path = None
    if qcfg.rounding != "nearest":
        weights_path = reconstructed_weights(loaded, spec, qcfg, ranges, rec.name, directory, batch_size=batch_size,
                                             progress=progress)
        if qcfg.recon_act_iters:  # the input ranges learned with the rounding replace the recipe's for those layers
            from .calib.reconstruct import learned_input_amax
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


def reconstructed_weights(loaded: LoadedModel, spec: CalibSpec, qcfg: QuantConfig, ranges: RangeSet, recipe: str,
                          directory: Path, *, batch_size: int = 64, progress: bool = True) -> Path:
    """The weights with learned rounding (``qcfg.rounding``) for these ranges, cached beside the statistics as
    ``<recipe>.<rounding>-<key>.safetensors`` (key: quantization config, ranges, reconstruction settings)."""
    from .calib.reconstruct import ReconConfig, reconstruct, save_weights
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
    from .calib.reconstruct import _rows
    out, groups = [], []
    for x, t, cond in batches:
        gi = group_index(t, t_ranges)
        for k in torch.unique(gi).tolist():
            (xk, tk), ck = _rows(((x, t), cond), torch.nonzero(gi == k).flatten(), len(t))
            out.append((xk, tk, ck))
            groups.append(k)
    return out, groups


def fake_quant_unet(loaded: LoadedModel, qcfg: QuantConfig, ranges: RangeSet, *,
                    fold_weights: bool = False, weights: Path | None = None) -> torch.nn.Module:
    """A fake-quant copy of the UNet with ``ranges`` applied and checked. For groups=K ranges the first
    group's values are applied; ``grouped_denoiser`` switches groups by timestep.

    ``fold_weights``: store each weight already fake-quantized and disable its weight quantizer
    (ModelOpt's ``fold_weight``), so sampling does not re-quantize the weights on every call. The
    outputs are bit-identical; the model can then no longer be exported (the weight Q/DQ are gone), so
    evaluation uses it and export does not."""
    if qcfg.fp_from_t is not None:
        raise ValueError("a config with --keep-fp-from-t is two models (one per timestep segment): use segment_unets")
    return _finish(quantize_model(copy.deepcopy(loaded.unet), qcfg), qcfg, ranges, fold_weights, weights)


def _finish(qunet: torch.nn.Module, qcfg: QuantConfig, ranges: RangeSet, fold_weights: bool,
            weights: Path | None) -> torch.nn.Module:
    apply_ranges(qunet, ranges.amax(0))
    if qcfg.rounding != "nearest":
        if weights is None:
            raise ValueError(f"rounding {qcfg.rounding!r} needs the reconstructed weights (calibrate's weights_path)")
        from .calib.reconstruct import apply_weights, load_weights
        apply_weights(qunet, load_weights(weights))
    if fold_weights:
        import modelopt.torch.quantization as mtq
        mtq.fold_weight(qunet)
    return qunet


@dataclass
class Segment:
    """The fake-quant model of the timesteps ``t_range`` ((t_max, t_min); None: every step) and its ranges."""
    t_range: tuple[int, int] | None
    qcfg: QuantConfig
    unet: torch.nn.Module
    ranges: RangeSet


def segment_unets(loaded: LoadedModel, qcfg: QuantConfig, ranges: RangeSet, *, fold_weights: bool = False,
                  weights: Path | None = None) -> list[Segment]:
    """``fake_quant_unet`` per timestep segment of ``qcfg`` (``QuantConfig.segments``): one model, or with
    ``fp_from_t`` the noisy steps' (``noisy_fp`` layers unquantized, their ranges dropped) and the other steps',
    each with the range groups of its timesteps (``RangeSet.clip``)."""
    out = []
    for t_range, q in qcfg.segments(int(loaded.scheduler_config["num_train_timesteps"])):
        qunet = quantize_model(copy.deepcopy(loaded.unet), q)
        r = ranges.subset(range_names(qunet, q)).clip(*t_range) if t_range is not None else ranges
        out.append(Segment(t_range, q, _finish(qunet, q, r, fold_weights, weights), r))
    return out


def fake_quant_denoiser(loaded: LoadedModel, qcfg: QuantConfig, ranges: RangeSet, *, weights: Path | None = None,
                        stack: contextlib.ExitStack):
    """(denoiser, describe) of the fake-quant model on the CPU: its range groups switched by t
    (``grouped_denoiser``), its segments too (``fp_from_t``); runners entered on ``stack``."""
    from .runners import TorchRunner, as_denoiser, switched_denoiser
    segs = segment_unets(loaded, qcfg, ranges, fold_weights=True, weights=weights)
    fns, runner = [], None
    for s in segs:
        runner = stack.enter_context(TorchRunner(s.unet, device="cpu", dtype=torch.float32, name="fakequant"))
        fns.append(grouped_denoiser(s.unet, s.ranges) if s.ranges.is_grouped else as_denoiser(runner))
    describe = {"runner": runner.name, "groups": len(ranges.groups)}
    if len(segs) == 1:
        return fns[0], describe
    return switched_denoiser(fns, [s.t_range for s in segs]), {**describe, "t_ranges": [s.t_range for s in segs]}


def grouped_denoiser(qunet: torch.nn.Module, ranges: RangeSet):
    """Denoiser over a fake-quant UNet whose ranges are per timestep group (groups=K): each row is run with the
    range set of the group holding its timestep (the torch analogue of K engines switched by t; a batch with
    rows in several groups is split by group)."""
    bounds = ranges.t_ranges
    if bounds is None:
        raise ValueError("grouped_denoiser needs groups=K ranges; pooled ranges are one fake-quant model")
    current: list[int] = [-1]
    use = range_switch(qunet, ranges)

    def run(k: int, x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        if k != current[0]:
            use(k)
            current[0] = k
        with torch.no_grad():
            return qunet(x, t, **extra).sample

    def denoiser(x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        return split_by_group(x, t, extra, group_index(t, bounds), run)

    return denoiser


def layer_sensitivity(loaded: LoadedModel, spec: CalibSpec, recipe: str, *, cache_root: Path = DEFAULT_CACHE_ROOT,
                      weight_bits: int = 8, n: int = 64, batch_size: int = 64, progress: bool = True) -> list[dict]:
    """Per-layer sensitivity: quantize ONE layer at a time (input + weights, ranges from ``recipe`` with
    no layer excluded), everything else FP, and measure the noise-prediction error on ``n`` calibration
    samples: relative MSE = mean (eps_q - eps_fp)^2 / mean eps_fp^2. Sorted, most sensitive first."""
    qcfg = QuantConfig(weight_bits=weight_bits, exclude=())
    res = calibrate(loaded, spec, qcfg, recipe, cache_root=cache_root, batch_size=batch_size, progress=progress)
    qunet = fake_quant_unet(loaded, qcfg, res.ranges)
    layers = quantized_layers(qunet)
    schedule = Schedule.from_config(loaded.scheduler_config)
    small = dataclasses.replace(spec, n=min(n, spec.n), seed=spec.seed + 1)  # held-out trajectories
    calib, _ = fp_calibration_set(loaded, small, batch_size=batch_size, progress=False)
    with torch.no_grad():
        ref = torch.cat([loaded.unet(x, t, **c).sample for x, t, c in calib.batches(batch_size)])
    for m in layers.values():
        m.input_quantizer.disable()
        m.weight_quantizer.disable()
    rows = []
    from tqdm.auto import tqdm
    with torch.no_grad():
        for name, m in tqdm(layers.items(), desc="sensitivity", unit="layer", disable=not progress):
            m.input_quantizer.enable()
            m.weight_quantizer.enable()
            out = torch.cat([qunet(x, t, **c).sample for x, t, c in calib.batches(batch_size)])
            m.input_quantizer.disable()
            m.weight_quantizer.disable()
            rel = float((out - ref).double().square().mean() / ref.double().square().mean())
            rows.append({"layer": name, "rel_mse": rel, "type": type(m).__name__.removeprefix("Quant")})
    rows.sort(key=lambda r: -r["rel_mse"])
    return rows


def block_of(layer: str) -> str:
    """The block a layer belongs to: ``down_blocks.i.resnets.j`` / ``.attentions.j`` / ``.downsamplers.0`` (and
    ``up_blocks`` alike), ``mid_block.resnets.j``; other layers (``conv_in``, ``time_embedding``) by their first part."""
    parts = layer.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4:
        return ".".join(parts[:4])
    if parts[0] == "mid_block" and len(parts) > 3:
        return ".".join(parts[:3])
    return parts[0]


def layer_macs(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, int]:
    """Multiply-accumulates of every convolution and linear layer of ``unet`` for one row (``x`` of batch 1)."""
    macs: dict[str, int] = {}

    def hook(name):
        def f(m, _inp, out):
            if isinstance(m, torch.nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
                macs[name] = out.numel() * k
            else:
                macs[name] = out.numel() * m.in_features
        return f

    hooks = [m.register_forward_hook(hook(n)) for n, m in unet.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            unet(x, t, **cond)
    finally:
        for h in hooks:
            h.remove()
    return macs


def block_sensitivity(loaded: LoadedModel, spec: CalibSpec, qcfg: QuantConfig, recipe: str, *,
                      cache_root: Path = DEFAULT_CACHE_ROOT, n: int = 64, batch_size: int = 64,
                      cumulative: int = 4, progress: bool = True) -> dict:
    """Which blocks to keep in high precision: the model quantized as ``qcfg`` and ``recipe`` say (its timestep
    groups applied by timestep, its exclusions kept), then one block at a time kept in FP (leave-one-out), and
    the error of the prediction the sampler uses, on ``n`` held-out calibration samples: with guidance the guided
    eps_u + w (eps_c - eps_u), whose error is not the per-half error the per-layer report measures. Relative MSE
    vs FP overall and at the data end (t < T/10), with each block's share of the convolution and linear MACs; then
    the first 2 .. ``cumulative`` blocks of that ranking kept in FP together ("together"); and the error with only
    the weights or only the activations quantized ("weights_only", "activations_only"), and in each of those first
    blocks, the share removed by its weights alone or its activations alone in FP."""
    res = calibrate(loaded, spec, qcfg, recipe, cache_root=cache_root, batch_size=batch_size, progress=progress)
    qunet = fake_quant_unet(loaded, qcfg, res.ranges, weights=res.weights_path)
    small = dataclasses.replace(spec, n=min(n, spec.n), seed=spec.seed + 1)  # held-out trajectories
    calib, guidance = fp_calibration_set(loaded, small, batch_size=batch_size, progress=False)
    groups = (group_index(calib.t, res.ranges.t_ranges) if res.ranges.is_grouped
              else torch.zeros(len(calib.t), dtype=torch.int64))

    def predict(unet: torch.nn.Module, k: int | None = None) -> torch.Tensor:
        den = cfg_denoiser(unet_denoiser(unet), guidance)
        rows = torch.arange(len(calib.t)) if k is None else torch.nonzero(groups == k).flatten()
        with torch.no_grad():
            return torch.cat([den(calib.x[r], calib.t[r], **{c: v[r] for c, v in calib.cond.items()})
                              for r in rows.split(batch_size)])

    # learned rounding stores its weights already on the grid: a layer kept in FP gets its FP weights back
    fp_weights: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # id(weight quantizer) -> (layer, FP weight)
    if qcfg.rounding != "nearest":
        fp_layers = dict(loaded.unet.named_modules())
        fp_weights = {id(m.weight_quantizer): (m, fp_layers[name].weight.detach()) for name, m in qunet.named_modules()
                      if hasattr(m, "weight_quantizer")}

    def quantized_prediction(disabled: list) -> torch.Tensor:
        out = torch.empty_like(calib.x)
        swapped = [fp_weights[id(q)] for q in disabled if id(q) in fp_weights]
        rounded = [layer.weight.data for layer, _ in swapped]
        for layer, w in swapped:
            layer.weight.data = w
        try:
            for k in torch.unique(groups).tolist():
                apply_ranges(qunet, res.ranges.amax(k))  # with every quantizer enabled: it checks the names
                for q in disabled:
                    q.disable()
                try:
                    out[groups == k] = predict(qunet, k)
                finally:
                    for q in disabled:
                        q.enable()
        finally:
            for (layer, _), w in zip(swapped, rounded):
                layer.weight.data = w
        return out

    ref = predict(loaded.unet)
    end = calib.t < Schedule.from_config(loaded.scheduler_config).num_train_timesteps // 10

    def errors(disabled: list, full: float | None = None) -> dict:
        """Relative MSE vs FP with ``disabled`` quantizers off, at the data end, and the share of ``full`` removed."""
        d = (quantized_prediction(disabled) - ref).double().square()
        rel = float(d.mean() / ref.double().square().mean())
        rel_end = float(d[end].mean() / ref[end].double().square().mean()) if end.any() else None
        removed = None if full is None else (1 - rel / full if full > 0 else 0.0)
        return {"rel_mse": rel, "rel_mse_data_end": rel_end, "removed": removed}

    quantizers: dict[str, list] = {}
    weight_qs: set[int] = set()  # ids of the weight quantizers (the rest quantize activations)
    layers = quantized_layers(qunet)
    for name, m in qunet.named_modules():
        if type(m).__name__ == "TensorQuantizer" and m.is_enabled:
            owner = name.rsplit(".", 1)[0]
            quantizers.setdefault(block_of(owner), []).append(m)
            if name.endswith("weight_quantizer"):
                weight_qs.add(id(m))

    def of_kind(qs: list, weights: bool) -> list:
        return [q for q in qs if (id(q) in weight_qs) == weights]
    macs = layer_macs(loaded.unet, calib.x[:1], calib.t[:1], {c: v[:1] for c, v in calib.cond.items()})
    total = sum(macs.values())
    full = errors([])
    rows = []
    from tqdm.auto import tqdm
    for block, qs in tqdm(sorted(quantizers.items()), desc="block sensitivity", unit="block", disable=not progress):
        names = [n for n in layers if block_of(n) == block]
        rows.append({"block": block, "layers": len(names), "macs_share": sum(macs.get(n, 0) for n in names) / total,
                     **errors(qs, full["rel_mse"])})
    rows.sort(key=lambda r: -r["removed"])
    together = []  # errors do not add up: the first k blocks of the ranking kept in FP together
    for k in range(2, min(cumulative, len(rows)) + 1):
        top = rows[:k]
        together.append({"blocks": [r["block"] for r in top], "macs_share": sum(r["macs_share"] for r in top),
                         **errors([q for r in top for q in quantizers[r["block"]]], full["rel_mse"])})
    # Weights or activations? The error with only one kind quantized, over the model and in each of the first
    # blocks of the ranking (the share of the error removed by that block's weights / activations alone in FP):
    # int8 weights with int16 or FP16 activations (or the reverse) is a different deployment question.
    every = [q for qs in quantizers.values() for q in qs]
    kinds = {"weights_only": errors(of_kind(every, False), full["rel_mse"]),
             "activations_only": errors(of_kind(every, True), full["rel_mse"])}
    for r in rows[:cumulative]:
        r["removed_by_weights"] = errors(of_kind(quantizers[r["block"]], True), full["rel_mse"])["removed"]
        r["removed_by_activations"] = errors(of_kind(quantizers[r["block"]], False), full["rel_mse"])["removed"]
    return {"recipe": recipe, "guidance_scale": guidance.scale, "n": len(calib.t), "rel_mse": full["rel_mse"],
            "rel_mse_data_end": full["rel_mse_data_end"], **kinds,
            "quantized_macs_share": sum(macs.get(n, 0) for n in layers) / total, "blocks": rows, "together": together}
