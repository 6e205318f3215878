"""OpenVINO on the CPU: the runner (signature, cache, precision option, errors), the target's precision report,
and the int8 arithmetic of OpenVINO's kernels against an independent float64 reference of the Q/DQ graph.

References: a single Q/DQ layer is checked against float64 math on the int8 codes (round(x / s) clipped, times
the scale) — OpenVINO multiplies by 1/s where ONNX divides, so a value within float rounding of a code boundary
may round the other way: the tolerance is a few flipped input codes, each moving an output by at most
s_x * max|w|. A whole UNet is compared with ONNX Runtime running the same graph with graph optimisations off
(QuantizeLinear / DequantizeLinear evaluated in float: the fake-quant semantics, no int8 kernels).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ov = pytest.importorskip("openvino")

from support import EXPORT, ort_reference, rel_rmse  # noqa: E402

from trt_dm.core.cpu import cpu_int8_isa  # noqa: E402
from trt_dm.core.signature import OUTPUT_NAME  # noqa: E402
from trt_dm.models.loading import load_model  # noqa: E402
from trt_dm.runtime.openvino import OpenVinoRunner, compile_config, default_cache_dir  # noqa: E402
from trt_dm.runtime.ort import OrtRunner  # noqa: E402
from trt_dm.runtime.torch_runner import TorchRunner

VNNI = cpu_int8_isa() in ("amx", "avx512_vnni", "avx_vnni")


# ---- one Q/DQ layer against float64 -------------------------------------------------------------------------

def _qdq_layer(tmp_path, op: str, wmax: int, seed: int = 0):
    """A Q/DQ Conv (3x3, pad 1) or Gemm as modelopt exports it (symmetric int8, zero point 0, float weights -> Q ->
    DQ per output channel) with weight codes up to ``wmax``; returns (path, x, float64 reference, s_x * max|w|)."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh
    rng = np.random.default_rng(seed)
    c, k = 32, 32
    w = rng.normal(size=(k, c, 3, 3) if op == "Conv" else (k, c)).astype(np.float32)
    ws = (np.abs(w).reshape(k, -1).max(1) / wmax).astype(np.float32)
    xs = np.float32(3.0 / 127)
    x = (rng.normal(size=(4, c, 8, 8) if op == "Conv" else (16, c)) * 1.5).astype(np.float32)
    layer = (h.make_node("Conv", ["xd", "wd", "b"], [OUTPUT_NAME], pads=[1, 1, 1, 1], name="/layer/Conv") if op == "Conv"
             else h.make_node("Gemm", ["xd", "wd", "b"], [OUTPUT_NAME], transB=1, name="/layer/Gemm"))
    nodes = [h.make_node("QuantizeLinear", ["sample", "xs", "xz"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             h.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
             h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0), layer]
    b = rng.normal(size=k).astype(np.float32)
    inits = [nh.from_array(np.array(xs), "xs"), nh.from_array(np.array(0, np.int8), "xz"), nh.from_array(w, "w"),
             nh.from_array(ws, "ws"), nh.from_array(np.zeros(k, np.int8), "wz"), nh.from_array(b, "b")]
    y_shape = ["batch", k, 8, 8] if op == "Conv" else ["batch", k]
    graph = h.make_graph(nodes, "qdq", [h.make_tensor_value_info("sample", T.FLOAT, ["batch", *x.shape[1:]])],
                         [h.make_tensor_value_info(OUTPUT_NAME, T.FLOAT, y_shape)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / f"{op}-w{wmax}.onnx"
    onnx.save(model, str(path))
    # float64 reference: ONNX QuantizeLinear (round half to even, saturate to int8), times the scales
    xq = np.clip(np.round(x.astype(np.float64) / xs), -128, 127) * np.float64(xs)
    wq = np.clip(np.round(w.astype(np.float64) / ws.reshape(-1, *[1] * (w.ndim - 1))), -128, 127) \
        * ws.reshape(-1, *[1] * (w.ndim - 1)).astype(np.float64)
    if op == "Conv":
        ref = torch.nn.functional.conv2d(torch.from_numpy(xq), torch.from_numpy(wq), torch.from_numpy(b.astype(np.float64)),
                                         padding=1).numpy()
    else:
        ref = xq @ wq.T + b
    return path, torch.from_numpy(x), ref, float(xs) * float(np.abs(wq).max())


def _int8_sig(path):
    from trt_dm.targets.openvino import precision_report
    return {r["op"]: r["precision"] for r in precision_report(path)["layers"]}


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_one_qdq_layer_equals_float64_with_7bit_weights(op, tmp_path):
    """With weight codes up to 63, no intermediate sum of OpenVINO's int8 kernels can saturate on any x86 CPU
    (2 x 255 x 63 < 32767): the output equals the float64 reference up to a few flipped input codes."""
    path, x, ref, step = _qdq_layer(tmp_path, op, wmax=63)
    assert _int8_sig(path)[op] in ("i8", "u8")  # really an int8 kernel
    with OpenVinoRunner(path, threads=1, cache_dir=False) as r:
        got = r.infer({"sample": x})[OUTPUT_NAME].double().numpy()
    err = np.abs(got - ref)
    assert err.max() <= 2 * step + 1e-4  # at most two flipped input codes under any output
    assert np.mean(err > 1e-4) < 0.1  # and only around them (one flipped code touches 3.5 % of this conv's outputs)
    assert rel_rmse(got, ref) < 1e-3


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_one_qdq_layer_with_8bit_weights_is_exact_only_with_vnni(op, tmp_path):
    """The graph's own weights use all 8 bits (per-channel abs-max: code 127). With VNNI / AMX (32-bit dot
    products) OpenVINO's kernels stay exact; without them (AVX2: vpmaddubsw adds u8 x s8 products in pairs into
    saturating 16-bit sums) they do not — measured on this project's AVX2-only AMD EPYC: relative error 4.0e-2
    (Conv) and 8.0e-2 (Gemm), the worst output off by 116 and 56 input-code steps. The precision report says
    so (int8_pair_sums_saturate)."""
    from trt_dm.targets.openvino import precision_report
    path, x, ref, step = _qdq_layer(tmp_path, op, wmax=127)
    with OpenVinoRunner(path, threads=1, cache_dir=False) as r:
        got = r.infer({"sample": x})[OUTPUT_NAME].double().numpy()
    assert precision_report(path)["int8_pair_sums_saturate"] is (cpu_int8_isa() in ("avx2", "none"))
    if VNNI:
        assert np.abs(got - ref).max() <= 2 * step + 1e-4 and rel_rmse(got, ref) < 1e-3
    else:
        assert rel_rmse(got, ref) > 1e-3, "OpenVINO's int8 no longer saturates without VNNI: update docs/deployment.md"


# ---- the runner on the TensorRT target's graph --------------------------------------------------------------

def test_runner_feeds_class_labels_and_matches_the_qdq_reference(cls_graph):
    """The class-conditional graph: every signature input (sample, timestep, class_labels) is fed; labels matter;
    the output follows the float Q/DQ reference (ONNX Runtime, optimisations off). Tolerance: with VNNI / AMX,
    relative RMSE < 3e-2 (int8 codes that flip at rounding boundaries, amplified over ~50 quantized layers of a
    random-weight model); without, only cosine > 0.9 (the 16-bit saturation above, measured 0.29 relative RMSE
    on this model on an AVX2-only CPU)."""
    from trt_dm.export.qdq import probe_inputs
    model_dir, graph, _ = cls_graph
    loaded = load_model(model_dir)
    feed = probe_inputs(loaded)
    assert set(feed) == {"sample", "timestep", "class_labels"}
    with OpenVinoRunner(graph, threads=1, cache_dir=False) as r:
        assert r.signature.names == ["sample", "timestep", "class_labels"]
        assert r.signature["class_labels"].dtype == torch.int64 and r.signature["class_labels"].conditioning
        out = r.infer(feed)[OUTPUT_NAME]
        other = r.infer({**feed, "class_labels": (feed["class_labels"] + 1) % 10})[OUTPUT_NAME]
        with pytest.raises(ValueError, match="missing \\['class_labels'\\]"):
            r.infer({k: v for k, v in feed.items() if k != "class_labels"})
    assert out.dtype == torch.float32 and out.shape == feed["sample"].shape
    assert not torch.allclose(out, other)  # the labels reach the model
    ref = ort_reference(graph, feed)
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), torch.from_numpy(ref).flatten().double(), dim=0)
    if VNNI:
        assert rel_rmse(out, ref) < 3e-2
    assert cos > 0.9


def test_runner_feeds_a_one_graph_unet_by_its_input_names(tiny_pipeline_dir, tmp_path):
    """The default recipe's graph form (one graph, four timestep range sets, trt_dm.onegraph) casts its timestep
    right after the input, and OpenVINO merges that Cast's tensor name into the input port, whose first name is
    then '/Cast_output_0': the runner still takes the graph's own input names, and its output follows the float
    Q/DQ reference (tolerances as above) for rows in different timestep groups."""
    from trt_dm.eval.profile import _group_layouts, feed_for
    from trt_dm.quant.config import QuantConfig
    unet = load_model(tiny_pipeline_dir).unet
    graph, _, _ = _group_layouts(unet, QuantConfig(), [feed_for(unet, 2, seed=i) for i in range(2)], tmp_path)
    feed = {**feed_for(unet, 4, seed=5), "timestep": torch.tensor([990, 600, 300, 10])}
    with OpenVinoRunner(graph, threads=1, cache_dir=False) as r:
        assert r.signature.names == ["sample", "timestep"]
        out = r.infer(feed)[OUTPUT_NAME]
    ref = ort_reference(graph, feed)
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), torch.from_numpy(ref).flatten().double(), dim=0)
    if VNNI:
        assert rel_rmse(out, ref) < 3e-2
    assert cos > 0.9


