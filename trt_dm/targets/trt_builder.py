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
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from trt_dm.core.artifacts import Sidecar
from trt_dm.core.flavour import EngineError, Flavour, trt_module
from trt_dm.core.io import atomic_write, sha256_file
from trt_dm.core.signature import Signature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """How to build an engine: the batch and sequence profiles, optimization level, caches and targets."""
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
        """ValueError naming the bad value and its accepted range."""
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/"
                             f"{self.opt_batch}/{self.max_batch}")
        if not 1 <= self.seq_len[0] <= self.seq_len[1] <= self.seq_len[2]:
            raise ValueError(f"sequence profile must satisfy 1 <= min <= opt <= max, got {self.seq_len}")
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"builder optimization level must be 0..5, got {self.opt_level}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise ValueError(f"--workspace-mib must be >= 1, got {self.workspace_mib}")


# TensorRT-RTX compute capabilities with FP8 (E4M3) tensor cores: Ada (SM89) and Blackwell (SM120, SM121); Turing and
# Ampere have none (TensorRT-RTX 1.7: "Cannot compile for target(s) sm86, because the model contains HW-specific
# datatypes: fp8_e4m3"). Full TensorRT builds FP8 on GPUs of compute capability 8.9 and newer.
FP8_RTX_TARGETS = ("SM89", "SM120", "SM121")
FP8_MIN_CC = (8, 9)


def for_format(options: BuildOptions, fmt: str) -> BuildOptions:
    """``options`` for engines of format ``fmt``: FP8 builds the default targets' FP8-capable ones, and refuses
    targets named by the user that have no FP8 (before any work)."""
    if fmt != "fp8":
        return options
    if options.rtx_targets == BuildOptions.rtx_targets:
        return replace(options, rtx_targets=tuple(t for t in options.rtx_targets if t in FP8_RTX_TARGETS))
    bad = [t for t in options.rtx_targets if t not in FP8_RTX_TARGETS]
    if bad:
        raise ValueError(f"--format fp8: TensorRT-RTX targets {', '.join(bad)} have no FP8 (E4M3) kernels; FP8 builds "
                         f"for {', '.join(FP8_RTX_TARGETS)} (Ada, Blackwell): give --rtx-targets among those")
    return options


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


def inspector_precisions(info: dict) -> dict[str, dict[str, int]]:
    """From full TensorRT's engine-inspector JSON (``get_engine_information(LayerInformationFormat.JSON)`` of an
    engine built with ProfilingVerbosity.DETAILED: {"Layers": [{"LayerType", "Inputs": [{"Format/Datatype"}]}]}):
    {layer type: {input datatype: count}} for convolutions and matrix multiplies, like ``layer_precisions``."""
    out: dict[str, Counter] = {}
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict) or not layer.get("Inputs"):
            continue  # LAYER_NAMES_ONLY engines list names only
        ltype = str(layer.get("LayerType", ""))
        kind = ("convolution" if "Convolution" in ltype else
                "gemm" if any(k in ltype for k in ("Gemm", "MatrixMultiply", "MatMul")) else None)
        if kind is None:
            continue
        fmt = str(layer["Inputs"][0].get("Format/Datatype", ""))
        dtype = next((name for key, name in (("Int8", "Int8"), ("FP8", "FP8"), ("BF16", "BFloat16"), ("FP16", "Half"),
                                             ("Half", "Half"), ("FP32", "Float"), ("Float", "Float")) if key in fmt), fmt)
        out.setdefault(kind, Counter())[dtype] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def _inspect(trt, blob: bytes, logger) -> dict[str, dict[str, int]] | None:
    """Full TensorRT, on the GPU it built for: the engine inspector's layer precisions (None if unavailable)."""
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
        text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        return inspector_precisions(json.loads(text))
    except Exception as e:  # no GPU, an older TensorRT: the build log's report is used instead
        log.info("engine inspector not available (%s: %s); layer precisions from the build log", type(e).__name__, e)
        return None


def _gpu() -> dict:
    """The GPU a full-TensorRT engine is built on: its name and compute capability (None without one)."""
    try:
        import torch
        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability()
            return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{cc[0]}.{cc[1]}"}
    except ImportError:
        pass
    return {"gpu": None, "compute_capability": None}


