"""`trt-dm engine` / `build` end to end: TensorRT-RTX plans, sidecars, guidance, W4A8, memory refusals."""
import json
import os

import pytest

from trt_dm.core.flavour import EngineError
from trt_dm.models.builders import tiny_unet2d
from trt_dm.targets.trt_builder import load_sidecar

# CI installs TensorRT-RTX (make test installs the [rtx] extra): there a missing module is a failure, not a skip.
trt = __import__("tensorrt_rtx") if os.environ.get("CI") else pytest.importorskip("tensorrt_rtx")


def test_engine_stops_after_checked_onnx_without_tensorrt(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    import trt_dm.targets.deploy as D
    from trt_dm.cli.main import main

    def none(flavour=None):
        raise EngineError("no TensorRT found (tensorrt or tensorrt_rtx not importable): pip install tensorrt-rtx-cu13")
    monkeypatch.setattr(D, "trt_module", none)
    rc = main(["engine", "--model", str(tiny_pipeline_dir), "--out-dir", str(tmp_path), "--cache-dir",
               str(tmp_path / "cc"), "--calib-n", "4", "--calib-steps", "4", "--batch", "4", "--no-progress",
               "--no-baseline", "--precision", "fp32", "--recipe", "ptq4dm"])
    assert rc == 0
    assert "stopping after the checked ONNX" in capsys.readouterr().out
    assert (tmp_path / f"{tiny_pipeline_dir.name}-ptq4dm.fp32.onnx").exists()
    assert not list(tmp_path.glob("*.plan"))


def test_groups_recipe_exports_and_builds_one_engine_per_timestep_group(tiny_pipeline_dir, tmp_path, capsys):
    """A groups=K recipe with --group-engines: K checked graphs and K engines, each sidecar carrying its timestep
    range (without the flag they go into one graph: tests/test_onegraph.py)."""
    from trt_dm.cli.main import main
    assert main(["engine", "--model", str(tiny_pipeline_dir), "--recipe", "max@groups=2", "--group-engines",
                 "--timesteps", "uniform",
                 "--out-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cc"), "--calib-n", "8", "--calib-steps",
                 "4", "--batch", "4", "--no-progress", "--no-baseline", "--rtx-targets", "SM89", "--opt-level", "0",
                 "--max-batch", "4", "--opt-batch", "2"]) == 0
    name = f"{tiny_pipeline_dir.name}-max_groups2"
    sides = [load_sidecar(tmp_path / f"{name}.g{k}.plan") for k in range(2)]
    assert [s.group for s in sides] == [0, 1] and all(s.groups == 2 for s in sides)
    (hi_max, hi_min), (lo_max, lo_min) = (s.t_range for s in sides)
    assert hi_max >= hi_min > lo_max >= lo_min  # group 0 holds the noisy end, group 1 the data end
    assert f"{name}.g0.plan" in capsys.readouterr().out


