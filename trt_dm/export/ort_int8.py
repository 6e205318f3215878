"""Int8 on CPUs with ONNX Runtime (`trt-dm export --target ort-cpu`): the layout ONNX Runtime runs fast.

The TensorRT graph (Q/DQ on the inputs of Conv/Gemm/MatMul only, int8 symmetric activations) runs no faster
than FP32 in ONNX Runtime: its CPU kernels fuse into QLinearConv / QLinearMatMul / MatMulInteger only when
Q/DQ surround a node's inputs AND output, and they prefer uint8 activations. This module builds that
layout with ONNX Runtime's own static quantizer (QDQ format, uint8 asymmetric activations, int8 symmetric
per-channel weights) on the same layers as the TensorRT graph, and takes the input ranges from the SAME
calibration statistics: for each quantized layer, its input range is [max(min, -amax), min(max, amax)]
with min/max the signed extremes over the calibration set and amax the recipe's clip (asymmetric, so a
post-SiLU input bounded below by -0.28 does not waste half of its codes). The quantizer also needs ranges
for the conv/matmul OUTPUTS, which the statistics do not hold: ONNX Runtime's MinMax calibrator measures
them on a calibration set drawn with the same spec (a smaller one: ``n``).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from trt_dm.core.io import atomic_write
from trt_dm.core.ranges import RangeSet
from trt_dm.export.onnx import constants, export_onnx, layer_of
from trt_dm.quant.calib.stats import CalibStats

log = logging.getLogger(__name__)
INT8_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "QGemm")


def layer_inputs(model) -> dict[str, tuple[str, str]]:
    """{layer name: (node name, activation input tensor)} for every Conv/Gemm/MatMul with a constant weight."""
    consts = constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        src = n.input[1]
        while src not in consts and (p := producer.get(src)) is not None and p.op_type == "Transpose":
            src = p.input[0]
        if src in consts:
            out[layer_of(n)] = (n.name, n.input[0])
    return out


def range_overrides(stats: CalibStats, ranges: RangeSet, inputs: dict[str, tuple[str, str]]) -> dict[str, list[dict]]:
    """ONNX Runtime TensorQuantOverrides: asymmetric [rmin, rmax] per quantized layer input, from the signed
    extremes in ``stats`` clipped to the recipe's ``ranges`` (amax; for groups=K, the widest group's)."""
    out = {}
    for layer, amax in ranges.widest().items():
        if layer not in inputs:
            raise ValueError(f"quantized layer {layer!r} has no Conv/Gemm/MatMul in the exported graph")
        hists = stats.for_quantizer(layer).values()
        lo, hi = min(h.min for h in hists), max(h.max for h in hists)
        rmin, rmax = max(lo, -amax), min(hi, amax)
        if not rmin < rmax:
            raise ValueError(f"{layer}: empty range [{rmin}, {rmax}] from statistics [{lo}, {hi}], amax {amax}")
        # the range must contain 0 (zero padding is exact in uint8 only then). Layers reading the same tensor
        # (to_q/to_k/to_v; every resnet's time_emb_proj) share its one quantization in ONNX Runtime: their
        # statistics are those of the same values, and the union keeps every layer's range inside.
        tensor = inputs[layer][1]
        prev = out.get(tensor, [{"rmin": np.float32(0.0), "rmax": np.float32(0.0)}])[0]
        out[tensor] = [{"rmin": np.float32(min(rmin, 0.0, prev["rmin"])), "rmax": np.float32(max(rmax, 0.0, prev["rmax"]))}]
    return out


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


OPS = ("layers", "all")


def export_ort_int8(unet: torch.nn.Module, out_path: str | os.PathLike, feeds: list[dict[str, torch.Tensor]], *,
                    layers: set[str] | None = None, stats: CalibStats | None = None, ranges: RangeSet | None = None,
                    ops: str = "layers") -> Path:
    """Quantize ``unet`` for ONNX Runtime on CPU: export FP32 ONNX, then ONNX Runtime's static QDQ quantizer.
    ``ops="layers"``: the Conv/Gemm/MatMul nodes of ``layers`` only (default: every one with a constant
    weight), as in the TensorRT graph; ``ops="all"``: every operator ONNX Runtime can quantize (also the
    SiLU's Sigmoid/Mul, residual Adds, Concat, attention Softmax) except the Conv/Gemm/MatMul layers not in
    ``layers``: faster, and more quantization error. The layer inputs' ranges come from ``stats`` +
    ``ranges`` (``range_overrides``) when given; every other range is measured on ``feeds``. Written atomically."""
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        fp32 = export_onnx(unet, Path(tmp) / "fp32.onnx")
        model = onnx.load(str(fp32))
        inputs = layer_inputs(model)
        chosen = set(inputs) if layers is None else set(layers)
        unknown = chosen - set(inputs)
        if unknown:
            raise ValueError(f"layers not found as Conv/Gemm/MatMul in the graph: {sorted(unknown)[:5]}")
        nodes = [inputs[name][0] for name in sorted(chosen)]
        excluded = [inputs[name][0] for name in sorted(set(inputs) - chosen)]
        overrides = range_overrides(stats, ranges, inputs) if stats is not None else {}
        # all ops: never the sinusoidal timestep projection (t * frequencies spans 0..1000: uint8 codes ~4 apart
        # wipe out the time signal; measured FD-EffNet +1415 % before this exclusion) nor the time-embedding MLP
        timing = [n.name for n in model.graph.node if "/time_proj/" in n.name or "/time_embedding/" in n.name]
        which = (dict(op_types_to_quantize=["Conv", "Gemm", "MatMul"], nodes_to_quantize=nodes) if ops == "layers"
                 else dict(nodes_to_exclude=excluded + timing))
        data = [{k: v.detach().cpu().numpy() for k, v in f.items()} for f in feeds]
        q_path = Path(tmp) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        if level > logging.INFO:  # its advice to pre-process the model goes to the root logger: verbose runs only
            root.setLevel(logging.ERROR)
        try:
            quantize_static(str(fp32), str(q_path), _Reader(data), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax, **which,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           "TensorQuantOverrides": overrides})
        finally:
            root.setLevel(level)
        atomic_write(out_path, q_path.read_bytes())
    return out_path


def optimized_op_types(path: str | os.PathLike, threads: int = 1) -> dict[str, int]:
    """Op-type counts of the graph ONNX Runtime actually runs on CPU (after its graph optimisations)."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # it warns that an NCHWc-optimised file is machine specific: known
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
