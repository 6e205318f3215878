"""Layer-by-layer comparison of a Q/DQ ONNX graph (run by ONNX Runtime) with the torch fake-quant UNet it was
exported from: the int8 codes (FP8: E4M3 ordinals) of every quantized layer's input, forced onto the same inputs
and end to end. Reads the graph with the checks' readers (``trt_dm.export.onnx``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trt_dm.export.onnx import _fp8_outputs, _graph, constants, layer_of
from trt_dm.quant.calib.fp8 import E4M3_MAX, from_ordinals, is_fp8, ordinals, to_ordinals
from trt_dm.quant.modules import quantized_layers


def _activation_q_nodes(model) -> dict[str, str]:
    """{layer name: output of the QuantizeLinear on that layer's input} (weights' Q/DQ excluded)."""
    consts = constants(model)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    dq_or_cast = {d.output[0] for d in model.graph.node if d.op_type in ("DequantizeLinear", "Cast")}
    out = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in consts:
            continue
        frontier = list(consumers.get(n.output[0], []))
        while frontier:  # Q -> DQ [-> Cast] -> Conv / Gemm / MatMul
            c = frontier.pop()
            if c.op_type in ("DequantizeLinear", "Cast"):
                frontier += consumers.get(c.output[0], [])
            elif c.op_type in ("Conv", "Gemm", "MatMul") and c.input[0] in dq_or_cast:
                out[layer_of(c)] = n.output[0]
    return out


def compare_layers(qunet: nn.Module, onnx_path: str | os.PathLike, feed: dict[str, torch.Tensor]) -> list[dict]:
    """Layer by layer: the int8 codes (FP8: E4M3 ordinals) of every quantized layer's input in torch fake-quant vs
    in the ONNX graph run by ONNX Runtime, on the same ``feed``. One row per layer, in execution order:
    {layer, n, flips, flip_rate, max_diff, flips_e2e, flip_rate_e2e, max_diff_e2e}.

    ``flips``: the torch run is *forced* onto ONNX Runtime's codes: every torch quantizer records the codes it
    computes, then passes on ONNX Runtime's codes instead, so each layer's codes are computed from the same
    quantized inputs in both frameworks and a difference comes from that layer alone. What remains are
    rounding flips: a value within float error of a rounding boundary (x/scale = k + 0.5) rounds to k in one
    framework and to k + 1 in the other, because they order sums differently (in FP16 graphs, at another
    precision). A wrong scale, layout or rounding mode would show instead as many codes off, often by more
    than one. ``*_e2e``: both run freely end to end; a flip moves downstream values by about one quantization
    step, so end-to-end flips spread and grow with depth (what the sampler's output sees).

    Memory: the probe rows run one at a time (ONNX Runtime's attention scores, 2 GB per call of 4 rows at SD 1.5's
    64x64 latents, are a quarter of that), the graph's codes are kept as int8 and torch's are compared as they are
    computed, never stored: the per-layer counts are those of the whole batch.
    """
    q_out, got = _ort_codes(onnx_path, feed)
    quantizers = {layer: mod.input_quantizer for layer, mod in quantized_layers(qunet).items()
                  if getattr(mod, "input_quantizer", None) is not None and layer in q_out}
    missing = sorted(set(q_out) - set(quantizers))
    if missing:
        raise ValueError(f"layers quantized in {onnx_path} but not in the torch model: {missing[:5]}")
    stats: dict[str, dict] = {}
    order: list[str] = []
    for i in range(len(feed["sample"])):
        row = {k: v[i:i + 1] for k, v in feed.items()}
        theirs = {layer: got[q_out[layer]][i:i + 1] for layer in quantizers}
        for key, forced in (("", theirs), ("_e2e", None)):
            _torch_codes(qunet, quantizers, row, forced, theirs, stats, key, order if i == 0 and not key else None)
    rows = []
    for layer in order:
        st = stats[layer]
        rows.append({"layer": layer, "n": st["n"], **{f"{k}{key}": st[f"{k}{key}"] for key in ("", "_e2e")
                                                     for k in ("flips", "max_diff")},
                     **{f"flip_rate{key}": st[f"flips{key}"] / st["n"] for key in ("", "_e2e")}})
    return rows


def _ort_codes(onnx_path: str | os.PathLike, feed: dict[str, torch.Tensor]) -> tuple[dict[str, str], dict]:
    """({layer: output of the QuantizeLinear on its input}, {that output: its int8 codes (FP8: E4M3 ordinals)}):
    ONNX Runtime's codes of every quantized layer's input on ``feed`` (the graph run with those tensors as extra
    outputs, one row at a time; weights not pre-packed, which would copy them)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    model, _ = _graph(onnx_path)  # without external data: the weights stay in the graph's data file
    q_out = _activation_q_nodes(model)
    fp8 = _fp8_outputs(model)
    have = {o.name for o in model.graph.output}
    for name in q_out.values():
        if name not in have:
            kind = TensorProto.FLOAT8E4M3FN if name in fp8 else TensorProto.INT8
            model.graph.output.append(helper.make_tensor_value_info(name, kind, None))
            have.add(name)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_prepacking", "1")
    if fp8:  # ONNX Runtime's extended optimizers move Transposes between FP8 Q and DQ (no FP8 Transpose kernel)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        # the probe graph (the same graph with more outputs) goes beside the original, whose data file it names
        probe = Path(onnx_path).with_name(f".{Path(onnx_path).name}.probe-{os.getpid()}.onnx")
        try:
            onnx.save_model(model, str(probe))
            sess = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
        finally:
            probe.unlink(missing_ok=True)
    else:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_names = {i.name for i in sess.get_inputs()}
    outs = list(q_out.values())
    parts: dict[str, list] = {o: [] for o in outs}
    for i in range(len(feed["sample"])):  # one probe row at a time: a quarter of the activations of 4
        ort_feed = {k: v[i:i + 1].detach().cpu().numpy() for k, v in feed.items() if k in input_names}
        for o, a in zip(outs, sess.run(outs, ort_feed)):
            parts[o].append(ordinals(torch.from_numpy(a.view(np.uint8))) if o in fp8 else torch.from_numpy(a.copy()))
    got = {o: torch.cat(v) for o, v in parts.items()}
    return q_out, got  # (the session and the model go here: the torch runs after do not need their memory)


def _torch_codes(qunet: nn.Module, quantizers: dict, feed: dict[str, torch.Tensor], forced: dict | None,
                 theirs: dict[str, torch.Tensor], stats: dict[str, dict], key: str, order: list | None) -> None:
    """Run ``qunet`` on ``feed`` and add, per layer, its input codes' differences from ``theirs`` (ONNX Runtime's
    codes) into ``stats[layer]`` (``n``, ``flips<key>``, ``max_diff<key>``); with ``forced`` ({layer: codes}), each
    quantizer passes those codes on instead of its own. ``order``: filled with the layers in execution order."""
    handles = []
    for layer, quantizer in quantizers.items():
        def hook(_m, _args, out, layer=layer, quantizer=quantizer):
            fp8 = is_fp8(quantizer)  # codes: E4M3 ordinals, else int8 integers
            step = quantizer.amax.detach().float() / (E4M3_MAX if fp8 else 127.0)
            unit = out.detach().float() / step
            codes = to_ordinals(unit) if fp8 else torch.round(unit).to(torch.int16)
            ref = theirs[layer].reshape(codes.shape).to(torch.int16)
            d = (codes.to(torch.int16) - ref).abs()
            st = stats.setdefault(layer, {"n": 0, "flips": 0, "max_diff": 0, "flips_e2e": 0, "max_diff_e2e": 0})
            if not key:
                st["n"] += ref.numel()
            st[f"flips{key}"] += int((d > 0).sum())
            st[f"max_diff{key}"] = max(st[f"max_diff{key}"], int(d.max()))
            if order is not None:
                order.append(layer)
            if forced is not None:  # continue from ONNX Runtime's codes
                f = forced[layer].reshape(out.shape)
                return ((from_ordinals(f) if fp8 else f.float()) * step).to(out.dtype)
            return None
        handles.append(quantizer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            qunet(**feed)
    finally:
        for h in handles:
            h.remove()
