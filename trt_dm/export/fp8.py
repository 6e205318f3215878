"""FP8 (E4M3) Q/DQ in standard ONNX (opset 19), from an E4M3 fake-quant UNet.

modelopt exports a per-tensor E4M3 quantizer as TensorRT's custom ops ``trt::TRT_FP8QuantizeLinear`` /
``TRT_FP8DequantizeLinear`` (scale amax / 448) and refuses per-channel E4M3 (the weights). So the export is:

1. ``e4m3_weights``: each quantized layer's weight is replaced by its fake-quantized value (per output channel on
   the E4M3 grid) and its weight quantizer switched off for the export; both are restored after;
2. the graph is exported at opset 19 (``trt_dm.export.onnx.export_onnx``);
3. ``standard_qdq``: the custom ops become ``QuantizeLinear(x, scale, zero point FLOAT8E4M3FN 0, saturate=1)`` and
   ``DequantizeLinear``; each quantized layer's weight becomes FLOAT8E4M3FN codes (one byte per weight) in (out, ...)
   layout, read by a per-channel ``DequantizeLinear`` on axis 0 (for a MatMul's (in, out) weight, then a
   ``Transpose``, as in the int8 graphs). The codes must reproduce the exported weight to float rounding (checked),
   so the graph computes what the fake-quant model computes.

The layer comparison (``trt_dm.export.compare.compare_layers``) compares the codes as ordinals
(``trt_dm.quant.calib.fp8.ordinals``), the FP8 counterpart of int8's integer codes.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from trt_dm.export.onnx import export_onnx, layer_of, save_onnx
from trt_dm.quant.calib.fp8 import E4M3_MAX, is_fp8
from trt_dm.quant.modules import quantized_layers

OPSET_FP8 = 19  # FLOAT8E4M3FN in QuantizeLinear / DequantizeLinear
_CUSTOM = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}


@contextlib.contextmanager
def e4m3_weights(qunet: nn.Module) -> Iterator[dict[str, np.ndarray]]:
    """Inside: every quantized layer's weight is its E4M3 fake-quantized value and its weight quantizer is off;
    yields {layer: per-output-channel amax}. The weights and quantizers are restored on exit, even on error."""
    saved = {}
    try:
        for name, mod in quantized_layers(qunet).items():
            wq = mod.weight_quantizer
            if not (wq.is_enabled and is_fp8(wq)):
                continue
            with torch.no_grad():
                fake = wq(mod.weight).detach().clone()
            saved[name] = (mod, mod.weight.data, wq.amax.detach().reshape(-1).double().numpy().copy())
            mod.weight.data = fake
            wq.disable()
        yield {name: amax for name, (_, _, amax) in saved.items()}
    finally:
        for mod, weight, _ in saved.values():
            mod.weight.data = weight
            mod.weight_quantizer.enable()


def _fp8_tensor(name: str, bits: np.ndarray):
    from onnx import TensorProto
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT8E4M3FN
    t.dims.extend(bits.shape)
    t.raw_data = np.ascontiguousarray(bits, dtype=np.uint8).tobytes()
    return t


def _weight_axis(node, w: np.ndarray) -> int:
    """The output-channel axis of a layer's weight initializer: Conv (O, I, kh, kw) and Gemm with transB (O, I): 0;
    MatMul and Gemm without transB (I, O): the last."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else w.ndim - 1