def profile_shapes(signature: Signature, options: BuildOptions) -> dict[str, tuple[list, list, list]]:
    """(min, opt, max) shape per input from the signature's named axes: "batch" takes the batch profile,
    "sequence" the sequence-length profile; any other dynamic axis is refused."""
    sizes = {"batch": (options.min_batch, options.opt_batch, options.max_batch), "sequence": options.seq_len}
    out = {}
    for spec in signature.inputs:
        lo, mid, hi = [], [], []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                trio = (d, d, d)
            elif d in sizes:
                trio = sizes[d]
            else:
                raise EngineError(f"input {spec.name!r} has dynamic axis {axis} ({d!r}, shape {list(spec.shape)}); "
                                  f"only {sorted(sizes)} may be dynamic in an engine (give the model a sample_size)")
            for lst, v in zip((lo, mid, hi), trio):
                lst.append(int(v))
        out[spec.name] = (lo, mid, hi)
    return out


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, options: BuildOptions | None = None, *,
                 flavour: str | Flavour | None = None, recipe: str | None = None, calibration: str | None = None,
                 precision: str = "int8", signature: Signature | None = None, extra: dict | None = None,
                 verbose: bool = False) -> Sidecar:
    """Parse ``onnx_path``, build, write ``plan_path`` and its sidecar atomically; return the sidecar.
    Profiles come from ``signature`` (default: read from the ONNX graph's inputs and dim names)."""
    options = options or BuildOptions()
    options.validate()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no such ONNX file")
    if signature is None:
        try:
            signature = Signature.from_onnx(onnx_path)
        except Exception as e:  # protobuf raises DecodeError, onnx others: the file is not an ONNX model
            raise EngineError(f"could not parse {onnx_path} as an ONNX model ({type(e).__name__}: {e})") from None
    wanted = profile_shapes(signature, options)
    trt, fl = trt_module(flavour)
    if "fp8" in precision and fl.compute_targets:  # "fp8", or "int8+fp8" (a format mix)
        options = for_format(options, "fp8")
    elif "fp8" in precision and (cc := _gpu().get("compute_capability")) and tuple(map(int, str(cc).split("."))) < FP8_MIN_CC:
        raise EngineError(f"{onnx_path} is an FP8 graph; this GPU (compute capability {cc}) has no FP8 kernels: "
                          "FP8 engines need compute capability 8.9 or newer (Ada, Hopper, Blackwell)")
    logger = _Logger.make(trt, verbose)
    logger.min_severity = trt.ILogger.Severity.VERBOSE
    builder = trt.Builder(logger)
    network, strongly_typed = _parse(trt, fl, builder, logger, onnx_path)
    config, targets, cache = _config(trt, fl, builder, options, strongly_typed)
    shapes = _add_profile(builder, network, config, wanted, onnx_path, signature)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        errors = [m for m in logger.messages if "error" in m.lower()][-10:]
        raise EngineError(f"{fl.name} failed to build {onnx_path}:\n  " + "\n  ".join(errors))
    blob = memoryview(serialized).tobytes()

    gpu = _gpu() if not fl.compute_targets else {"gpu": None, "compute_capability": None}
    sidecar = Sidecar(flavour=fl.name, trt_version=trt.__version__, **gpu,
                      rtx_targets=targets, onnx=onnx_path.name, onnx_sha256=sha256_file(onnx_path),
                      onnx_data_sha256=sha256_file(data) if (data := onnx_path.with_name(onnx_path.name + ".data"))
                      .is_file() else None,
                      plan_sha256=hashlib.sha256(blob).hexdigest(), plan_bytes=len(blob), precision=precision,
                      recipe=recipe, calibration=calibration, inputs=shapes, signature=signature.to_dict(),
                      build_options=json.loads(json.dumps(asdict(options))), strongly_typed=strongly_typed,
                      build_seconds=round(seconds, 2),
                      layer_precisions=(fl.engine_inspector and _inspect(trt, blob, logger))
                      or layer_precisions(logger.messages),
                      # TensorRT-RTX prints one layer report, for its first target
                      layer_precisions_for=targets[0] if targets else "this GPU", **(extra or {}))
    # sidecar first: a .plan appears only complete, and a stale sidecar never vouches for it (plan sha256)
    sidecar.save(plan_path)
    atomic_write(plan_path, blob)
    if cache is not None:
        atomic_write(Path(options.timing_cache), memoryview(config.get_timing_cache().serialize()).tobytes())
    log.info("built %s with %s %s in %.1f s", plan_path, fl.name, trt.__version__, seconds)
    return sidecar


def _parse(trt, fl: Flavour, builder, logger, onnx_path: Path) -> tuple:
    """(network parsed from ``onnx_path``, whether it is strongly typed): STRONGLY_TYPED where the flavour has the
    flag; a flavour without precision flags is always strongly typed."""
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{fl.name} could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    return network, strongly_typed or not fl.precision_flags


def _config(trt, fl: Flavour, builder, options: BuildOptions, strongly_typed: bool) -> tuple:
    """(builder config, its compute-capability targets, its timing cache or None) for ``options``."""
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.builder_optimization_level = options.opt_level
    if not strongly_typed:  # TensorRT < 10: weakly typed, precision by flags
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.INT8)
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    targets = _set_targets(trt, fl, config, options.rtx_targets) if fl.compute_targets else []
    cache = None
    if options.timing_cache and fl.timing_cache:
        blob = Path(options.timing_cache).read_bytes() if Path(options.timing_cache).exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config, targets, cache


def _set_targets(trt, fl: Flavour, config, wanted: tuple[str, ...]) -> list[str]:
    """Set the compute capabilities to build for (e.g. "SM89"); ValueError naming those this version knows."""
    targets = list(wanted)
    unknown = [t for t in targets if not hasattr(trt.ComputeCapability, t)]
    if unknown:
        known = [c for c in dir(trt.ComputeCapability) if c.startswith("SM")]
        raise ValueError(f"unknown {fl.title} targets {unknown}; this version knows {known}")
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        config.set_compute_capability(getattr(trt.ComputeCapability, t), i)
    return targets


def _add_profile(builder, network, config, wanted: dict, onnx_path: Path, signature: Signature) -> dict:
    """Add the optimization profile of ``wanted`` (from ``profile_shapes``) to ``config``; the sidecar's inputs
    ({name: {min, opt, max, dtype}})."""
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if inp.name not in wanted:
            raise EngineError(f"{onnx_path}: network input {inp.name!r} is not in the signature {signature.names}")
        lo, mid, hi = wanted[inp.name]
        if inp.is_shape_tensor:
            raise EngineError(f"input {inp.name!r} is a shape tensor, which this builder does not support")
        profile.set_shape(inp.name, lo, mid, hi)
        shapes[inp.name] = {"min": lo, "opt": mid, "max": hi, "dtype": str(inp.dtype).split(".")[-1]}
    config.add_optimization_profile(profile)
    return shapes


def load_sidecar(plan_path: str | os.PathLike) -> Sidecar:
    """The sidecar of an engine (``Sidecar.load``)."""
    return Sidecar.load(plan_path)
