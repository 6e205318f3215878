"""Artifacts as types, and the one way to write them.

- ``atomic_write`` / ``sha256_file``: every writer in the package (statistics cache, ranges, ONNX reports,
  engines, sidecars, profiles) writes through ``atomic_write`` (temporary name, fsync, rename), so a crash
  never leaves a half-written file under the final name.
- ``RangeSet``: activation ranges (amax per quantizer) for one or K timestep groups. A pooled recipe is one
  group valid for every t; a ``groups=K`` recipe has K groups with their [t_min, t_max]. On disk it keeps the
  ranges JSON format of ``calib/ranges.py`` ({name: amax} or {name: [{t_max, t_min, amax}, ...]}).
- ``ExportReport``: what an export wrote and checked (``<onnx>.json``).
- ``Sidecar``: what an engine was built by, for and from (``<plan>.json``), and ``Sidecar.check`` which
  refuses an engine that does not fit the runtime, the GPU or its own plan file.
- ``trt_module``: which TensorRT flavour is importable (shared by the builder and the runtime).

Nothing here imports the rest of trt_dm: the runtime can load engines without the builder or modelopt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

FLAVOURS = ("tensorrt", "tensorrt_rtx")
SIDECAR_VERSION = 2  # 2: + the input signature


class EngineError(RuntimeError):
    """An engine cannot be built, or a built engine does not fit this runtime / GPU / file."""


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, fsync, then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | os.PathLike, doc: Any, indent: int = 1) -> Path:
    return atomic_write(path, (json.dumps(doc, indent=indent) + "\n").encode())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trt_module(flavour: str | None = None):
    """(module, flavour): ``flavour`` if given, else full TensorRT if importable, else TensorRT-RTX."""
    for name in ([flavour] if flavour else FLAVOURS):
        if name not in FLAVOURS:
            raise ValueError(f"unknown TensorRT flavour {name!r}; expected one of {FLAVOURS}")
        try:
            return importlib.import_module(name), name
        except ImportError as e:  # the tensorrt meta-package can exist without loadable libraries
            log.info("%s not usable: %s", name, e)
    raise EngineError(f"no TensorRT found ({' or '.join([flavour] if flavour else FLAVOURS)} not importable): "
                      "pip install tensorrt-rtx-cu13 (builds without a GPU), or install TensorRT 10/11 on a GPU machine")


# ---- ranges -----------------------------------------------------------------------------------------------

def _amax(name: str, v: Any) -> float:
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"amax of {name!r} must be finite and > 0, got {v!r}")
    return v


@dataclass(frozen=True)
class RangeGroup:
    """One range set: amax per quantizer name, valid for timesteps t_min..t_max (None: every t)."""
    amax: Mapping[str, float]
    t_max: int | None = None
    t_min: int | None = None


@dataclass(frozen=True)
class RangeSet:
    """Activation ranges for one (pooled) or K timestep groups (``groups=K`` recipes: K engines)."""
    groups: tuple[RangeGroup, ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a RangeSet needs at least one group")
        names = [sorted(g.amax) for g in self.groups]
        if any(n != names[0] for n in names):
            raise ValueError("every timestep group of a RangeSet must range the same quantizers")
        bounded = {g.t_max is not None for g in self.groups}
        if len(bounded) != 1 or (len(self.groups) > 1 and bounded != {True}):
            raise ValueError("a RangeSet has one unbounded group (pooled) or timestep bounds on every group")

    @classmethod
    def pooled(cls, amax: Mapping[str, float]) -> RangeSet:
        return cls((RangeGroup({n: _amax(n, v) for n, v in sorted(amax.items())}),))

    @classmethod
    def from_dict(cls, ranges: Mapping[str, Any]) -> RangeSet:
        """From the ranges JSON form: {name: amax} or {name: [{t_max, t_min, amax}, ...]} (all names alike)."""
        if not ranges:
            raise ValueError("no ranges: the recipe produced no quantizer ranges")
        grouped = {isinstance(v, list) for v in ranges.values()}
        if len(grouped) != 1:
            raise ValueError("ranges mix pooled values and timestep groups")
        if grouped == {False}:
            return cls.pooled(ranges)
        first = next(iter(ranges.values()))
        bounds = [(int(g["t_max"]), int(g["t_min"])) for g in first]
        for name, v in ranges.items():
            if [(int(g["t_max"]), int(g["t_min"])) for g in v] != bounds:
                raise ValueError(f"{name!r}: timestep groups {[(g['t_max'], g['t_min']) for g in v]} differ "
                                 f"from the other quantizers' {bounds}")
        return cls(tuple(RangeGroup({n: _amax(n, v[k]["amax"]) for n, v in sorted(ranges.items())}, t_max=hi, t_min=lo)
                         for k, (hi, lo) in enumerate(bounds)))

    def to_dict(self) -> dict[str, Any]:
        """The ranges JSON form (see ``from_dict``)."""
        if not self.is_grouped:
            return dict(self.groups[0].amax)
        return {n: [{"t_max": g.t_max, "t_min": g.t_min, "amax": g.amax[n]} for g in self.groups]
                for n in self.names}

    @property
    def is_grouped(self) -> bool:
        """True for ``groups=K`` recipes (even K = 1): one engine per group, switched by timestep."""
        return self.groups[0].t_max is not None

    @property
    def names(self) -> list[str]:
        return sorted(self.groups[0].amax)

    def __len__(self) -> int:
        return len(self.groups[0].amax)

    def amax(self, k: int = 0) -> dict[str, float]:
        """{quantizer: amax} of group ``k`` (the only one for pooled ranges)."""
        return dict(self.groups[k].amax)

    def subset(self, names: Sequence[str]) -> RangeSet:
        """The ranges of ``names`` only (same groups): a model with fewer quantized layers; a name without a
        range is an error."""
        missing = sorted(set(names) - set(self.names))
        if missing:
            raise ValueError(f"no ranges for {missing[:5]} ({len(missing)} quantizers)")
        return RangeSet(tuple(dataclasses.replace(g, amax={n: g.amax[n] for n in sorted(names)}) for g in self.groups))

    def clip(self, t_max: int, t_min: int) -> RangeSet:
        """The groups for the timesteps t_min..t_max only (a segment of a config whose precision changes with t):
        those overlapping it (else the nearest one), bounds cut to it, the first and last widened to its ends so
        that every t in it finds its group inside it; one group left comes back pooled (it holds for all of
        them). Pooled ranges are returned as they are."""
        if not self.is_grouped:
            return self
        keep = [g for g in self.groups if g.t_max >= t_min and g.t_min <= t_max]
        if not keep:
            mid = torch.tensor([(t_max + t_min) // 2])
            keep = [self.groups[int(group_index(mid, self.t_ranges)[0])]]
        if len(keep) == 1:
            return RangeSet.pooled(keep[0].amax)
        return RangeSet(tuple(dataclasses.replace(g, t_max=t_max if i == 0 else min(g.t_max, t_max),
                                                  t_min=t_min if i == len(keep) - 1 else max(g.t_min, t_min))
                              for i, g in enumerate(keep)))

    def widest(self) -> dict[str, float]:
        """{quantizer: the largest amax over the groups}."""
        return {n: max(g.amax[n] for g in self.groups) for n in self.names}

    @property
    def t_ranges(self) -> list[tuple[int, int]] | None:
        """(t_max, t_min) per group, or None for pooled ranges."""
        return [(g.t_max, g.t_min) for g in self.groups] if self.is_grouped else None


def group_index(t: torch.Tensor, t_ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Per row of ``t`` (B,), the index of the (t_max, t_min) group holding it, else of the nearest group."""
    t = t.reshape(-1).to("cpu", torch.int64)
    hi = torch.tensor([r[0] for r in t_ranges], dtype=torch.int64)
    lo = torch.tensor([r[1] for r in t_ranges], dtype=torch.int64)
    dist = torch.clamp(torch.maximum(lo[None, :] - t[:, None], t[:, None] - hi[None, :]), min=0)
    return dist.argmin(dim=1)  # first minimum: ties go to the earlier (noisier) group


