"""Deployment, end to end: calibrate (cached) -> the target's checked graphs -> its engines, with the wall time and
peak memory of every stage (`trt-dm export` / `trt-dm engine`, ``trt_dm.api.deploy``)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from trt_dm.core.flavour import EngineError, Flavour, trt_module
from trt_dm.core.io import atomic_write
from trt_dm.core.stages import recording, release_memory, stage
from trt_dm.export.job import ExportJob, graph_stem
from trt_dm.models.loading import LoadedModel
from trt_dm.quant.calib.ranges import get_recipe
from trt_dm.quant.calibrate import calib_conditioning, calibrate_settings
from trt_dm.quant.config import QuantSettings
from trt_dm.targets import get_target
from trt_dm.targets.trt_builder import for_format


@dataclass
class DeployResult:
    """What `trt-dm export` / `trt-dm engine` produced: the calibration, the checked graphs, and (engine) the
    engines' sidecars, or why no engine was built."""
    calibration: Any
    graphs: list            # trt_dm.export.job.Exported
    sidecars: list = field(default_factory=list)
    not_built: str | None = None  # why no engine was built (no TensorRT here), when build was asked for
    usage: str = ""
    stages: list = field(default_factory=list)  # wall time and peak RSS per stage (trt_dm.core.stages)
    stages_path: Path | None = None


def deploy(loaded: LoadedModel, quant: QuantSettings, *, out_dir: Path = Path("engines"), **kw) -> DeployResult:
    """Calibrate (cached) -> the target's checked graphs -> with ``build``, the target's engines (plus the
    unquantized baseline when the target has one). The target refuses what it cannot express before any work.
    ``precision``: the graph's non-quantized math (default: the target's, fp16 for TensorRT, fp32 for OpenVINO).
    ``release``: free what the later stages do not read, as soon as they are done (the text encoders and VAE after
    the calibration, the UNet's weights before the builds, which read the ONNX files): ``loaded`` cannot sample or
    export again afterwards (the command line, whose process ends with the run). Wall time and peak memory of every stage are in ``result.stages`` and ``<out_dir>/<model>-<recipe>.stages.json``."""
    q = quant.resolved(loaded, kw.get("target", "tensorrt"))
    path = Path(out_dir) / f"{graph_stem(loaded.name, q.recipe, q.qcfg)}.stages.json"

    def write(rows, error=None):  # after every stage, and when one fails: how far it got and what it cost
        atomic_write(path, json.dumps({"model": str(loaded.source), "recipe": q.recipe, "threads": torch.get_num_threads(),
                                       "stages": rows, **({"error": error} if error else {})}, indent=2).encode())

    with recording(on_stage=write) as log:
        try:
            result = _deploy(loaded, q, out_dir=out_dir, **kw)
        except Exception as e:
            if log.rows:
                write(log.rows, f"{type(e).__name__}: {e}")
            raise
    result.stages, result.stages_path = log.rows, path
    return result


def _deploy(loaded: LoadedModel, quant: QuantSettings, *, target: str = "tensorrt", out_dir: Path = Path("engines"),
            precision: str | None = None, options: dict | None = None, build: bool = False, baseline: bool = True,
            build_options=None, flavour: str | Flavour | None = None, progress: Callable[[str], None] = print,
            show_progress: bool = True, release: bool = False) -> DeployResult:
    """``deploy`` without the stage recording."""
    tgt = get_target(target)
    precision = precision or getattr(tgt, "default_precision", "fp16")
    quant = quant.resolved(loaded, target)
    tgt.check(quant.qcfg, get_recipe(quant.recipe), options)
    if build and build_options is not None:  # bad profiles; FP8 to targets without it: refused before any work
        build_options.validate()
        build_options = for_format(build_options, "fp8" if quant.qcfg.uses_fp8 else "int8")
    seq_len = loaded.seq_len
    if quant.spec.prompts is None:  # labels or an embeddings file: checked (and read) before any work
        cond, guidance = calib_conditioning(loaded, quant.spec)
        if "encoder_hidden_states" in cond:
            seq_len = int(cond["encoder_hidden_states"].shape[1])
    else:  # (prompts are encoded once, by the calibration itself)
        guidance = loaded.guidance(quant.spec.guidance_scale, quant.spec.guidance_rescale,  # refuse before any work
                                   negative_prompt=quant.spec.negative_prompt, interval=quant.spec.guidance_interval)
    if build_options is not None:
        build_options = _sized_profiles(guidance, build_options, progress, seq_len)
    calib = _calibrate(loaded, quant, progress, show_progress)
    if release and loaded.text is not None:
        loaded.text.release()  # prompts are encoded; the sidecar keeps the encoders' paths and sha256
    job = ExportJob(loaded=loaded, qcfg=quant.qcfg, calib=calib, recipe=quant.recipe, spec=quant.spec,
                    out_dir=Path(out_dir), batch_size=quant.batch, precision=precision, options=options)
    with stage("export"):
        graphs = tgt.export(job, progress)
    result = DeployResult(calib, graphs, usage=tgt.usage([g.onnx for g in graphs]))
    if build and tgt.builds:
        _build(tgt, loaded, result, out_dir=Path(out_dir), precision=precision, baseline=baseline,
               build_options=build_options, flavour=flavour, progress=progress, release=release)
    return result


