"""The library API under the CLI: what `trt-dm` does, as functions with typed results that the CLI, the tools
and a server call. The CLI only turns arguments into these settings and prints.

    from trt_dm import api
    loaded = api.load("default")
    settings = api.SampleSettings(sampler="ddim", steps=50, n=16)
    with api.open_denoiser(loaded, engines=["engines/default-ptq4dm.plan"]) as den:   # or onnx=, openvino=, ranges=
        images, seconds = api.draw(loaded, den, settings)
    result = api.evaluate(loaded, settings, quant=api.QuantSettings(recipe="ptq4dm"))  # EvalResult
    made = api.deploy(loaded, api.QuantSettings(), target="tensorrt")   # default recipe, one graph: DeployResult

Loading a denoiser from artifacts (``open_denoiser``): torch FP, torch fake-quant (``ranges`` + ``qcfg``,
``groups=K`` ranges switched by timestep per row), one graph in ONNX Runtime or OpenVINO, one TensorRT engine, or
K of them for the K timestep groups of a ``groups=K`` recipe (their reports / sidecars carry each group's t range).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from trt_dm.core.ranges import RangeSet
from trt_dm.eval.runs import EvalResult, evaluate, fp_samples
from trt_dm.models.loading import LoadedModel, load_model
from trt_dm.quant.calibrate import calibrate_settings
from trt_dm.quant.config import QuantConfig, QuantSettings, default_recipe
from trt_dm.quant.fakequant import FakeQuant
from trt_dm.quant.search import FormatMix, FormatSearch
from trt_dm.quant.search import search_formats as _search_formats
from trt_dm.quant.sensitivity import block_sensitivity, layer_sensitivity
from trt_dm.runtime.open import Denoiser, PathsLike
from trt_dm.runtime.open import open_denoiser as runtime_open
from trt_dm.sampling import SampleSettings, conditioning, draw, schedule
from trt_dm.targets.deploy import DeployResult, deploy

# The API: the functions below, and these from the modules that hold them.
__all__ = ["load", "calibrate", "sensitivity", "open_denoiser", "SampleSettings", "QuantSettings", "default_recipe",
           "Denoiser", "draw", "conditioning", "schedule", "fp_samples", "EvalResult", "evaluate", "DeployResult",
           "deploy", "LoadedModel"]

log = logging.getLogger(__name__)


def load(spec: str = "default", *, allow_pickle: bool = False, threads: int | None = None) -> LoadedModel:
    """``trt_dm.models.load_model`` (see there), optionally setting torch's CPU threads first."""
    if threads:
        torch.set_num_threads(threads)
    return load_model(spec, allow_pickle=allow_pickle)


def calibrate(loaded: LoadedModel, quant: QuantSettings, *, progress: bool = True):
    """Statistics (cached per model, schedule and calibration set) -> ranges of ``quant.recipe``: a
    ``trt_dm.quant.calibrate.CalibrationResult`` whose ``ranges`` is a ``RangeSet``."""
    return calibrate_settings(loaded, quant, progress=progress)


def search_formats(loaded: LoadedModel, quant: QuantSettings, search: FormatSearch, *, progress: bool = True) -> FormatMix:
    """Each layer's format (int8, FP8 or FP16) under ``search``'s budget, from ``quant``'s W8A8 config, recipe and
    calibration set: ``trt_dm.quant.search.search_formats``. Deploy or evaluate the mix with its ``qcfg`` in place of
    ``quant.qcfg`` (``dataclasses.replace(quant, qcfg=mix.qcfg)``)."""
    q = quant.resolved(loaded)
    return _search_formats(loaded, q.spec, q.qcfg, q.recipe, search, cache_root=q.cache_root, batch_size=q.batch,
                           progress=progress)


def sensitivity(loaded: LoadedModel, quant: QuantSettings, *, by: str = "blocks", progress: bool = True):
    """Which layers to keep in high precision. ``by="blocks"``: ``trt_dm.calibrate.block_sensitivity`` (the model
    quantized as ``quant`` says, one block kept in FP at a time, the error of the prediction the sampler uses,
    guided under CFG); ``by="layers"``: ``layer_sensitivity`` (one layer quantized at a time, ``quant.recipe``'s
    ranges, nothing excluded)."""
    q = quant.resolved(loaded)
    if q.qcfg.fp_from_t is not None:
        raise ValueError("the sensitivity report ranks layers kept in FP at every step; --keep-fp-from-t is for "
                         "evaluation and deployment (eval --recipe, export, engine)")
    if by == "blocks":
        return block_sensitivity(loaded, q.spec, q.qcfg, q.recipe, cache_root=q.cache_root, batch_size=q.batch,
                                 progress=progress)
    if by == "layers":
        return layer_sensitivity(loaded, q.spec, q.recipe, cache_root=q.cache_root, weight_bits=q.qcfg.weight_bits,
                                 batch_size=q.batch, progress=progress)
    raise ValueError(f"sensitivity by {by!r}: accepted 'blocks' or 'layers'")


def open_denoiser(loaded: LoadedModel, *, engines: PathsLike = (), onnx: PathsLike = (), openvino: PathsLike = (),
                  ranges: RangeSet | None = None, qcfg: QuantConfig | None = None, weights: str | Path | None = None,
                  **options):
    """``trt_dm.runtime.open.open_denoiser`` for a loaded model: its TensorRT ``engines``, ONNX Runtime ``onnx`` or
    OpenVINO ``openvino`` graphs, its torch fake-quant model (``ranges`` [+ ``qcfg``, + ``weights``: reconstructed
    weights for ``qcfg.rounding`` other than nearest, the calibration's ``weights_path``]), or its FP UNet (none
    given); ``options`` as there (device, threads, cuda_graph, ov_precision, ov_cache_dir, ov_streams, ort_spin)."""
    source = None if ranges is None else FakeQuant(loaded, qcfg or QuantConfig(), ranges, weights)
    return runtime_open(engines=engines, onnx=onnx, openvino=openvino, torch_source=source, unet=loaded.unet,
                        **options)