def standard_qdq(model, weight_amax: dict[str, np.ndarray]):
    """``model`` (exported at opset 19 inside ``e4m3_weights``) with standard FP8 Q/DQ (module docstring, step 3).
    Raises ValueError for a quantized layer whose weight is not found or not on its E4M3 grid."""
    from onnx import helper, numpy_helper
    graph = model.graph
    zero = _fp8_tensor("trt_dm_fp8_zero_point", np.zeros((), np.uint8))
    graph.initializer.append(zero)
    for n in graph.node:
        if n.domain == "trt" and n.op_type in _CUSTOM:
            n.domain, n.op_type = "", _CUSTOM[n.op_type]
            if len(n.input) == 2:
                n.input.append(zero.name)
            if n.op_type == "QuantizeLinear":
                n.attribute.append(helper.make_attribute("saturate", 1))
    q_out = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    for vi in list(graph.value_info) + list(graph.output):  # modelopt typed them uint8
        if vi.name in q_out:
            vi.type.tensor_type.elem_type = zero.data_type
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    done, new_nodes = set(), []
    for n in graph.node:
        layer = layer_of(n)
        if n.op_type not in ("Conv", "Gemm", "MatMul") or layer not in weight_amax or len(n.input) < 2:
            continue
        src = inits.get(n.input[1])
        if src is None or users.get(src.name, 0) != 1:
            raise ValueError(f"FP8 export: the weight of {layer} is not a constant of its own in the graph")
        w = numpy_helper.to_array(src).astype(np.float32)
        axis = _weight_axis(n, w)
        scale = (weight_amax[layer] / E4M3_MAX).astype(np.float32)
        if scale.size != w.shape[axis]:
            raise ValueError(f"FP8 export: {layer} has {scale.size} weight ranges for {w.shape[axis]} output channels")
        shape = [1] * w.ndim
        shape[axis] = -1
        codes = torch.from_numpy(w / scale.reshape(shape)).to(torch.float8_e4m3fn)
        back = codes.float().numpy() * scale.reshape(shape)
        if not np.allclose(back, w, rtol=1e-6, atol=0):
            raise ValueError(f"FP8 export: the weight of {layer} is not on its E4M3 grid (max error "
                             f"{np.abs(back - w).max():.3g})")
        graph.initializer.remove(src)
        bits = codes.view(torch.uint8).numpy()
        if axis != 0:  # stored (out, in) with the DQ on axis 0, then transposed back: the int8 graphs' layout
            bits = bits.T
        graph.initializer.extend([_fp8_tensor(src.name + "_fp8", bits),
                                  numpy_helper.from_array(scale, src.name + "_fp8_scale"),
                                  _fp8_tensor(src.name + "_fp8_zero_point", np.zeros(scale.shape, np.uint8))])
        dq_out = src.name if axis == 0 else src.name + "_fp8_dq"
        new_nodes.append(helper.make_node("DequantizeLinear", [src.name + "_fp8", src.name + "_fp8_scale",
                                                               src.name + "_fp8_zero_point"], [dq_out],
                                          name=f"{n.name}_weight/DequantizeLinear", axis=0))
        if axis != 0:
            new_nodes.append(helper.make_node("Transpose", [dq_out], [src.name], name=f"{n.name}_weight/Transpose",
                                              perm=[1, 0]))
        done.add(layer)
    missing = sorted(set(weight_amax) - done)
    if missing:
        raise ValueError(f"FP8 export: quantized layers {missing[:5]} not found as Conv / Gemm / MatMul in the graph")
    for i, node in enumerate(new_nodes):  # before every other node: they read constants only
        graph.node.insert(i, node)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, OPSET_FP8)
    kept = [op for op in model.opset_import if op.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def export_fp8(qunet: nn.Module, path) -> Path:
    """The E4M3 fake-quant ``qunet`` as a standard FP8 Q/DQ graph at ``path`` (atomically: the custom-op export goes to
    a private name beside it and is removed after)."""
    import onnx
    path = Path(path)
    raw = path.with_name(f".{path.name}.trt-ops-{os.getpid()}.onnx")
    try:
        with e4m3_weights(qunet) as amax:
            export_onnx(qunet, raw, opset=OPSET_FP8)
        return save_onnx(standard_qdq(onnx.load(str(raw)), amax), path)
    finally:
        for f in (raw, raw.with_name(raw.name + ".data")):
            f.unlink(missing_ok=True)