def test_fp32_graph_equals_torch_and_onnxruntime(tiny_pipeline_dir, tmp_path):
    """The unquantized graph in OpenVINO (f32) equals torch FP and ONNX Runtime to float rounding (measured 6e-7
    relative on the tiny UNet)."""
    from trt_dm.export.onnx import export_onnx
    loaded = load_model(tiny_pipeline_dir)
    path = export_onnx(loaded.unet, tmp_path / "fp.onnx")
    feed = loaded.signature.example(3, seed=1, timestep=50)
    with OpenVinoRunner(path, threads=1) as o, OrtRunner(path) as ort_r, TorchRunner(loaded.unet, device="cpu") as t:
        a, b, c = (r.infer(feed)[OUTPUT_NAME] for r in (o, ort_r, t))
    assert rel_rmse(a, c) < 1e-5 and rel_rmse(a, b) < 1e-5
    assert o.effective_precision == "f32" and o.name == "openvino-fp32"


def test_streams_split_a_call_and_equal_one_stream(cls_graph):
    """With 2 streams a call of 5 rows runs as slices of 2 and 3 on two infer requests at once, a 1-row call on the
    one-stream compilation (all threads); both equal the one-stream runner row for row, up to the float rounding
    of another kernel schedule (measured: identical on the tiny UNet; tolerance 1e-5 relative), and repeat
    exactly."""
    from trt_dm.export.qdq import probe_inputs
    model_dir, graph, _ = cls_graph
    loaded = load_model(model_dir)
    feed = {k: torch.cat([v] * 3)[:5] for k, v in probe_inputs(loaded).items()}
    feed["class_labels"] = torch.arange(5)
    with OpenVinoRunner(graph, threads=2, streams=2, cache_dir=False) as two, \
            OpenVinoRunner(graph, threads=2, streams=1, cache_dir=False) as one:
        assert int(two.compiled.get_property("NUM_STREAMS")) == 2 and int(one.compiled.get_property("NUM_STREAMS")) == 1
        split = two.infer(feed)[OUTPUT_NAME]
        assert two._single is None  # 5 rows >= 2 streams: split, the one-stream compilation never needed
        again = two.infer(feed)[OUTPUT_NAME]
        whole = one.infer(feed)[OUTPUT_NAME]
        lone = two.infer({k: v[:1] for k, v in feed.items()})[OUTPUT_NAME]
        assert two._single is not None
    assert torch.equal(split, again)
    assert split.shape == feed["sample"].shape and rel_rmse(split, whole) < 1e-5
    assert rel_rmse(lone, whole[:1]) < 1e-5
    # per-row independence: the split's rows are the one-stream runner's, not a mix-up of slices
    assert rel_rmse(split[2:], whole[2:]) < 1e-5