def _sized_profiles(guidance, build_options, progress: Callable[[str], None], seq_len: int | None):
    """The engine profiles for this model: its text encoder's (or embeddings file's) sequence length, and with
    guidance 2 UNet rows per image (a guided step is one UNet call of both halves)."""
    if seq_len is not None:
        build_options = dataclasses.replace(build_options, seq_len=(seq_len,) * 3)
    if guidance.active:
        o = build_options
        build_options = dataclasses.replace(o, min_batch=2 * o.min_batch, opt_batch=2 * o.opt_batch,
                                            max_batch=2 * o.max_batch)
        progress(f"guidance {guidance.scale:g}: engine profiles sized for 2 UNet rows per image "
                 f"(batch {build_options.min_batch}..{build_options.max_batch})")
    return build_options


def _calibrate(loaded: LoadedModel, quant: QuantSettings, progress: Callable[[str], None], show_progress: bool):
    """The calibration (statistics cached), said in one line: recipe, ranges, and how the statistics were had."""
    with stage("calibration"):
        calib = calibrate_settings(loaded, quant, progress=show_progress)
    how = ("reused from cache" if calib.stats_reused else
           f"collected in {calib.seconds_collect:.1f} s: FP trajectories {calib.seconds_trajectories:.1f} s + "
           f"statistics pass {calib.seconds_collect - calib.seconds_trajectories:.1f} s")
    progress(f"calibration: recipe {quant.recipe}, {len(calib.ranges)} activation ranges -> {calib.ranges_path} "
             f"(statistics {how})")
    if quant.qcfg.smooth:
        from trt_dm.quant.calib import smooth
        progress(f"channel balancing (alpha {quant.qcfg.smooth}): {len(smooth.load(calib.weights_path))} "
                 f"layers -> {calib.weights_path}")
    return calib


def _build(tgt, loaded: LoadedModel, result: DeployResult, *, out_dir: Path, precision: str, baseline: bool,
           build_options, flavour: str | Flavour | None, progress: Callable[[str], None], release: bool = False) -> None:
    """The target's engines of ``result.graphs`` (and the unquantized baseline's) into ``result``, or why none was
    built (no TensorRT here: ``result.not_built``)."""
    all_graphs = list(result.graphs)
    if baseline and hasattr(tgt, "export_baseline"):
        base = tgt.export_baseline(loaded, out_dir, precision=precision)
        progress(f"  {base.onnx}: unquantized baseline, checked")
        all_graphs.append(base)
    if release:  # the builds read the ONNX files: the torch weights (10 GB for SDXL) are not held through them
        loaded.unet.to("meta")
        release_memory()
    try:
        _, fl = trt_module(flavour)
    except EngineError as e:
        result.not_built = str(e)
        return
    with stage("build"):
        result.sidecars = tgt.build(all_graphs, build_options, flavour=fl, progress=progress)
    result.usage = tgt.usage([g.onnx.with_suffix(".plan") for g in result.graphs])
