"""What an export is given and gives back (``ExportJob``, ``Exported``), and the file names of a deployment's graphs."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from trt_dm.core.artifacts import ExportReport
from trt_dm.quant.config import DEFAULT_EXCLUDE


@dataclass(frozen=True)
class Exported:
    """One deployable graph (one per timestep group) and its report."""
    onnx: Path
    report: ExportReport


@dataclass(frozen=True)
class ExportJob:
    """Everything an export needs: the model, its quantization and calibration, and where files go."""
    loaded: object        # trt_dm.models.LoadedModel
    qcfg: object          # trt_dm.quant.QuantConfig
    calib: object         # trt_dm.calibrate.CalibrationResult
    recipe: str
    spec: object          # trt_dm.calib.trajectories.CalibSpec (targets that draw more calibration data)
    out_dir: Path
    batch_size: int = 64
    precision: str = "fp16"   # non-quantized math of the deployed graph (targets that have the choice)
    options: dict | None = None  # target-specific options (e.g. ort-cpu's "ops")


def recipe_slug(recipe: str) -> str:
    """A recipe spec as a file-name part: 'mse:2.4@groups=4' -> 'mse2.4_groups4'."""
    return recipe.replace("@", "_").replace(":", "").replace("=", "")


def graph_stem(model_name: str, recipe: str, qcfg=None) -> str:
    """File-name stem of a deployment's graphs and engines: '<model>-<recipe slug>', with '-fp8' for FP8 (E4M3),
    '-mix<hash>' for a format mix (its FP8 layers), '-w4' for W4A8 ('-w<bits>'),
    '-wmse' for MSE-searched weight ranges, '-ada' for learned rounding ('-act' with learned input ranges, '-temb' with
    the time-embedding projections reconstructed on their own), '-w8<hash>' when some layers keep 8-bit weights,
    '-fp<hash>' when other layers than the default stay in FP ('-fp<hash>-t<T>': at the steps t >= T only),
    '-sq<alpha>' with channel balancing ('-sq<alpha><hash>' for some layers only), so that no two configurations
    overwrite each other's files."""
    bits, fmt = getattr(qcfg, "weight_bits", 8), getattr(qcfg, "format", "int8")
    parts = [f"-{fmt}" if fmt != "int8" else "", f"-w{bits}" if bits != 8 else "",
             "-wmse" if getattr(qcfg, "weight_calib", "max") == "mse" else ""]
    if getattr(qcfg, "rounding", "nearest") != "nearest":
        parts.append("-ada" + ("-act" if getattr(qcfg, "recon_act_iters", 0) else "")
                     + ("-temb" if getattr(qcfg, "recon_temb", "block") != "block" else ""))
    fp8 = getattr(qcfg, "fp8_layers", ())
    if fp8:  # '-mix<hash>': which layers of an int8 model are FP8
        parts.append("-mix" + hashlib.sha256("\0".join(fp8).encode()).hexdigest()[:6])
    w8 = getattr(qcfg, "w8_layers", ())
    if w8:  # '-w8<hash>': which layers keep 8-bit weights
        parts.append("-w8" + hashlib.sha256("\0".join(w8).encode()).hexdigest()[:6])
    exclude, noisy = tuple(getattr(qcfg, "exclude", DEFAULT_EXCLUDE)), tuple(getattr(qcfg, "noisy_fp", ()))
    if exclude != DEFAULT_EXCLUDE or noisy:  # '-fp<hash>': which layers stay in FP ('-t<T>': at t >= T only)
        parts.append("-fp" + hashlib.sha256("\0".join(exclude + ("|",) + noisy).encode()).hexdigest()[:6]
                     + (f"-t{qcfg.fp_from_t}" if noisy else ""))
    smooth = getattr(qcfg, "smooth", 0.0)
    if smooth:  # '-sq<alpha>[<hash>]': channel balancing, and which layers when not all
        layers = tuple(getattr(qcfg, "smooth_layers", ()))
        parts.append(f"-sq{smooth:g}" + (hashlib.sha256("\0".join(layers).encode()).hexdigest()[:6] if layers else ""))
    return f"{model_name}-{recipe_slug(recipe)}" + "".join(parts)