def test_cache_is_populated_and_reused(cls_graph, tmp_path):
    _, graph, _ = cls_graph
    cache = tmp_path / "ovcache"
    with OpenVinoRunner(graph, threads=1, cache_dir=cache) as first:
        assert first.loaded_from_cache is False
    blobs = list(cache.iterdir())
    assert blobs and all(p.stat().st_size > 0 for p in blobs)
    with OpenVinoRunner(graph, threads=1, cache_dir=cache) as second:
        assert second.loaded_from_cache is True
    assert sorted(cache.iterdir()) == sorted(blobs)  # the same blob, nothing recompiled
    assert default_cache_dir(graph) == graph.with_name(graph.name.removesuffix(".onnx") + ".ovcache")


def test_bf16_option_says_what_runs(cls_graph, caplog):
    """bf16 math where the CPU has it; elsewhere OpenVINO keeps f32, which the runner reports and logs."""
    _, graph, _ = cls_graph
    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with caplog.at_level("WARNING"), OpenVinoRunner(graph, threads=1, precision="bf16", cache_dir=False) as r:
        assert r.effective_precision == ("bf16" if native else "f32")
    assert native or "runs f32 on this CPU" in caplog.text


def test_bad_input_is_a_clear_error(tmp_path, cls_graph):
    _, graph, _ = cls_graph
    with pytest.raises(FileNotFoundError, match="no such graph file"):
        OpenVinoRunner(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match=r"one of \['bf16', 'fp32'\], got 'fp16'"):
        OpenVinoRunner(graph, precision="fp16")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        compile_config(threads=0)
    with pytest.raises(ValueError, match="streams must be >= 1, got 0"):
        OpenVinoRunner(graph, streams=0)
    with pytest.raises(ValueError, match=r"streams \(3\) cannot exceed threads \(2\)"):
        compile_config(threads=2, streams=3)
    with pytest.raises(ValueError, match="cache folder .* cannot be created"):
        with OpenVinoRunner(graph, cache_dir="/proc/no/such/dir"):
            pass
    with pytest.raises(RuntimeError, match="not active"):
        OpenVinoRunner(graph).infer({})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(RuntimeError, match="OpenVINO could not compile"):
        with OpenVinoRunner(bad, cache_dir=False):
            pass


