"""The OpenVINO CPU target (``--target openvino``): the shared checked Q/DQ graph with FP32 math
(``engines/M-R.fp32.onnx``: the same file and checks as the TensorRT target's, from ``trt_dm.export.qdq``), compiled
by OpenVINO for this CPU, and a report of the precision OpenVINO actually executes per convolution / matmul, read
from the compiled model's runtime graph:

    engines/M-R.fp32.onnx                  the graph (the shared Q/DQ export; its report M-R.fp32.onnx.json)
    engines/M-R.fp32.onnx.openvino.json    per layer: runtime layer type, precision, kernel; counts; float fallbacks
    engines/M-R.fp32.onnx.openvino.txt     the same, short

Nothing to build: OpenVINO compiles when a runner starts, and caches the result (``trt_dm.runtime.openvino``).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trt_dm.core.cpu import INSTALL_HINT, SAFE_WEIGHT_CODE, cpu_int8_isa, pair_sums_saturate
from trt_dm.core.io import atomic_write, sha256_file, write_json
from trt_dm.export.job import Exported, ExportJob
from trt_dm.export.onnx import constants, layer_of, weight_code_ranges
from trt_dm.export.qdq import check_settings, export_qdq, probe_inputs
from trt_dm.targets.base import Target

INT8 = ("i8", "u8")
# runtime layer types that do a convolution's / matmul's work (Subgraph: OpenVINO's fused attention snippets)
COMPUTE = ("Convolution", "Deconvolution", "GroupConvolution", "FullyConnected", "MatMul", "Subgraph",
           "ScaledDotProductAttention")


def graph_layers(model) -> dict[str, dict]:
    """{ONNX node name: {layer, op, weighted, quantized}} for every Conv / Gemm / MatMul of a graph; ``quantized``:
    its first input comes from a DequantizeLinear (what the recipe's Q/DQ marks for int8)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = constants(model)
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        src = n.input[1]  # a weight: a constant, possibly through [Q ->] DQ [-> Transpose]
        while src not in consts and (p := producer.get(src)) is not None and p.op_type in (
                "QuantizeLinear", "DequantizeLinear", "Transpose"):
            src = p.input[0]
        p = producer.get(n.input[0])
        out[n.name] = {"layer": layer_of(n), "op": n.op_type, "weighted": src in consts,
                       "quantized": p is not None and p.op_type == "DequantizeLinear"}
    return out


def _rt(info, key: str) -> str:
    """A runtime op's rt_info entry as text ("" when it has none)."""
    return info[key].astype(str) if key in info else ""


def layer_precisions(compiled, model) -> list[dict]:
    """One row per Conv / Gemm / MatMul of the ONNX ``model``: what the compiled model's runtime graph runs it as
    ({node, layer, op, weighted, quantized, runtime_type, precision, kernel, int8, fallback}). A runtime op
    names the ONNX nodes it fused in rt_info "originalLayersNames" (low-precision transformations append
    suffixes: ".../to_q/MatMul/DequantizationMultiply"); a node maps to the conv / matmul op that names it, else
    to any op that does. ``fallback``: quantized in the graph, but OpenVINO runs it in float."""
    owners: dict[str, object] = {}
    for compute_first in (True, False):
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if (_rt(info, "layerType") in COMPUTE) != compute_first:
                continue
            for entry in _rt(info, "originalLayersNames").split(","):
                parts = entry.split("/")
                for k in range(2, len(parts) + 1):
                    owners.setdefault("/".join(parts[:k]), info)
    rows = []
    for node, g in graph_layers(model).items():
        info = owners.get(node)
        row = {"node": node, **g, "runtime_type": None, "precision": None, "kernel": None}
        if info is not None:
            row.update(runtime_type=_rt(info, "layerType"), precision=_rt(info, "runtimePrecision"),
                       kernel=_rt(info, "primitiveType"))
        row["int8"] = row["precision"] in INT8
        row["fallback"] = bool(g["quantized"] and not row["int8"])
        rows.append(row)
    return rows


def precision_report(onnx_path: Path, *, probe: dict | None = None, fp_output=None, threads: int | None = None) -> dict:
    """Compile ``onnx_path`` with OpenVINO (CPU, FP32 math) and describe what runs: per-layer rows, counts, the
    float fallbacks, the standalone (unfused) FakeQuantize ops by output precision, the CPU's int8 instructions and
    whether the graph's weight codes can saturate its kernels; with ``probe`` (a feed of torch tensors), also
    OpenVINO vs the graph's float Q/DQ reference (ONNX Runtime, optimisations off), and with ``fp_output`` (the
    unquantized model's output on the probe) both against it."""
    try:
        import openvino as ov
    except ImportError as e:
        raise RuntimeError(f"the openvino target needs OpenVINO ({e}): {INSTALL_HINT}") from None
    import onnx
    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    t0 = time.perf_counter()
    compiled = core.compile_model(str(onnx_path), "CPU", cfg)
    seconds = time.perf_counter() - t0
    model = onnx.load(str(onnx_path))
    rows = layer_precisions(compiled, model)
    kinds = Counter()
    for r in rows:
        kind = "conv" if r["op"] == "Conv" else "matmul" if r["weighted"] else "attention matmul"
        kinds[(kind, "int8" if r["int8"] else "float", "quantized" if r["quantized"] else "not quantized")] += 1
    ops = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
    isa = cpu_int8_isa()
    codes = weight_code_ranges(model).values()  # the graph loaded once, above
    code_max = max((max(-lo, hi) for lo, hi in codes), default=0)
    saturate = pair_sums_saturate(isa)
    fqs = [i for i in ops if _rt(i, "layerType") == "FakeQuantize"]
    doc = {
        "onnx": Path(onnx_path).name, "onnx_sha256": sha256_file(onnx_path), "openvino": ov.get_version(),
        "device": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "cpu_int8_isa": isa,
        # vpmaddubsw adds two u8 x s8 products into a saturating 16-bit sum: 255 x 127 x 2 > 32767
        "int8_pair_sums_saturate": saturate,
        # the largest |weight code| of the graph: up to 64, two products of a u8 activation stay within 16 bits
        "weight_code_max": code_max,
        "weights_can_saturate": saturate and code_max > SAFE_WEIGHT_CODE,
        "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
        "compile_seconds": round(seconds, 2),
        "counts": [{"kind": k, "runs": p, "graph": q, "layers": n} for (k, p, q), n in sorted(kinds.items())],
        "int8_kernels": dict(Counter(r["kernel"] for r in rows if r["int8"])),
        "fallbacks": [r["layer"] for r in rows if r["fallback"]],
        "unmapped": [r["node"] for r in rows if r["runtime_type"] is None],
        # FakeQuantize ops OpenVINO did not fuse into a neighbour: with an int8 output they are the quantize step
        # as its own kernel (the tensor also feeds float layers, e.g. a concat feeding a norm and a shortcut conv,
        # or three linears: an extra pass over it, nothing lost); with a float output, a Q/DQ pair run in float
        "standalone_fake_quantize": len(fqs),
        "standalone_fake_quantize_float_out": sum(_rt(i, "outputPrecisions") not in INT8 for i in fqs),
        "layers": rows,
    }
    if probe is not None:
        doc["vs_qdq_reference"] = _compare_with_reference(compiled, onnx_path, probe, fp_output)
    return doc


def _rel_rmse(a, b) -> float:
    """Relative RMSE of ``a`` against ``b``, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def _compare_with_reference(compiled, onnx_path: Path, probe: dict, fp_output=None) -> dict:
    """OpenVINO vs the graph's reference semantics on the same inputs: ONNX Runtime with graph optimisations off
    evaluates every QuantizeLinear / DequantizeLinear in float (the fake-quant model's arithmetic; with them on, it
    fuses int8 MatMul kernels that saturate like OpenVINO's on CPUs without VNNI). Max |diff|, relative RMSE; with
    ``fp_output``, the relative RMSE of each against the unquantized model (``vs_fp``: what quantization costs as
    the graph defines it, and as OpenVINO computes it on this CPU)."""
    import onnxruntime as ort
    feed = {k: v.numpy() for k, v in probe.items()}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]).run(["out_sample"], feed)[0]
    got = compiled.create_infer_request().infer(feed)[compiled.output("out_sample")]
    diff = got.astype(np.float64) - ref
    out = {"rows": int(ref.shape[0]), "max_abs_diff": float(np.abs(diff).max()), "rel_rmse": _rel_rmse(got, ref)}
    if fp_output is not None:
        out["vs_fp"] = {"graph": _rel_rmse(ref, fp_output), "openvino": _rel_rmse(got, fp_output)}
    return out


def summary(doc: dict) -> str:
    """The report as a few lines of text (``<onnx>.openvino.txt``)."""
    lines = [f"{doc['onnx']}: OpenVINO {doc['openvino'].split('-')[0]} on {doc['device']} "
             f"(int8 instructions: {doc['cpu_int8_isa']}), non-quantized math {doc['inference_precision']}, "
             f"compiled in {doc['compile_seconds']} s"]
    for c in doc["counts"]:
        lines.append(f"  {c['kind']:16s} {c['layers']:4d} run in {c['runs']:5s} ({c['graph']} in the graph)")
    if doc["int8_kernels"]:
        lines.append("  int8 kernels: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["int8_kernels"].items())))
    lines.append("  quantized in the graph but run in float: " + (", ".join(doc["fallbacks"]) or "none"))
    if doc["unmapped"]:
        lines.append("  not found in the runtime graph: " + ", ".join(doc["unmapped"]))
    n_fq, n_float = doc["standalone_fake_quantize"], doc.get("standalone_fake_quantize_float_out")
    split = "" if n_float is None or not n_fq else (f"; {n_fq - n_float} quantize a tensor to int8 for int8 layers "
                                                     f"(an extra pass), {n_float} run a Q/DQ pair in float")
    lines.append(f"  standalone FakeQuantize ops (not fused into a neighbouring kernel): {n_fq}{split}")
    if "vs_qdq_reference" in doc:
        v = doc["vs_qdq_reference"]
        lines.append(f"  vs the graph's float Q/DQ reference (ONNX Runtime, optimisations off; {v['rows']} probe rows): "
                     f"max |diff| {v['max_abs_diff']:.3g}, relative RMSE {v['rel_rmse']:.2e}")
        if "vs_fp" in v:
            lines.append(f"  vs the unquantized model, relative RMSE: the graph {v['vs_fp']['graph']:.2e}, "
                         f"OpenVINO on this CPU {v['vs_fp']['openvino']:.2e}")
    if doc["weights_can_saturate"]:
        lines.append(f"  warning: this CPU has no VNNI / AMX: OpenVINO's int8 kernels add u8 x s8 products in pairs into "
                     f"saturating 16-bit sums (vpmaddubsw), and this graph's weight codes reach {doc['weight_code_max']} "
                     f"(> {SAFE_WEIGHT_CODE}), so its int8 layers can saturate; --weight-bits 7 exports codes that "
                     "cannot (see docs/deployment.md, OpenVINO)")
    return "\n".join(lines) + "\n"


def _fp_output(loaded, probe: dict):
    """The unquantized UNet's output on the probe (float64 numpy), the reference of the report's ``vs_fp``."""
    kw = {k: v for k, v in probe.items() if k not in ("sample", "timestep")}
    with torch.no_grad():
        return loaded.unet(probe["sample"], probe["timestep"], **kw).sample.double().numpy()


def graph_options(options: dict | None) -> dict:
    """The export options for OpenVINO: a groups=K recipe becomes K graphs, one per timestep group, switched by
    timestep at run time, unless ``one_graph`` insists on one. On a CPU the one-graph form's per-row scaling costs
    20-30 % of the int8 graph's time (the Mul / Div / Add around each layer run as separate passes), and K graphs
    cost K compilations and K copies of the int8 weights but no time per call (docs/performance.md)."""
    opts = dict(options or {})
    if not opts.get("one_graph"):
        opts["group_engines"] = True
    return opts


class OpenVinoTarget(Target):
    """The shared Q/DQ graph with FP32 math, compiled by OpenVINO for this CPU, with a per-layer precision report."""
    name = "openvino"
    help = ("the TensorRT target's checked Q/DQ graph with FP32 math, run by OpenVINO on the CPU (int8 kernels "
            "from the same Q/DQ; report of the precision each layer runs in)")
    order = 20
    default_precision = "fp32"  # the graph's non-quantized math; bf16 is a run-time choice (--ov-precision)

    def check(self, qcfg, recipe, options: dict | None = None) -> None:
        """What the Q/DQ graph cannot express (``trt_dm.export.qdq.check_settings``), and OpenVINO missing."""
        if qcfg.uses_fp8:
            raise ValueError(f"--format {qcfg.precision}: the openvino target runs int8 Q/DQ on the CPU, which has no FP8 "
                             "kernels; FP8 engines come from --target tensorrt (GPUs with FP8: SM89 and newer)")
        check_settings(qcfg, recipe, graph_options(options))
        try:
            import openvino  # noqa: F401  (before any calibration work)
        except ImportError as e:
            raise RuntimeError(f"the openvino target needs OpenVINO ({e}): {INSTALL_HINT}") from None

    def export(self, job: ExportJob, progress: Callable[[str], None] = print) -> list[Exported]:
        """The shared FP32 Q/DQ export (``trt_dm.export.qdq``: checks and layer-by-layer comparison included), then
        per graph OpenVINO's compile and the precision report."""
        if job.precision != "fp32":
            raise ValueError(f"the openvino target runs the FP32 Q/DQ graph, got precision {job.precision!r}; "
                             "bf16 math is a run-time option (trt-dm sample --openvino G --ov-precision bf16)")
        graphs = export_qdq(replace(job, precision="fp32", options=graph_options(job.options)), progress)
        probe = probe_inputs(job.loaded)
        fp = _fp_output(job.loaded, probe)
        for g in graphs:
            doc = precision_report(g.onnx, probe=probe, fp_output=fp)
            write_json(Path(f"{g.onnx}.openvino.json"), doc)
            text = summary(doc)
            atomic_write(Path(f"{g.onnx}.openvino.txt"), text.encode())
            progress(text.rstrip())
            if doc["fallbacks"]:
                progress(f"  note: {len(doc['fallbacks'])} quantized layers run in float in OpenVINO (listed above)")
        return graphs

    def usage(self, paths: list[Path]) -> str:
        """One line telling the user how to run what was produced."""
        return f"sample on CPU with: trt-dm sample --openvino {' '.join(str(p) for p in paths)}"


TARGET = OpenVinoTarget()
