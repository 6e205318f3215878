"""Engine build for TensorRT 10.x / 11.x (``tensorrt``) and TensorRT-RTX (``tensorrt_rtx``), one code path.

    info = build_engine("engines/default-ptq4dm.fp16.onnx", "engines/default-ptq4dm.plan",
                        BuildOptions(min_batch=1, opt_batch=16, max_batch=64), recipe="ptq4dm")

Precision comes from the ONNX file: its Q/DQ nodes make the int8 layers and its FP16 tensors the half
ones (strongly typed networks: TensorRT >= 10 has the flag, TensorRT 11 and TensorRT-RTX are always
strongly typed). Only a TensorRT without strong typing (< 10) would get the INT8/FP16 builder flags.

An engine is written as ``<name>.plan`` plus ``<name>.plan.json`` (the sidecar): flavour and version of
TensorRT, the GPU and compute capability it was built for (TensorRT) or the compute-capability targets
(TensorRT-RTX, which builds ahead of time without a GPU), sha256 of the ONNX and of the plan, recipe,
calibration fingerprint, input shapes and the layer precisions the builder reported. ``check_sidecar``
refuses an engine whose sidecar does not match the runtime, GPU or file. Both files are written under
temporary names and renamed, sidecar first: a ``.plan`` exists only when its build finished.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .calib.stats import atomic_write

log = logging.getLogger(__name__)

FLAVOURS = ("tensorrt", "tensorrt_rtx")
SIDECAR_VERSION = 1


class EngineError(RuntimeError):
    """An engine cannot be built, or a built engine does not fit this runtime / GPU / file."""


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


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class BuildOptions:
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    seq_len: tuple[int, int, int] = (77, 77, 77)  # encoder_hidden_states sequence length (min, opt, max)
    opt_level: int = 3  # builder_optimization_level, 0..5
    timing_cache: str | None = None  # TensorRT only (a no-op in TensorRT-RTX)
    # TensorRT-RTX compute capabilities. Not SM75 by default: for Turing, TensorRT-RTX 1.7 keeps the convolutions
    # of our Q/DQ graphs in FP16 (measured from its layer report), so int8 would buy nothing there.
    rtx_targets: tuple[str, ...] = ("SM80", "SM86", "SM89", "SM120")
    workspace_mib: int | None = None

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/"
                             f"{self.opt_batch}/{self.max_batch}")
        if not 1 <= self.seq_len[0] <= self.seq_len[1] <= self.seq_len[2]:
            raise ValueError(f"sequence profile must satisfy 1 <= min <= opt <= max, got {self.seq_len}")
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"builder optimization level must be 0..5, got {self.opt_level}")


class _Logger:
    """A TensorRT ILogger subclass (made per module) that keeps messages for the precision report."""

    @staticmethod
    def make(trt, verbose: bool):
        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity, msg) -> None:
                self.messages.append(msg)
                if severity <= trt.ILogger.Severity.ERROR:
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING and verbose:
                    log.warning("TensorRT: %s", msg)
        return Logger()


def layer_precisions(messages: list[str]) -> dict[str, dict[str, int]]:
    """From the builder's detailed "Layers:" dump: {layer type: {input datatype: count}} for the compute
    layers (convolutions appear as 'correlation', matmuls as 'gemm'/'matmul'); the engine inspector
    needs a GPU, this does not."""
    out: dict[str, Counter] = {}
    for msg in messages:
        for line in msg.splitlines():
            m = re.match(r"Name: (.*?), LayerType: (\w+), Inputs: \[ \{ Name: [^,]*, Dimensions: [^\]]*\], "
                         r"Strides: [^\]]*\], StrideOrder: [^\]]*\], Datatype: (\w+)", line)
            if m and m.group(2) in ("correlation", "gemm", "matmul", "convolution"):
                out.setdefault(m.group(2), Counter())[m.group(3)] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def _gpu() -> dict:
    try:
        import torch
        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability()
            return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{cc[0]}.{cc[1]}"}
    except ImportError:
        pass
    return {"gpu": None, "compute_capability": None}


def sidecar_path(plan: str | os.PathLike) -> Path:
    return Path(f"{plan}.json")


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, options: BuildOptions | None = None, *,
                 flavour: str | None = None, recipe: str | None = None, calibration: str | None = None,
                 precision: str = "int8", extra: dict | None = None, verbose: bool = False) -> dict:
    """Parse ``onnx_path``, build, write ``plan_path`` and its sidecar atomically; return the sidecar dict."""
    options = options or BuildOptions()
    options.validate()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no such ONNX file")
    trt, flavour = trt_module(flavour)
    logger = _Logger.make(trt, verbose)
    logger.min_severity = trt.ILogger.Severity.VERBOSE
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{flavour} could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.builder_optimization_level = options.opt_level
    if not strongly_typed:  # TensorRT < 10: weakly typed, precision by flags
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.INT8)
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    targets: list[str] = []
    if flavour == "tensorrt_rtx":
        targets = list(options.rtx_targets)
        unknown = [t for t in targets if not hasattr(trt.ComputeCapability, t)]
        if unknown:
            known = [c for c in dir(trt.ComputeCapability) if c.startswith("SM")]
            raise ValueError(f"unknown TensorRT-RTX targets {unknown}; this version knows {known}")
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, t), i)
    cache = None
    if options.timing_cache and flavour == "tensorrt":
        blob = Path(options.timing_cache).read_bytes() if Path(options.timing_cache).exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = list(inp.shape)
        lo, mid, hi = list(dims), list(dims), list(dims)
        for axis, d in enumerate(dims):
            if d != -1:
                continue
            if axis == 0:
                lo[axis], mid[axis], hi[axis] = options.min_batch, options.opt_batch, options.max_batch
            elif axis == 1 and inp.name == "encoder_hidden_states":
                lo[axis], mid[axis], hi[axis] = options.seq_len
            else:
                raise EngineError(f"input {inp.name!r} has dynamic axis {axis} ({dims}); only batch and "
                                  "encoder_hidden_states' sequence may be dynamic")
        if inp.is_shape_tensor:
            raise EngineError(f"input {inp.name!r} is a shape tensor, which this builder does not support")
        profile.set_shape(inp.name, lo, mid, hi)
        shapes[inp.name] = {"min": lo, "opt": mid, "max": hi, "dtype": str(inp.dtype).split(".")[-1]}
    config.add_optimization_profile(profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        errors = [m for m in logger.messages if "error" in m.lower()][-10:]
        raise EngineError(f"{flavour} failed to build {onnx_path}:\n  " + "\n  ".join(errors))
    blob = memoryview(serialized).tobytes()

    sidecar = {"sidecar_version": SIDECAR_VERSION, "flavour": flavour, "trt_version": trt.__version__,
               **(_gpu() if flavour == "tensorrt" else {"gpu": None, "compute_capability": None}),
               "rtx_targets": targets, "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path),
               "plan_sha256": hashlib.sha256(blob).hexdigest(), "plan_bytes": len(blob), "precision": precision,
               "recipe": recipe, "calibration": calibration, "inputs": shapes, "build_options": asdict(options),
               "strongly_typed": strongly_typed, "build_seconds": round(seconds, 2),
               "layer_precisions": layer_precisions(logger.messages),
               # TensorRT-RTX prints one layer report, for its first target
               "layer_precisions_for": targets[0] if targets else "this GPU", **(extra or {})}
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    # sidecar first: a .plan appears only complete, and a stale sidecar never vouches for it (plan sha256)
    atomic_write(sidecar_path(plan_path), (json.dumps(sidecar, indent=2) + "\n").encode())
    atomic_write(plan_path, blob)
    if cache is not None:
        atomic_write(Path(options.timing_cache), memoryview(config.get_timing_cache().serialize()).tobytes())
    log.info("built %s with %s %s in %.1f s", plan_path, flavour, trt.__version__, seconds)
    return sidecar


def load_sidecar(plan_path: str | os.PathLike) -> dict:
    side = sidecar_path(plan_path)
    if not Path(plan_path).is_file():
        raise FileNotFoundError(f"{plan_path}: no such engine file")
    if not side.is_file():
        raise EngineError(f"{plan_path} has no sidecar {side.name}: build engines with `trt-dm build` so their "
                          "TensorRT version, GPU and inputs are recorded")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{side}: not valid JSON ({e})") from None


def check_sidecar(plan_path: str | os.PathLike, *, flavour: str, trt_version: str,
                  compute_capability: str | None, check_hash: bool = True) -> dict:
    """Raise ``EngineError`` naming both sides when the engine does not fit this runtime and GPU
    (``compute_capability`` like "8.9"; None = no GPU check) or its plan file is not the one built."""
    meta = load_sidecar(plan_path)
    problems = []
    if meta.get("flavour") != flavour:
        problems.append(f"built with {meta.get('flavour')}, loaded with {flavour}")
    if meta.get("trt_version") != trt_version:
        problems.append(f"built by {meta.get('flavour')} {meta.get('trt_version')}, this runtime is {trt_version} "
                        "(engines are not portable across versions: rebuild)")
    if compute_capability is not None:
        if flavour == "tensorrt" and meta.get("compute_capability") not in (None, compute_capability):
            problems.append(f"built for {meta.get('gpu')} (compute capability {meta.get('compute_capability')}), "
                            f"this GPU has compute capability {compute_capability}")
        if flavour == "tensorrt_rtx":
            sm = "SM" + compute_capability.replace(".", "")
            if meta.get("rtx_targets") and sm not in meta["rtx_targets"]:
                problems.append(f"built for TensorRT-RTX targets {meta['rtx_targets']}, this GPU is {sm}")
    if check_hash:
        actual = sha256_file(plan_path)
        if actual != meta.get("plan_sha256"):
            problems.append(f"plan file sha256 {actual[:16]}… does not match the sidecar's "
                            f"{str(meta.get('plan_sha256'))[:16]}… (file replaced or damaged)")
    if problems:
        raise EngineError(f"{plan_path}: " + "; ".join(problems))
    return meta