# ---- the target ----------------------------------------------------------------------------------------------

def test_target_reuses_the_tensorrt_graph_and_reports_int8_layers(cls_graph):
    _, graph, out = cls_graph
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        [graph.name, graph.name + ".json", graph.name + ".openvino.json", graph.name + ".openvino.txt",
         graph.name.split(".")[0] + ".stages.json"])  # + the stage table (wall time, peak memory) of the export
    export_report = json.loads((out / (graph.name + ".json")).read_text())
    assert export_report["target"] == "tensorrt" and export_report["precision"] == "fp32" and not export_report["violations"]
    doc = json.loads((out / (graph.name + ".openvino.json")).read_text())
    from trt_dm.core.io import sha256_file
    assert doc["onnx_sha256"] == sha256_file(graph) and doc["inference_precision"] == "f32"
    rows = doc["layers"]
    quantized = [r for r in rows if r["quantized"]]
    assert len(quantized) == export_report["quantized_layers"]
    convs = [r for r in quantized if r["op"] == "Conv"]
    assert len(convs) >= 20 and all(r["precision"] in ("i8", "u8") and r["runtime_type"] == "Convolution" for r in convs)
    assert all(r["precision"] in ("i8", "u8") for r in quantized)  # every quantized conv / linear runs int8
    assert doc["fallbacks"] == [] and doc["unmapped"] == []
    # unfused FakeQuantize ops: each quantizes a tensor that also feeds float layers (int8 out), none runs in float
    assert doc["standalone_fake_quantize"] > 0 and doc["standalone_fake_quantize_float_out"] == 0
    floats = {r["layer"] for r in rows if r["op"] == "Conv" and not r["quantized"]}
    assert floats == {"conv_in", "conv_out"}  # the default exclusions stay float
    assert all(r["precision"] == "f32" for r in rows if r["op"] == "Conv" and not r["quantized"])
    assert doc["int8_pair_sums_saturate"] is (cpu_int8_isa() in ("avx2", "none"))
    # per-channel abs-max weights use the whole int8 range: they can saturate exactly where pair sums do
    assert doc["weight_code_max"] == 127 and doc["weights_can_saturate"] is doc["int8_pair_sums_saturate"]
    assert doc["vs_qdq_reference"]["rows"] == 4
    vs_fp = doc["vs_qdq_reference"]["vs_fp"]  # what quantization costs: the graph's semantics and OpenVINO's run
    assert 0 < vs_fp["graph"] < 0.5 and 0 < vs_fp["openvino"] < 1
    text = (out / (graph.name + ".openvino.txt")).read_text()
    assert "run in int8" in text and "quantized in the graph but run in float: none" in text
    n_fq = doc["standalone_fake_quantize"]
    assert f"{n_fq} quantize a tensor to int8" in text and "0 run a Q/DQ pair in float" in text
    assert ("--weight-bits 7" in text) is doc["int8_pair_sums_saturate"]  # the remedy, named where it applies
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_report_lists_a_float_fallback():
    """A layer that is quantized in the graph but that OpenVINO runs in float is listed as a fallback."""
    from trt_dm.targets.openvino import layer_precisions

    class Str:
        def __init__(self, s):
            self.s = s

        def astype(self, _):
            return self.s

    class Op:
        def __init__(self, **kw):
            self.info = {k: Str(v) for k, v in kw.items()}

        def get_rt_info(self):
            return self.info

    class Compiled:
        def get_runtime_model(self):
            class M:
                def get_ordered_ops(self_inner):
                    return [Op(layerType="Convolution", runtimePrecision="f32", primitiveType="brgconv_avx2_f32",
                               originalLayersNames="/unet/a/conv1/Conv/WithoutBiases/DequantizationMultiply,/unet/a/conv1/Conv"),
                            Op(layerType="Convolution", runtimePrecision="u8", primitiveType="jit_avx2_I8",
                               originalLayersNames="/unet/a/conv2/Conv/WithoutBiases,/unet/a/conv2/Conv")]
            return M()

    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh
    w = nh.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    s = nh.from_array(np.array(1.0, np.float32), "s")
    z = nh.from_array(np.array(0, np.int8), "z")
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), h.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             h.make_node("Conv", ["d", "w"], ["y1"], name="/unet/a/conv1/Conv"),
             h.make_node("Conv", ["d", "w"], ["y2"], name="/unet/a/conv2/Conv"),
             h.make_node("Conv", ["y2", "w"], ["y3"], name="/unet/a/conv3/Conv")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 1, 2, 2])],
                     [h.make_tensor_value_info("y3", T.FLOAT, [1, 1, 2, 2])], [w, s, z])
    rows = {r["layer"]: r for r in layer_precisions(Compiled(), h.make_model(g))}
    assert rows["a.conv1"]["fallback"] and rows["a.conv1"]["precision"] == "f32"
    assert not rows["a.conv2"]["fallback"] and rows["a.conv2"]["int8"]
    assert rows["a.conv3"]["runtime_type"] is None and not rows["a.conv3"]["quantized"]  # not in the runtime graph


