"""Q/DQ ONNX export of a (fake-quant) UNet, and TensorRT explicit-quantization conformance checks.

Export uses torch's legacy exporter (``dynamo=False``: the dynamo exporter fails on a data-dependent
branch in modelopt's CPU fake-quant), opset 17, dynamic batch, constants folded. modelopt's quantizers
export as QuantizeLinear/DequantizeLinear pairs. Written to a temporary name, then renamed.

Conformance (TensorRT explicit quantization, "Working with Quantized Types" in the TensorRT developer
guide): every Q/DQ is int8 or FP8 (E4M3, ``trt_dm.export.fp8``) with zero point 0 (symmetric), scales are finite
and positive, per-channel scales name a valid axis of their input, and every Q feeds a DQ with the same scale.

The checks (``check_qdq``, ``check_layers``, ``weight_code_ranges``) live here, beside the writer, not in the
export pipeline (``trt_dm.export.qdq``): they read the graph with the same readers (``constants``, ``layer_of``,
external data left on disk), which the layer comparison (``trt_dm.export.compare``) uses too, and the CLI and
the OpenVINO report use them on their own.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trt_dm.core.signature import OUTPUT_NAME, Signature

log = logging.getLogger(__name__)
OPSET = 17
# A protobuf message cannot exceed 2 GiB: above this many bytes of tensors, a graph is written in ONNX's external
# data layout (its tensors in one `<name>.data` file beside it), which TensorRT's parse_from_file, ONNX Runtime
# and OpenVINO read from the graph's directory.
EXTERNAL_DATA_BYTES = 1_800_000_000


def _tensor_bytes(model) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def save_onnx(model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (a private temporary directory beside it, then renames). Over
    ``EXTERNAL_DATA_BYTES`` of tensors, they go to ``<name>.data`` beside the graph (renamed into place before the
    graph, so a graph never names a data file that is not there). Saving externally moves the tensors out of
    ``model`` (ONNX does): do not use it afterwards."""
    import onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if _tensor_bytes(model) > EXTERNAL_DATA_BYTES:
            onnx.save_model(model, str(tmpdir / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=0)
            os.replace(tmpdir / data.name, data)
        else:
            onnx.save_model(model, str(tmpdir / path.name))
            data.unlink(missing_ok=True)  # from an earlier, external save of the same name
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _tensors(graph) -> Iterator:
    """Every TensorProto of ``graph``: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g)


def gather_external(src: str | os.PathLike, path: str | os.PathLike, align: int = 4096) -> Path:
    """The graph ``src`` whose tensors are external files beside it (torch's export of a graph over 2 GB: one file per
    tensor) written to ``path`` with its tensors in ONE ``<name>.data`` (``save_onnx``'s layout), reading and writing
    one tensor at a time: ``onnx.load`` + ``save_onnx`` would hold every tensor at once (SDXL's UNet: 10.3 GB on top
    of the model being exported). Atomic like ``save_onnx``: the data file is in place before the graph naming it."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    src, path = Path(src), Path(path)
    model = onnx.load(str(src), load_external_data=False)
    data = path.with_name(path.name + ".data")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with open(tmpdir / data.name, "wb") as out:
            for t in _tensors(model.graph):
                if not uses_external_data(t):
                    continue
                info = ExternalDataInfo(t)
                with open(src.parent / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    blob = f.read(info.length) if info.length else f.read()
                out.write(b"\0" * (-out.tell() % align))
                del t.external_data[:]  # (onnx's set_external_data wants the bytes in memory: set the entries here)
                for key, value in (("location", data.name), ("offset", out.tell()), ("length", len(blob))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, str(value)
                out.write(blob)
                del blob
        onnx.save_model(model, str(tmpdir / path.name))
        os.replace(tmpdir / data.name, data)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def onnx_files(path: str | os.PathLike) -> list[Path]:
    """The files of an ONNX graph: the graph, and its external data file when it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


class _Wrapper(nn.Module):
    """diffusers UNets return a dataclass; ONNX wants plain tensors with stable names, in signature order."""

    def __init__(self, unet: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.unet = unet
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.unet(**dict(zip(self.names, inputs))).sample


def _rms_norm(g, x, normalized_shape, weight, eps):
    """ONNX for ``aten::rms_norm`` (torch.nn.RMSNorm: Flux's and SD3.5's query / key norms), which the TorchScript
    exporter has no symbolic for below opset 23: x / sqrt(mean(x^2 over the normalized dims) + eps) [* weight], in
    float32 (as torch computes it for float32 inputs; eps None = float32's machine epsilon, torch's default)."""
    from torch.onnx import symbolic_helper as sh
    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    eps = sh._maybe_get_const(eps, "f")
    eps = float(torch.finfo(torch.float32).eps) if eps is None or sh._is_value(eps) else float(eps)
    axes = list(range(-len(dims), 0))
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    out = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps)))))
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, 17)


def export_onnx(unet: nn.Module, path: str | os.PathLike, *, batch: int = 2, seq_len: int = 8,
                opset: int = OPSET) -> Path:
    """Export ``unet`` (FP or fake-quant, fp32) to ``path`` atomically, with every input of its signature
    (``trt_dm.core.signature``: conditioning included) as a graph input and its named dynamic axes."""
    path = Path(path)
    signature = Signature.from_unet(unet)
    example = signature.example(batch, seq_len=seq_len, timestep=10)
    names = signature.names
    args = tuple(example[n] for n in names)
    dyn = signature.dynamic_axes()
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch writes a graph over 2 GB as one file per tensor beside it: export into a private directory, then
    # (large graphs) gather the tensors into one `<name>.data` with save_onnx
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmpdir / "model.onnx"
    try:
        with torch.no_grad():
            torch.onnx.export(_Wrapper(unet, names).eval(), args, str(tmp), input_names=names, output_names=[OUTPUT_NAME],
                              dynamic_axes=dyn, opset_version=opset, do_constant_folding=True, dynamo=False)
        if len(list(tmpdir.iterdir())) > 1:  # torch's one file per tensor: gathered, a tensor at a time
            gather_external(tmp, path)
        elif tmp.stat().st_size > EXTERNAL_DATA_BYTES:
            import onnx
            save_onnx(onnx.load(str(tmp)), path)
        else:
            os.replace(tmp, path)
            path.with_name(path.name + ".data").unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("exported %s", path)
    return path


@dataclass
class QdqReport:
    quantize: int = 0
    dequantize: int = 0
    per_channel: int = 0
    fp8: int = 0  # of them, with an FP8 (E4M3) zero point
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


class _Constants(Mapping):
    """{tensor name: value}, each read on first access (a > 2 GB graph's weights are not all loaded to check its
    scales); tensors in external data are read from ``base_dir``."""

    def __init__(self, protos: dict, base_dir: str) -> None:
        self._protos, self._base, self._values = protos, base_dir, {}

    def __contains__(self, name) -> bool:  # (Mapping's would read the tensor)
        return name in self._protos

    def __iter__(self):
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)

    def __getitem__(self, name):
        if name not in self._values:
            from onnx import numpy_helper
            self._values[name] = numpy_helper.to_array(self._protos[name], base_dir=self._base)
        return self._values[name]


def constants(model, base_dir: str | os.PathLike = "") -> Mapping[str, np.ndarray]:
    """{tensor name: value} of every initializer and Constant node output of an ONNX model, each read when first
    used (``base_dir``: where a graph loaded without its external data keeps it)."""
    protos = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    protos[n.output[0]] = a.t
    return _Constants(protos, str(base_dir))


def _graph(model_or_path) -> tuple:
    """(model, directory of its external data): a path is loaded without its external data, whose tensors
    ``constants(model, directory)`` then reads one by one when used (a > 2 GB graph is never all in memory)."""
    import onnx
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(str(model_or_path), load_external_data=False), str(Path(model_or_path).parent)
    return model_or_path, ""


def check_qdq(model_or_path) -> QdqReport:
    """Check every QuantizeLinear / DequantizeLinear against TensorRT's explicit-quantization rules."""
    model, base = _graph(model_or_path)
    consts = constants(model, base)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rep = QdqReport()
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.op_type == "QuantizeLinear":
            rep.quantize += 1
        else:
            rep.dequantize += 1
        where = f"{n.op_type} {n.name or n.output[0]!r}"
        scale = consts.get(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            rep.violations.append(f"{where}: scale is not a constant")
            continue
        if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            rep.violations.append(f"{where}: scales must be finite and > 0 (found {scale.ravel()[:4]})")
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            rep.violations.append(f"{where}: zero point missing (TensorRT needs an explicit int8 zero point 0)")
        else:
            if str(zp.dtype) == "float8_e4m3fn":
                rep.fp8 += 1
            elif zp.dtype != np.int8:
                rep.violations.append(f"{where}: zero point type {zp.dtype}; TensorRT needs int8 (int8 Q/DQ) or "
                                      "FLOAT8E4M3FN (FP8)")
            if np.any(zp.astype(np.float32) != 0):
                rep.violations.append(f"{where}: non-zero zero point (TensorRT quantization is symmetric)")
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale.size > 1:
            rep.per_channel += 1
            if axis != 0:  # weights: per output channel; activations: per tensor only in TensorRT
                rep.violations.append(f"{where}: per-channel scales must be on axis 0 (weights' output "
                                      f"channels), found axis {axis}")
        if n.op_type == "QuantizeLinear":
            nxt = consumers.get(n.output[0], [])
            if not nxt or any(c.op_type != "DequantizeLinear" for c in nxt):
                rep.violations.append(f"{where}: must feed DequantizeLinear only")
            elif any(consts.get(c.input[1]) is None or not np.array_equal(consts[c.input[1]], scale) for c in nxt):
                rep.violations.append(f"{where}: its DequantizeLinear uses another scale")
    return rep


def weight_code_ranges(model_or_path) -> dict[str, tuple[int, int]]:
    """{layer: (min, max) int8 code} of every quantized weight in an ONNX graph: a DequantizeLinear with
    per-channel scales whose input is a constant int8 tensor or the QuantizeLinear of a constant float one
    (codes = round-half-even(W / scale), saturated to int8, as QuantizeLinear computes them). W4A8 graphs must
    keep these within the 4-bit integers [-8, 7]."""
    model, base = _graph(model_or_path)
    consts = constants(model, base)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumer = {i: n for n in reversed(model.graph.node) for i in n.input}  # the first consumer of each
    out = {}
    for n in model.graph.node:
        scale = consts.get(n.input[1]) if n.op_type == "DequantizeLinear" else None
        if scale is None or scale.size < 2:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        x = consts.get(n.input[0])
        if x is None:
            q = producer.get(n.input[0])
            w = consts.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if w is None:
                continue
            shape = [1] * w.ndim
            shape[axis] = -1
            x = np.clip(np.rint(w.astype(np.float64) / scale.astype(np.float64).reshape(shape)), -128, 127)
        key = layer_of(consumer[n.output[0]]) if n.output[0] in consumer else n.name
        out[key] = (int(x.min()), int(x.max()))
    return out


def layer_of(node) -> str:
    """ONNX node name from the legacy exporter ("/unet/up_blocks.1/resnets.0/conv1/Conv") -> module name."""
    parts = node.name.strip("/").split("/")
    return ".".join(parts[1:-1]) if len(parts) > 2 else node.name


def check_layers(model_or_path, quantized: set[str] | list[str]) -> list[str]:
    """Every Conv/Gemm/MatMul that reads a weight must have Q/DQ on its input and weight exactly when its
    layer is in ``quantized`` (the recipe's layers): missing and unexpected quantization are violations."""
    model, base = _graph(model_or_path)
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = constants(model, base)
    quantized = set(quantized)
    seen, problems = set(), []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        # a weight is a constant, possibly through [QuantizeLinear ->] DequantizeLinear [-> Transpose]
        src, q_w = n.input[1], False
        while src not in consts and (p := producer.get(src)) is not None and p.op_type in (
                "QuantizeLinear", "DequantizeLinear", "Transpose"):
            q_w |= p.op_type == "DequantizeLinear"
            src = p.input[0]
        if src not in consts:
            continue  # activation x activation matmul (attention)
        layer = layer_of(n)
        q_in = (p := producer.get(n.input[0])) is not None and p.op_type == "DequantizeLinear"
        if layer in quantized:
            seen.add(layer)
            if not (q_in and q_w):
                problems.append(f"{layer}: quantized by the recipe but its {'input' if not q_in else 'weight'} "
                                "has no Q/DQ in the graph")
        elif q_in or q_w:
            problems.append(f"{layer}: not quantized by the recipe but has Q/DQ in the graph")
    problems += [f"{layer}: quantized by the recipe but not found in the graph" for layer in sorted(quantized - seen)]
    return problems


def _fp8_outputs(model) -> set[str]:
    """Outputs of the QuantizeLinear nodes with an FP8 (FLOAT8E4M3FN) zero point."""
    from onnx import TensorProto
    fp8 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN}
    return {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
            and n.input[2] in fp8}
