"""The export report and the engine sidecar as types (written through ``trt_dm.core.io``'s atomic writers).

- ``ExportReport``: what an export wrote and checked (``<onnx>.json``).
- ``Sidecar``: what an engine was built by, for and from (``<plan>.json``); ``Sidecar.problems`` and
  ``check_sidecar`` refuse an engine that does not fit the runtime's TensorRT flavour and version, the GPU or its
  own plan file.

Nothing here imports the rest of trt_dm but ``core``: the runtime can load engines without the builder or modelopt.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from trt_dm.core.flavour import EngineError, Flavour, get_flavour
from trt_dm.core.io import sha256_file, write_json

log = logging.getLogger(__name__)

SIDECAR_VERSION = 2  # 2: + the input signature


# ---- export report and engine sidecar -----------------------------------------------------------------------

def _from_dict(cls, d: Mapping[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        log.debug("%s: ignoring unknown keys %s", what, unknown)
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except TypeError as e:
        raise ValueError(f"{what}: {e}") from None


@dataclass
class ExportReport:
    """``<onnx>.json``: one exported graph (one per timestep group) and what was checked on it."""
    onnx: str                      # file name of the graph an engine is built from / a runtime runs
    target: str                    # deployment target name ("tensorrt", "ort-cpu")
    int8: bool                     # quantized graph (Q/DQ) or the unquantized baseline
    precision: str = "fp32"        # the non-quantized math: fp16 (strongly typed TensorRT) or fp32
    model: str = ""
    model_fingerprint: str = ""
    schedule_fingerprint: str = ""
    recipe: str | None = None
    ranges: str | None = None      # ranges file
    calibration: str | None = None  # <data key>/<statistics key>
    quant: dict | None = None
    signature: dict | None = None  # trt_dm.core.signature.Signature.to_dict()
    quantized_layers: int = 0
    fp32_onnx: str | None = None
    layer_comparison_fp32: dict | None = None
    layer_comparison_fp16: dict | None = None
    layer_comparison_rows: list | None = None
    group: int | None = None
    groups: int | None = None
    t_range: list | None = None    # [t_max, t_min] of the group
    guidance_scale: float | None = None  # the classifier-free guidance it was calibrated with (conditional models)
    text_pipeline: dict | None = None  # text-to-image: the text encoder and VAE it was calibrated with (paths, sha256)
    violations: list = field(default_factory=list)
    export_seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # target-specific facts (e.g. ONNX Runtime's fused int8 ops)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None}

    def save(self, onnx_path: str | os.PathLike) -> Path:
        return write_json(Path(f"{onnx_path}.json"), self.to_dict())

    @classmethod
    def load(cls, onnx_path: str | os.PathLike) -> ExportReport | None:
        """The report next to an ONNX file, or None when there is none. The FP32 Q/DQ graph of an FP16 export
        (``X.fp32.onnx``) has the report of ``X.onnx`` when that names it as its ``fp32_onnx``."""
        p, name = Path(f"{onnx_path}.json"), Path(onnx_path).name
        twin = name.endswith(".fp32.onnx") and not p.is_file()
        if twin:
            p = Path(onnx_path).with_name(name.removesuffix(".fp32.onnx") + ".onnx.json")
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: export report is not valid JSON ({e})") from None
        if twin:
            if d.get("fp32_onnx") != name:
                return None
            d.update(onnx=name, precision="fp32")
        d.setdefault("onnx", Path(onnx_path).name)
        d.setdefault("target", "tensorrt")
        d.setdefault("int8", d.get("recipe") is not None)
        return _from_dict(cls, d, str(p))


def sidecar_path(plan: str | os.PathLike) -> Path:
    return Path(f"{plan}.json")


@dataclass
class Sidecar:
    """``<plan>.json``: the TensorRT flavour / version, the GPU or RTX targets, the files' hashes, the recipe and
    calibration, the input signature and profile shapes, and the builder's layer precisions."""
    flavour: str
    trt_version: str
    plan_sha256: str
    onnx: str = ""
    onnx_sha256: str = ""
    onnx_data_sha256: str | None = None  # a graph in the external-data layout: its <name>.data
    plan_bytes: int = 0
    precision: str = "int8"        # "int8" (Q/DQ graph) or "fp16"
    sidecar_version: int = SIDECAR_VERSION
    gpu: str | None = None
    compute_capability: str | None = None
    rtx_targets: list = field(default_factory=list)
    recipe: str | None = None
    calibration: str | None = None
    inputs: dict = field(default_factory=dict)     # {name: {min, opt, max, dtype}}
    signature: dict | None = None
    build_options: dict = field(default_factory=dict)
    strongly_typed: bool = True
    build_seconds: float = 0.0
    layer_precisions: dict = field(default_factory=dict)
    layer_precisions_for: str | None = None
    model_fingerprint: str | None = None
    group: int | None = None
    groups: int | None = None
    t_range: list | None = None
    guidance_scale: float | None = None  # guided sampling: each image takes 2 rows of the batch profile
    text_pipeline: dict | None = None  # text-to-image: the text encoder and VAE it was calibrated with

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, plan: str | os.PathLike) -> Path:
        return write_json(sidecar_path(plan), self.to_dict(), indent=2)

    @classmethod
    def load(cls, plan: str | os.PathLike) -> Sidecar:
        side = sidecar_path(plan)
        if not Path(plan).is_file():
            raise FileNotFoundError(f"{plan}: no such engine file")
        if not side.is_file():
            raise EngineError(f"{plan} has no sidecar {side.name}: build engines with `trt-dm build` so their "
                              "TensorRT version, GPU and inputs are recorded")
        try:
            d = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{side}: not valid JSON ({e})") from None
        try:
            return _from_dict(cls, d, str(side))
        except ValueError as e:
            raise EngineError(f"{side}: not an engine sidecar ({e})") from None

    def problems(self, *, flavour: str | Flavour, trt_version: str, compute_capability: str | None) -> list[str]:
        """Why this engine does not fit the runtime (``flavour``, ``trt_version``) and GPU (``compute_capability``
        like "8.9"; None = no GPU check); empty when it fits."""
        fl = get_flavour(flavour)
        out = []
        if self.flavour != fl.name:
            out.append(f"built with {self.flavour}, loaded with {fl.name}")
        if self.trt_version != trt_version:
            out.append(f"built by {self.flavour} {self.trt_version}, this runtime is {trt_version} "
                       "(engines are not portable across versions: rebuild)")
        if compute_capability is not None:
            out += self._gpu_problems(fl, compute_capability)
        return out

    def _gpu_problems(self, fl: Flavour, compute_capability: str) -> list[str]:
        """Why this engine does not fit a GPU of ``compute_capability``: not in its compute-capability targets, or
        (built on a GPU) another compute capability than that GPU's."""
        if fl.compute_targets:
            sm = "SM" + compute_capability.replace(".", "")
            if self.rtx_targets and sm not in self.rtx_targets:
                return [f"built for {fl.title} targets {self.rtx_targets}, this GPU is {sm}"]
        elif self.compute_capability not in (None, compute_capability):
            return [f"built for {self.gpu} (compute capability {self.compute_capability}), "
                    f"this GPU has compute capability {compute_capability}"]
        return []


def check_sidecar(plan: str | os.PathLike, *, flavour: str | Flavour, trt_version: str, compute_capability: str | None,
                  check_hash: bool = True) -> Sidecar:
    """The plan's sidecar; raises ``EngineError`` naming both sides when the engine does not fit this runtime
    and GPU, or its plan file is not the one built."""
    meta = Sidecar.load(plan)
    problems = meta.problems(flavour=flavour, trt_version=trt_version, compute_capability=compute_capability)
    if check_hash:
        actual = sha256_file(plan)
        if actual != meta.plan_sha256:
            problems.append(f"plan file sha256 {actual[:16]}… does not match the sidecar's "
                            f"{str(meta.plan_sha256)[:16]}… (file replaced or damaged)")
    if problems:
        raise EngineError(f"{plan}: " + "; ".join(problems))
    return meta