def test_class_conditional_engine_with_guidance(tiny_cls_pipeline_dir, tmp_path, capsys):
    """`trt-dm engine` on a class-conditional pipeline with guidance 3: calibration on every class with guidance,
    a checked graph with its class_labels input, and an engine whose profiles hold 2 UNet rows per image."""
    from trt_dm.cli.main import main
    assert main(["engine", "--model", str(tiny_cls_pipeline_dir), "--recipe", "ptq4dm", "--guidance-scale", "3",
                 "--out-dir", str(tmp_path),
                 "--cache-dir", str(tmp_path / "cc"), "--calib-n", "8", "--calib-steps", "4", "--batch", "4",
                 "--no-progress", "--no-baseline", "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1",
                 "--max-batch", "4", "--opt-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "profiles sized for 2 UNet rows per image (batch 2..8)" in out
    name = f"{tiny_cls_pipeline_dir.name}-ptq4dm"
    report = json.loads((tmp_path / f"{name}.onnx.json").read_text())
    assert report["guidance_scale"] == 3.0 and report["violations"] == []
    assert [i["name"] for i in report["signature"]["inputs"]] == ["sample", "timestep", "class_labels"]
    assert report["layer_comparison_fp32"]["max_code_diff"] <= 1  # probe inputs carry class labels too
    side = load_sidecar(tmp_path / f"{name}.plan")
    assert side.guidance_scale == 3.0 and side.inputs["class_labels"]["max"] == [8]
    assert side.inputs["sample"]["min"][0] == 2 and side.inputs["sample"]["opt"][0] == 4


def test_other_class_conditional_architecture_through_engine_and_ort_cpu(tmp_path, capsys):
    """A class-conditional UNet unlike the fixtures' (3 channels, 24 px, channels 16/32, scale-shift time
    conditioning, 6 classes + a null label 6, guidance 2): `trt-dm engine` (TensorRT-RTX) and
    `trt-dm export --target ort-cpu`, then sampling from the ONNX Runtime int8 graph with labels and guidance."""
    from diffusers import DDPMScheduler

    from trt_dm.cli.main import main

    path = tmp_path / "cls3"
    tiny_unet2d(3, num_class_embeds=7, in_channels=3, out_channels=3, sample_size=24, block_out_channels=(16, 32),
                resnet_time_scale_shift="scale_shift").save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2).save_pretrained(path / "scheduler")
    (path / "trt_dm.json").write_text(json.dumps({"null_class_label": 6, "num_classes": 6}))
    common = ["--model", str(path), "--guidance-scale", "2", "--out-dir", str(tmp_path / "out"), "--cache-dir",
              str(tmp_path / "cc"), "--calib-n", "6", "--calib-steps", "3", "--batch", "4", "--no-progress"]
    assert main(["engine", *common, "--no-baseline", "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1",
                 "--max-batch", "2", "--opt-batch", "1"]) == 0
    side = load_sidecar(tmp_path / "out" / "cls3-ptq4dm.plan")
    assert side.inputs["sample"]["max"] == [4, 3, 24, 24] and side.inputs["class_labels"]["max"] == [4]
    assert json.loads((tmp_path / "out" / "cls3-ptq4dm.onnx.json").read_text())["violations"] == []
    assert main(["export", "--target", "ort-cpu", *common]) == 0
    graph = tmp_path / "out" / "cls3-ptq4dm.ort-int8.onnx"
    assert main(["sample", "--model", str(path), "--onnx", str(graph), "--class-labels", "0", "5", "--guidance-scale",
                 "2", "--steps", "3", "--n", "2", "--no-progress", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


def test_w4a8_engine_builds_with_4bit_codes_on_the_int8_grid(tiny_pipeline_dir, tmp_path, capsys):
    """`trt-dm engine --weight-bits 4`: an ordinary int8 engine whose weight codes are the 4-bit integers, named
    apart from the W8 graphs; the stage table (wall time, peak memory) is written beside them."""
    from trt_dm.cli.main import main
    assert main(["engine", "--model", str(tiny_pipeline_dir), "--recipe", "ptq4dm", "--weight-bits", "4",
                 "--out-dir", str(tmp_path),
                 "--cache-dir", str(tmp_path / "cc"), "--calib-n", "8", "--calib-steps", "4", "--batch", "4",
                 "--no-progress", "--no-baseline", "--rtx-targets", "SM89", "--opt-level", "0", "--max-batch", "4",
                 "--opt-batch", "2"]) == 0
    out = capsys.readouterr().out
    name = f"{tiny_pipeline_dir.name}-ptq4dm-w4"
    side = load_sidecar(tmp_path / f"{name}.plan")
    assert side.precision == "int8" and "Int8" in side.layer_precisions["correlation"]
    report = json.loads((tmp_path / f"{name}.onnx.json").read_text())
    assert report["violations"] == []
    codes = report["extra"]["weight_codes"]
    assert codes["bits"] == 4 and -8 <= codes["min"] and codes["max"] == 7
    assert not (tmp_path / f"{tiny_pipeline_dir.name}-ptq4dm.plan").exists()
    stages = json.loads((tmp_path / f"{name}.stages.json").read_text())["stages"]
    names = [s["stage"] for s in stages]
    assert {"calibration", "export", "build", f"build {name}.plan"} <= set(names)
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in stages)
    assert "peak RSS GiB" in out


def test_fp16_conversion_refused_without_memory_names_the_fp32_graph(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    import trt_dm.export.qdq as Q
    from trt_dm.cli.main import main
    monkeypatch.setattr(Q, "FP16_MEMORY_PER_GRAPH_BYTE", 1e9)
    assert main(["export", "--model", str(tiny_pipeline_dir), "--out-dir", str(tmp_path), "--cache-dir",
                 str(tmp_path / "cc"), "--calib-n", "4", "--calib-steps", "4", "--batch", "4", "--no-progress",
                 "--recipe", "ptq4dm"]) == 1
    err = capsys.readouterr().err
    assert "the FP16 conversion of" in err and "--precision fp32" in err
    assert (tmp_path / f"{tiny_pipeline_dir.name}-ptq4dm.fp32.onnx").exists()  # the checked FP32 graph stays
    assert not (tmp_path / f"{tiny_pipeline_dir.name}-ptq4dm.onnx").exists()


def test_fp8_engine_standard_qdq_and_fp8_kernels(tiny_cls_pipeline_dir, tmp_path, capsys):
    """`trt-dm engine --format fp8` on a class-conditional pipeline with guidance, one graph for 2 timestep groups:
    standard opset-19 FLOAT8E4M3FN Q/DQ (no custom-domain node, weights stored as E4M3 bytes), the graph in ONNX
    Runtime equal to the torch E4M3 fake-quant model, a TensorRT-RTX plan for the FP8 targets whose layer report
    shows FP8 convolutions and GEMMs; targets without FP8 are refused before any work."""
    import onnx
    import torch

    from trt_dm import api
    from trt_dm.cli.main import main
    from trt_dm.export.onnx import check_qdq
    from trt_dm.export.qdq import probe_inputs
    from trt_dm.quant.calib.timesteps import parse
    from trt_dm.quant.calib.trajectories import CalibSpec
    from trt_dm.quant.config import QuantConfig
    from trt_dm.quant.fakequant import fake_quant_unet
    from trt_dm.quant.onegraph import one_graph
    from trt_dm.runtime.ort import OrtRunner
    common = ["--model", str(tiny_cls_pipeline_dir), "--recipe", "max@groups=2", "--timesteps", "uniform",
              "--format", "fp8", "--classes", "all", "--guidance-scale", "2", "--out-dir", str(tmp_path / "e"),
              "--cache-dir", str(tmp_path / "cc"), "--calib-n", "8", "--calib-steps", "4", "--batch", "4",
              "--no-progress", "--no-baseline", "--opt-level", "0", "--max-batch", "4", "--opt-batch", "2"]
    assert main(["engine", *common, "--rtx-targets", "SM80", "SM89"]) == 2
    assert "TensorRT-RTX targets SM80 have no FP8 (E4M3) kernels" in capsys.readouterr().err
    assert not (tmp_path / "cc").exists() and not (tmp_path / "e").exists()
    assert main(["engine", *common]) == 0
    name = f"{tiny_cls_pipeline_dir.name}-max_groups2-fp8.onegraph"
    graph = tmp_path / "e" / f"{name}.onnx"
    model = onnx.load(str(graph))
    assert {n.domain for n in model.graph.node} == {""} and max(o.version for o in model.opset_import) >= 19
    rep = check_qdq(graph)
    assert rep.violations == [] and rep.quantize > 0 and rep.fp8 == rep.quantize + rep.dequantize
    fp8_bytes = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims]
    assert len(fp8_bytes) >= rep.per_channel // 2 > 0  # the weights, one byte each
    side = load_sidecar(graph.with_suffix(".plan"))
    assert side.precision == "fp8" and side.rtx_targets == ["SM89", "SM120"]
    assert side.layer_precisions["correlation"].get("FP8", 0) > 0 and "Int8" not in side.layer_precisions["correlation"]
    # the FP32 Q/DQ graph in ONNX Runtime computes the fake-quant model (E4M3 rounding flips only)
    loaded = api.load(str(tiny_cls_pipeline_dir))
    spec = CalibSpec(parse("uniform"), n=8, steps=4, labels="all", guidance_scale=2.0)
    calib = api.calibrate(loaded, api.QuantSettings(recipe="max@groups=2", spec=spec, qcfg=QuantConfig(format="fp8"),
                                                    cache_root=tmp_path / "cc", batch=4), progress=False)
    assert calib.stats_reused  # the engine's calibration
    feed = probe_inputs(loaded)
    with torch.no_grad():
        ref = one_graph(fake_quant_unet(loaded, QuantConfig(format="fp8"), calib.ranges), calib.ranges)(**feed).sample
    with OrtRunner(graph.with_name(f"{name}.fp32.onnx")) as r:
        got = r.infer(feed)["out_sample"]
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999


def test_format_mix_engine_int8_and_fp8_layers_in_one_plan(tiny_cls_pipeline_dir, tmp_path, capsys):
    """A format mix (int8 model with FP8 layers, QuantConfig.fp8_layers) under guidance, one graph for 2 timestep
    groups: int8 and FLOAT8E4M3FN Q/DQ side by side in standard opset-19 ONNX, the layer comparison in ONNX Runtime
    passing for both, one TensorRT-RTX plan (FP8 targets) whose report shows Int8 and FP8 convolutions. Then
    `trt-dm engine --formats auto --budget E` end to end, and its bad input refused before any work."""
    import onnx

    from trt_dm import api
    from trt_dm.cli.main import main
    from trt_dm.export.onnx import check_qdq
    from trt_dm.quant.calib.timesteps import parse
    from trt_dm.quant.calib.trajectories import CalibSpec
    from trt_dm.quant.config import QuantConfig
    from trt_dm.targets.trt_builder import BuildOptions
    loaded = api.load(str(tiny_cls_pipeline_dir))
    spec = CalibSpec(parse("uniform"), n=8, steps=4, labels="all", guidance_scale=2.0)
    quant = api.QuantSettings(recipe="max@groups=2", spec=spec, qcfg=QuantConfig(fp8_layers=("down_blocks.0.*",)),
                              cache_root=tmp_path / "cc", batch=4)
    made = api.deploy(loaded, quant, target="tensorrt", out_dir=tmp_path / "e", progress=lambda _: None,
                      show_progress=False, build=True, baseline=False, options={"one_graph": True},
                      build_options=BuildOptions(max_batch=4, opt_batch=2, opt_level=0))
    (graph,) = made.graphs
    assert "-mix" in graph.onnx.name and graph.report.layer_comparison_fp32["flip_rate"] < 1e-3
    model = onnx.load(str(graph.onnx))
    assert {n.domain for n in model.graph.node} == {""}
    rep = check_qdq(graph.onnx)
    assert rep.violations == [] and 0 < rep.fp8 < rep.quantize + rep.dequantize
    side = load_sidecar(graph.onnx.with_suffix(".plan"))
    assert side.precision == "int8+fp8" and side.rtx_targets == ["SM89", "SM120"]
    corr = side.layer_precisions["correlation"]
    assert corr.get("FP8", 0) > 0 and corr.get("Int8", 0) > 0
    common = ["--model", str(tiny_cls_pipeline_dir), "--recipe", "max@groups=2", "--timesteps", "uniform",
              "--classes", "all", "--guidance-scale", "2", "--out-dir", str(tmp_path / "cli"),
              "--cache-dir", str(tmp_path / "cc2"), "--calib-n", "8", "--calib-steps", "4", "--batch", "4",
              "--no-progress", "--no-baseline", "--opt-level", "0", "--max-batch", "4", "--opt-batch", "2"]
    capsys.readouterr()
    for bad, says in ((["--formats", "auto"], "--formats needs --budget"),
                      (["--budget", "1e-3"], "--budget / --budget-on are the quality budget of a format search"),
                      (["--formats", "int8,fp4", "--budget", "1e-3"], "unknown format 'fp4'"),
                      (["--formats", "auto", "--budget", "1e-3", "--weight-bits", "4"], "searches W8A8 layers"),
                      (["--formats", "auto", "--budget", "1e-3", "--rtx-targets", "SM86"],
                       "SM86 have no FP8 (E4M3) kernels")):
        assert main(["engine", *common, *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert main(["export", "--target", "openvino", *common[:-7], "--formats", "auto", "--budget", "1e-3"]) == 2
    assert "which --target openvino has no kernels for" in capsys.readouterr().err
    assert not (tmp_path / "cc2").exists() and not (tmp_path / "cli").exists()
    # a budget no mix of int8 / FP8 can meet (FP16 not allowed): exit 1, one line saying what the best mix reached
    assert main(["engine", *common, "--formats", "int8,fp8", "--budget", "1e-9"]) == 1
    err = capsys.readouterr().err.strip()
    assert "the budget cannot be met with --formats int8,fp8" in err and "the best mix reached" in err
    assert not (tmp_path / "cli").exists()  # no graph, no plan
    assert main(["engine", *common, "--formats", "auto", "--budget", "1e-3", "--rtx-targets", "SM89"]) == 0
    out = capsys.readouterr().out
    assert "format mix: relative MSE" in out and "layer input precisions" in out
    assert list((tmp_path / "cli").glob("*.plan"))


def test_dit_engine_int8_gemms_and_the_graph_samples_with_guidance(tiny_dit_pipeline_dir, tmp_path, capsys):
    """A DiT pipeline through `trt-dm engine` (class labels, guidance 2, two timestep groups in one graph): the
    default exclusions keep its adaLN embeddings, patch embedding and last projection in FP; the checked Q/DQ graph
    matches the fake-quant model layer by layer; the TensorRT-RTX plan runs GEMMs on int8; `trt-dm sample --onnx`
    draws class-conditional guided images from the graph."""
    from trt_dm.cli.main import main
    from trt_dm.export.onnx import check_qdq
    out = tmp_path / "e"
    assert main(["engine", "--model", str(tiny_dit_pipeline_dir), "--classes", "all", "--guidance-scale", "2",
                 "--recipe", "max@groups=2", "--timesteps", "uniform", "--calib-n", "8", "--calib-steps", "4",
                 "--batch", "4", "--cache-dir", str(tmp_path / "cc"), "--out-dir", str(out), "--no-progress",
                 "--no-baseline", "--opt-level", "0", "--max-batch", "4", "--opt-batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "DiTTransformer2DModel" in text and "15 activation ranges" in text
    graph = out / f"{tiny_dit_pipeline_dir.name}-max_groups2.onegraph.onnx"
    assert check_qdq(graph).violations == []
    side = load_sidecar(graph.with_suffix(".plan"))
    assert side.layer_precisions["gemm"].get("Int8", 0) >= 10
    png = tmp_path / "s.png"
    fp32 = graph.with_name(graph.stem + ".fp32.onnx")
    assert main(["sample", "--model", str(tiny_dit_pipeline_dir), "--onnx", str(fp32),
                 "--class-labels", "1", "2", "--guidance-scale", "2", "--n", "2", "--steps", "4", "--sampler", "ddim",
                 "--out", str(png), "--no-progress"]) == 0
    assert png.exists() and "guidance 2" in capsys.readouterr().out
