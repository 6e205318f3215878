"""The deployment-target interface: one small class per target (``trt_dm/targets/<name>.py``)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.artifacts import ExportReport


@dataclass
class Exported:
    """One deployable graph (one per timestep group) and its report."""
    onnx: Path
    report: ExportReport


@dataclass
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


class Target(ABC):
    """A deployment target. ``check`` runs before any calibration work; ``export`` writes checked graphs and
    reports; ``build`` turns them into what the target runs (engines), when it has a build step."""

    name: str = ""
    help: str = ""
    order: int = 50  # position in listings (the default target first)
    builds: bool = False  # has a build step (engines) after export

    def check(self, qcfg, recipe, options: dict | None = None) -> None:
        """Raise ValueError, before any work, for what this target cannot express (``recipe``: a Recipe;
        ``options``: the export job's)."""

    @abstractmethod
    def export(self, job: ExportJob, progress: Callable[[str], None] = print) -> list[Exported]: ...

    def build(self, graphs: list[Exported], options=None, *, flavour: str | None = None,
              progress: Callable[[str], None] = print) -> list:
        return []

    def usage(self, paths: list[Path]) -> str:
        """One line telling the user how to run what was produced."""
        return ""


def recipe_slug(recipe: str) -> str:
    """A recipe spec as a file-name part: 'mse:2.4@groups=4' -> 'mse2.4_groups4'."""
    return recipe.replace("@", "_").replace(":", "").replace("=", "")


def graph_stem(model_name: str, recipe: str, qcfg=None) -> str:
    """File-name stem of a deployment's graphs and engines: '<model>-<recipe slug>', with '-w4' for W4A8 ('-w<bits>'),
    '-wmse' for MSE-searched weight ranges, '-ada' for learned rounding ('-act' with learned input ranges, '-temb' with
    the time-embedding projections reconstructed on their own), '-w8<hash>' when some layers keep 8-bit weights,
    '-fp<hash>' when other layers than the default stay in FP ('-fp<hash>-t<T>': at the steps t >= T only), so that
    no two configurations overwrite each other's files."""
    bits = getattr(qcfg, "weight_bits", 8)
    parts = [f"-w{bits}" if bits != 8 else "", "-wmse" if getattr(qcfg, "weight_calib", "max") == "mse" else ""]
    if getattr(qcfg, "rounding", "nearest") != "nearest":
        parts.append("-ada" + ("-act" if getattr(qcfg, "recon_act_iters", 0) else "")
                     + ("-temb" if getattr(qcfg, "recon_temb", "block") != "block" else ""))
    import hashlib
    w8 = getattr(qcfg, "w8_layers", ())
    if w8:  # '-w8<hash>': which layers keep 8-bit weights
        parts.append("-w8" + hashlib.sha256("\0".join(w8).encode()).hexdigest()[:6])
    from ..quant import DEFAULT_EXCLUDE
    exclude, noisy = tuple(getattr(qcfg, "exclude", DEFAULT_EXCLUDE)), tuple(getattr(qcfg, "noisy_fp", ()))
    if exclude != DEFAULT_EXCLUDE or noisy:  # '-fp<hash>': which layers stay in FP ('-t<T>': at t >= T only)
        parts.append("-fp" + hashlib.sha256("\0".join(exclude + ("|",) + noisy).encode()).hexdigest()[:6]
                     + (f"-t{qcfg.fp_from_t}" if noisy else ""))
    return f"{model_name}-{recipe_slug(recipe)}" + "".join(parts)
