"""The FP16 version of an exported ONNX graph (quantized or not) for strongly-typed TensorRT, by ModelOpt's ONNX
autocast, with its reference run replaced by one that streams.

Autocast keeps in FP32 every node whose inputs or outputs exceed FP16's safe range (``data_max``, 512) on a reference
run. Its own run deep-copies the graph, marks every tensor a graph output and keeps all of them at once (measured:
> 4.3x the graph's bytes on SD 1.5's UNet, > 5.5x on DiT-XL/2; both killed on a 24 GB machine).
``streamed_reference`` computes the same statistics (abs max, min, max, shape of every tensor) with ONNX Runtime
on a weight-free copy of the graph (its weights written to a temporary file a tensor at a time, mapped by ONNX
Runtime, not read into memory), one session per chunk of about ``CHUNK_BYTES`` of tensors (its graph outputs), each
tensor reduced to its statistics at once, so the range check costs the mapped weights and one chunk of activations.
Measured on SD 1.5's UNet (3.44 GB Q/DQ graph, 2026-12-08): the whole conversion peaked at 17.2 GB resident (4.9x the
graph, the mapped weights' pages counted), where ModelOpt's own run was killed at 22.2 GB; 35 sessions, about 27 minutes
on one contended core. Its inputs are the export's own probe inputs (x_t over the schedule, valid
conditioning), not random numbers: the range check sees the values the model sees.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from trt_dm.core.stages import import_detached
from trt_dm.export.onnx import _fp8_outputs, _graph, save_onnx

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 30  # tensors fetched per reference run, by their inferred sizes
ALIGN = 65536  # offsets of the reference run's weights: ONNX Runtime maps aligned external data from the file


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike, feed: Mapping[str, torch.Tensor] | None = None,
            keep_fp32: tuple[str, ...] = (r"/unet/time_proj/.*", r"/unet/add_time_proj/.*")) -> Path:
    """The FP16 version of an exported ONNX (quantized or not) for strongly-typed TensorRT: non-quantized math
    in FP16, Q/DQ scales in FP16 (opset 19), inputs and outputs kept FP32. Uses ModelOpt's ONNX autocast,
    which also keeps in FP32 any node whose values exceed FP16's safe range on a reference run (streamed, on
    ``feed``: the graph's inputs by name; without it seeded normal floats and zero integers). The sinusoidal
    timestep projection stays FP32 (sin/cos of t * frequency with t up to 1000 needs it), as does SDXL's
    projection of its time ids (image sizes up to 1024 and more)."""
    import_detached("modelopt.onnx.autocast")
    from modelopt.onnx.autocast import convert_to_mixed_precision
    # modelopt sets INFO on each of its ONNX loggers; its warnings (opset raised to 19, shared constants
    # duplicated) are expected here: shown in verbose runs (root logger at INFO) only
    quiet = logging.WARNING if logging.getLogger().level <= logging.INFO else logging.ERROR
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("modelopt.onnx", "onnxscript")):
            logging.getLogger(name).setLevel(quiet)
    dst = Path(dst)
    with streamed_reference(feed, basic=bool(_fp8_outputs(_graph(src)[0])), workdir=dst.parent), _one_pass_cleanup():
        model = convert_to_mixed_precision(str(src), low_precision_type="fp16", keep_io_types=True,
                                           nodes_to_exclude=list(keep_fp32))
    return save_onnx(model, dst)


def _weight_free_copy(model, data_file: Path):
    """A copy of ``model`` whose initializers name ``data_file`` (written here, one tensor at a time, each at an
    offset aligned to ``ALIGN`` so that ONNX Runtime maps it from the file instead of reading it into memory)
    instead of holding their bytes: the copy itself is small."""
    import onnx
    from onnx import numpy_helper
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = model.graph.name
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    with open(data_file, "wb") as f:
        for t in model.graph.initializer:
            data = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            f.write(b"\0" * (-f.tell() % ALIGN))
            ref = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
            ref.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_file.name), ("offset", str(f.tell())), ("length", str(len(data)))):
                ref.external_data.add(key=k, value=v)
            f.write(data)
            light.graph.initializer.append(ref)
    return light


def _feed_for(inputs, feed: Mapping[str, torch.Tensor] | None, rows: int = 2) -> dict[str, np.ndarray]:
    """The session's inputs: ``feed``'s tensors by name in the graph's dtypes, its first and last rows (the
    probe's extreme timesteps); absent ones (or without a feed) seeded normal floats and zero integers, ``rows``
    rows for a dynamic batch."""
    from onnx import helper
    rng = np.random.default_rng(0)
    out = {}
    for i in inputs:
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        if feed is not None and i.name in feed:
            a = feed[i.name].detach().cpu().numpy().astype(dtype)
            out[i.name] = a[[0, -1]] if a.ndim and len(a) > rows else a
            continue
        shape = [d.dim_value if d.HasField("dim_value") else rows for d in i.type.tensor_type.shape.dim]
        out[i.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                       else np.zeros(shape, dtype))
    return out


def _concrete_shapes(light, inputs: dict[str, np.ndarray]) -> dict:
    """{tensor: its ValueInfo} of the weight-free graph ``light`` with its inputs at the shapes of ``inputs``: ONNX
    shape inference with data propagation, so that reshapes of computed shapes (attention's heads) get sizes too."""
    import onnx
    probe = onnx.ModelProto()
    probe.CopyFrom(light)  # (small: the weights are references)
    for i in probe.graph.input:
        if i.name in inputs:
            dims = i.type.tensor_type.shape.dim
            del dims[:]
            for d in inputs[i.name].shape:
                dims.add().dim_value = d
    try:
        probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as e:  # (an op shape inference cannot follow: sizes stay unknown, chunks count them coarsely)
        log.debug("shape inference of the reference graph failed: %s", e)
    return {v.name: v for v in list(probe.graph.value_info) + list(probe.graph.output)}


def _chunks(names: list[str], typed: dict, rows: int, budget: int = CHUNK_BYTES) -> Iterator[list[str]]:
    """``names`` in graph order, in runs of at most ``budget`` bytes by their inferred shapes (4 bytes an element,
    unknown dims as ``rows``, an unknown shape as the budget's 1 / 16; a tensor over the budget alone)."""
    part, size = [], 0
    for n in names:
        dims = typed[n].type.tensor_type.shape.dim if n in typed else None
        b = (4 * int(np.prod([d.dim_value if d.HasField("dim_value") else rows for d in dims]))
             if dims else budget // 16)
        if part and size + b > budget:
            yield part
            part, size = [], 0
        part.append(n)
        size += b
    if part:
        yield part


def reference_stats(model, feed: Mapping[str, torch.Tensor] | None = None, *, basic: bool = False,
                    workdir: str | os.PathLike | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """{tensor: ModelOpt's TensorStats} for every graph input and node output of ``model`` (weights in memory or
    not) on ``feed`` (module docstring), fetched about ``chunk_bytes`` of tensors per ONNX Runtime run
    (``basic``: basic graph optimizations, as FP8 graphs need; else none, and no weight prepacking: the weights
    stay mapped from the temporary file written in ``workdir``, by default the system's)."""
    import onnx
    import onnxruntime as ort
    from modelopt.onnx.autocast.referencerunner import TensorStats
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    names = list(dict.fromkeys(o for n in model.graph.node if n.op_type != "Constant" for o in n.output if o))
    inputs = _feed_for(graph_inputs, feed)
    rows = max((len(a) for a in inputs.values() if a.ndim), default=1)
    with tempfile.TemporaryDirectory(prefix=".trt_dm-reference-", dir=workdir) as tmp:
        light = _weight_free_copy(model, Path(tmp) / "weights.bin")
        typed = _concrete_shapes(light, inputs)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False  # each run's activations are returned, not kept for the next one
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if basic
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        stats = {name: _stats(a, TensorStats) for name, a in inputs.items()}
        for part in _chunks(names, typed, rows, chunk_bytes):
            # a session per chunk whose graph outputs are the chunk's tensors (measured on SD 1.5's graph: with every
            # tensor a graph output and a few fetched per run, the first run alone took more than 16 GB); a session
            # also leaves out the nodes its outputs do not need, so early chunks run part of the graph
            del light.graph.output[:]
            light.graph.output.extend(typed.get(n, onnx.ValueInfoProto(name=n)) for n in part)
            onnx.save(light, str(Path(tmp) / "graph.onnx"))
            sess = ort.InferenceSession(str(Path(tmp) / "graph.onnx"), so, providers=["CPUExecutionProvider"])
            for name, a in zip(part, sess.run(part, inputs)):
                stats[name] = _stats(np.asarray(a), TensorStats)
            del sess
    return stats


def _stats(a: np.ndarray, cls):
    if a.dtype == bool:
        a = a.astype(np.int8)
    if a.size == 0 or not np.issubdtype(a.dtype, np.number):
        return cls(absmax=0.0, min_val=0.0, max_val=0.0, shape=tuple(a.shape))
    lo, hi = float(np.min(a)), float(np.max(a))  # abs max from these: no copy, and int8's -128 stays 128
    return cls(absmax=max(abs(lo), abs(hi)), min_val=lo, max_val=hi, shape=tuple(a.shape))


@contextlib.contextmanager
def streamed_reference(feed: Mapping[str, torch.Tensor] | None, basic: bool = False, workdir=None):
    """While active: ModelOpt autocast's reference run is ``reference_stats`` on ``feed`` (module docstring)."""
    from modelopt.onnx.autocast.referencerunner import ReferenceRunner
    original = ReferenceRunner.__dict__["run"]

    def run(self, inputs=None):
        return reference_stats(self.model, feed, basic=basic, workdir=workdir)

    ReferenceRunner.run = run
    try:
        yield
    finally:
        ReferenceRunner.run = original


@contextlib.contextmanager
def _one_pass_cleanup():
    """While active: ModelOpt autocast's removal of nodes whose outputs nothing consumes, in one pass over the graph.
    ModelOpt 0.47 scans every node once per node output (quadratic in the graph's size; measured on DDPM-CIFAR10's
    2535-node int8 graph: the conversion takes 33 s with this, 61 s without); the rule is the same (a node goes when
    none of its outputs is a graph output or the input of a node, judged on the graph before any removal), so the
    converted graph is too."""
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter
    original = PrecisionConverter.__dict__.get("_cleanup_no_consumer_nodes")
    if original is None:  # another ModelOpt: its own code runs
        yield
        return

    def cleanup(self) -> None:
        graph = self.model.graph
        used = {o.name for o in graph.output} | {name for n in graph.node for name in n.input}
        for node in [n for n in graph.node if not any(o in used for o in n.output)]:
            graph.node.remove(node)

    PrecisionConverter._cleanup_no_consumer_nodes = cleanup
    try:
        yield
    finally:
        PrecisionConverter._cleanup_no_consumer_nodes = original