def test_target_refuses_fp16_and_needs_openvino(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    from trt_dm.cli.main import main
    base = ["export", "--target", "openvino", "--model", str(tiny_pipeline_dir), "--out-dir", str(tmp_path),
            "--cache-dir", str(tmp_path / "cc"), *EXPORT]
    assert main(base + ["--precision", "fp16"]) == 2
    assert "runs the FP32 Q/DQ graph" in capsys.readouterr().err
    assert main(base + ["--shortcut-split"]) == 2  # what TensorRT cannot express, refused before any work
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # as if not installed
    assert main(base) == 1
    assert "pip install 'trt_dm[openvino]'" in capsys.readouterr().err


def test_target_exports_a_groups_recipe_as_one_graph_per_group(tiny_pipeline_dir, tmp_path):
    """The default recipe (4 timestep range sets) on the openvino target: 4 plain graphs, each with its t range and
    OpenVINO's report, no one graph, sampled as one deployment (each step runs its group's graph); --one-graph still
    gives the one graph."""
    from trt_dm.cli.main import main
    calib = ["--calib-n", "8", "--calib-steps", "4", "--timesteps", "uniform", "--batch", "4", "--no-progress",
             "--cache-dir", str(tmp_path / "cc"), "--no-layer-comparison"]
    out = tmp_path / "k"
    assert main(["export", "--target", "openvino", "--model", str(tiny_pipeline_dir), "--recipe", "ptq4dm-g4",
                 "--out-dir", str(out), *calib]) == 0
    graphs = [out / f"{tiny_pipeline_dir.name}-ptq4dm-g4.g{k}.fp32.onnx" for k in range(4)]
    assert all(g.is_file() and Path(f"{g}.openvino.json").is_file() for g in graphs)
    assert not list(out.glob("*onegraph*"))
    t_ranges = [tuple(json.loads(Path(f"{g}.json").read_text())["t_range"]) for g in graphs]
    assert t_ranges[-1][1] == 0 and all(a[1] > b[0] for a, b in zip(t_ranges, t_ranges[1:]))  # disjoint, noisiest first
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--openvino", *map(str, graphs), "--steps", "4",
                 "--n", "2", "--threads", "1", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    one = tmp_path / "one"
    assert main(["export", "--target", "openvino", "--model", str(tiny_pipeline_dir), "--recipe", "ptq4dm-g4",
                 "--one-graph", "--out-dir", str(one), *calib]) == 0
    assert [p.name for p in one.glob("*.fp32.onnx")] == [f"{tiny_pipeline_dir.name}-ptq4dm-g4.onegraph.fp32.onnx"]


# ---- CLI: sample / eval with --openvino ----------------------------------------------------------------------


def test_open_denoiser_with_openvino_matches_the_runner(cls_graph):
    from trt_dm import api
    model_dir, graph, _ = cls_graph
    loaded = load_model(model_dir)
    feed = loaded.signature.example(2, seed=3, timestep=40)
    with api.open_denoiser(loaded, openvino=graph, threads=1) as den:
        assert den.describe["runner"] == "openvino-fp32" and den.describe["precision"] == "f32"
        a = den(feed["sample"], feed["timestep"], class_labels=feed["class_labels"])
    with OpenVinoRunner(graph, threads=1) as r:
        b = r.infer(feed)[OUTPUT_NAME]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="precision must be one of"):
        with api.open_denoiser(loaded, openvino=graph, ov_precision="int8"):
            pass


def test_runtime_does_not_import_openvino_until_a_runner_starts():
    import subprocess
    import sys
    code = ("import sys, trt_dm.runtime.open, trt_dm.api; from trt_dm.runtime.openvino import OpenVinoRunner; "
            "print('openvino' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"