def split_by_group(x: torch.Tensor, t: torch.Tensor, extra: dict, groups: torch.Tensor, call) -> torch.Tensor:
    """``call(k, x_k, t_k, **extra_k)`` for each group k present in ``groups`` (one index per row), outputs
    reassembled in row order; one group: one call on the whole batch, unsplit."""
    present = torch.unique(groups).tolist()
    if len(present) == 1:
        return call(present[0], x, t, **extra)
    out = None
    for k in present:
        rows = torch.nonzero(groups == k).flatten()
        part = call(k, x[rows.to(x.device)], t[rows.to(t.device)],
                    **{n: v[rows.to(v.device)] for n, v in extra.items()})
        if out is None:
            out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[rows.to(part.device)] = part
    return out


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

    def problems(self, *, flavour: str, trt_version: str, compute_capability: str | None) -> list[str]:
        """Why this engine does not fit the runtime (``flavour``, ``trt_version``) and GPU (``compute_capability``
        like "8.9"; None = no GPU check); empty when it fits."""
        out = []
        if self.flavour != flavour:
            out.append(f"built with {self.flavour}, loaded with {flavour}")
        if self.trt_version != trt_version:
            out.append(f"built by {self.flavour} {self.trt_version}, this runtime is {trt_version} "
                       "(engines are not portable across versions: rebuild)")
        if compute_capability is not None:
            if flavour == "tensorrt" and self.compute_capability not in (None, compute_capability):
                out.append(f"built for {self.gpu} (compute capability {self.compute_capability}), "
                           f"this GPU has compute capability {compute_capability}")
            if flavour == "tensorrt_rtx":
                sm = "SM" + compute_capability.replace(".", "")
                if self.rtx_targets and sm not in self.rtx_targets:
                    out.append(f"built for TensorRT-RTX targets {self.rtx_targets}, this GPU is {sm}")
        return out


def check_sidecar(plan: str | os.PathLike, *, flavour: str, trt_version: str, compute_capability: str | None,
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
