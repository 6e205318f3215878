"""Engine builds with TensorRT-RTX, ahead of time on this CPU machine (a real parser + builder run on our ONNX),
sidecar checks, atomic writes, and `trt-dm engine` end to end on the default model."""
import json
import os

import pytest

from trt_dm.core.artifacts import check_sidecar, sidecar_path
from trt_dm.core.flavour import EngineError
from trt_dm.export.fp16 import to_fp16
from trt_dm.export.onnx import check_qdq, export_onnx
from trt_dm.models.builders import tiny_unet2d, tiny_unet2d_condition
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.modules import activation_quantizers, apply_ranges, quantize_model
from trt_dm.targets.trt_builder import BuildOptions, build_engine, load_sidecar

# CI installs TensorRT-RTX (make test installs the [rtx] extra): there a missing module is a failure, not a skip.
trt = __import__("tensorrt_rtx") if os.environ.get("CI") else pytest.importorskip("tensorrt_rtx")
SMALL = BuildOptions(min_batch=1, opt_batch=2, max_batch=4, seq_len=(4, 8, 16), opt_level=0, rtx_targets=("SM89",))


def _qdq(unet, tmp_path, name):
    q = quantize_model(unet, QuantConfig())
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    return to_fp16(export_onnx(q, tmp_path / f"{name}.fp32.onnx"), tmp_path / f"{name}.onnx")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    onnx_path = _qdq(tiny_unet2d(seed=0), tmp, "tiny")
    side = build_engine(onnx_path, tmp / "tiny.plan", SMALL, flavour="tensorrt_rtx", recipe="ptq4dm",
                        calibration="abc/def")
    return tmp, onnx_path, side


def test_rtx_builds_int8_engine_with_sidecar(built):
    tmp, onnx_path, side = built
    assert rep_ok(onnx_path)
    plan = tmp / "tiny.plan"
    assert plan.stat().st_size == side.plan_bytes > 0
    assert load_sidecar(plan) == side and load_sidecar(plan).to_dict() == json.loads(json.dumps(side.to_dict()))
    assert side.flavour == "tensorrt_rtx" and side.trt_version == trt.__version__
    assert side.rtx_targets == ["SM89"] and side.recipe == "ptq4dm" and side.calibration == "abc/def"
    assert side.inputs["sample"] == {"min": [1, 1, 16, 16], "opt": [2, 1, 16, 16], "max": [4, 1, 16, 16],
                                        "dtype": "FLOAT"}
    # the builder's own layer report: quantized convolutions run in int8 (conv_in / conv_out are excluded)
    conv = side.layer_precisions["correlation"]
    assert conv.get("Int8", 0) >= 20 and conv.get("Half", 0) >= 2
    assert not [p for p in tmp.iterdir() if ".tmp" in p.name]


def rep_ok(path) -> bool:
    rep = check_qdq(path)
    return rep.ok and rep.quantize > 0


def test_sidecar_accepts_its_engine_and_names_both_sides_of_a_mismatch(built):
    tmp, _, side = built
    plan = tmp / "tiny.plan"
    assert check_sidecar(plan, flavour="tensorrt_rtx", trt_version=trt.__version__, compute_capability="8.9")
    with pytest.raises(EngineError, match=rf"built by tensorrt_rtx {side.trt_version}, this runtime is 9\.9"):
        check_sidecar(plan, flavour="tensorrt_rtx", trt_version="9.9", compute_capability=None)
    with pytest.raises(EngineError, match=r"built with tensorrt_rtx, loaded with tensorrt"):
        check_sidecar(plan, flavour="tensorrt", trt_version=trt.__version__, compute_capability=None)
    with pytest.raises(EngineError, match=r"targets \['SM89'\], this GPU is SM80"):
        check_sidecar(plan, flavour="tensorrt_rtx", trt_version=trt.__version__, compute_capability="8.0")


def test_sidecar_refuses_a_replaced_plan_and_a_missing_sidecar(built, tmp_path):
    tmp, _, _ = built
    plan = tmp_path / "x.plan"
    plan.write_bytes((tmp / "tiny.plan").read_bytes()[:-1] + b"\0")
    sidecar_path(plan).write_text((tmp / "tiny.plan.json").read_text())
    with pytest.raises(EngineError, match="does not match the sidecar"):
        check_sidecar(plan, flavour="tensorrt_rtx", trt_version=trt.__version__, compute_capability=None)
    sidecar_path(plan).unlink()
    with pytest.raises(EngineError, match="has no sidecar"):
        load_sidecar(plan)


def test_tensorrt_sidecar_checks_the_gpu(tmp_path):
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"engine")
    sidecar_path(plan).write_text(json.dumps({"flavour": "tensorrt", "trt_version": "10.13", "gpu": "NVIDIA L4",
                                              "compute_capability": "8.9", "plan_sha256": "0" * 64}))
    with pytest.raises(EngineError, match=r"built for NVIDIA L4 \(compute capability 8\.9\), this GPU has compute "
                                          r"capability 9\.0"):
        check_sidecar(plan, flavour="tensorrt", trt_version="10.13", compute_capability="9.0", check_hash=False)


def test_interrupted_build_leaves_no_plan(built, tmp_path, monkeypatch):
    _, onnx_path, _ = built
    real = os.replace

    def interrupt(src, dst):
        if str(dst).endswith(".plan"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_engine(onnx_path, tmp_path / "cut.plan", SMALL, flavour="tensorrt_rtx")
    monkeypatch.undo()
    assert not (tmp_path / "cut.plan").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_unparseable_onnx_is_a_clear_error_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EngineError, match="could not parse"):
        build_engine(bad, tmp_path / "bad.plan", SMALL, flavour="tensorrt_rtx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


@pytest.mark.parametrize("opts, msg", [
    (BuildOptions(min_batch=4, opt_batch=2), "1 <= min <= opt <= max"),
    (BuildOptions(opt_level=7), "0..5"),
    (BuildOptions(rtx_targets=("SM99",)), "unknown TensorRT-RTX targets ['SM99']"),
])
def test_bad_build_options_are_refused(built, tmp_path, opts, msg):
    with pytest.raises(ValueError) as e:
        build_engine(built[1], tmp_path / "x.plan", opts, flavour="tensorrt_rtx")
    assert msg in str(e.value)


def test_conditional_unet_int8_and_fp16_build(tmp_path):
    """UNet2DConditionModel: dynamic batch and sequence length for encoder_hidden_states. The unquantized
    graph is built as exported (FP32 math; the FP16 autocast path is covered by the other builds)."""
    fp = export_onnx(tiny_unet2d_condition(seed=0), tmp_path / "cond-fp.fp32.onnx")
    q = _qdq(tiny_unet2d_condition(seed=0), tmp_path, "cond-int8")
    for path, precision in ((fp, "fp32"), (q, "int8")):
        side = build_engine(path, path.with_suffix(".plan"), SMALL, flavour="tensorrt_rtx", precision=precision)
        ehs = side.inputs["encoder_hidden_states"]
        assert ehs["min"] == [1, 4, 16] and ehs["max"] == [4, 16, 16]
    assert "Int8" in json.dumps(load_sidecar(q.with_suffix(".plan")).layer_precisions)
    assert "Int8" not in json.dumps(load_sidecar(fp.with_suffix(".plan")).layer_precisions)


def test_class_conditional_unet_builds_with_its_class_labels_input(tmp_path):
    """The signature's conditioning input reaches the engine: a graph input with the batch profile, recorded in
    the sidecar with the signature; the quantized convolutions still run in int8."""
    q = _qdq(tiny_unet2d(seed=0, num_class_embeds=10), tmp_path, "cls")
    side = build_engine(q, tmp_path / "cls.plan", SMALL, flavour="tensorrt_rtx", recipe="fixed")
    assert side.inputs["class_labels"]["min"] == [1] and side.inputs["class_labels"]["max"] == [4]
    assert side.inputs["class_labels"]["dtype"] == "INT64"
    labels = next(i for i in side.signature["inputs"] if i["name"] == "class_labels")
    assert labels["conditioning"] and labels["shape"] == ["batch"]
    assert side.layer_precisions["correlation"].get("Int8", 0) >= 20


@pytest.mark.slow
def test_trt_dm_engine_on_the_default_model(tmp_path, capsys):
    """What `make engine` runs, with a small calibration set: the default recipe ptq4dm-g4 in ONE checked Q/DQ
    graph, its int8 engine (every quantized convolution on int8 inputs) and the FP16 baseline; a second run reuses
    the calibration cache."""
    from trt_dm.cli.main import main
    args = ["engine", "--model", "default", "--out-dir", str(tmp_path / "engines"), "--cache-dir",  # (16 NDTC samples
            str(tmp_path / "cc"), "--calib-n", "16", "--calib-steps", "10", "--batch", "8", "--no-progress",  # fill 4 groups)
            "--rtx-targets", "SM89", "--opt-level", "0", "--max-batch", "8", "--opt-batch", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "statistics collected" in out
    eng = tmp_path / "engines"
    int8, fp16 = load_sidecar(eng / "default-ptq4dm-g4.onegraph.plan"), load_sidecar(eng / "default-fp16.plan")
    assert int8.precision == "int8" and int8.recipe == "ptq4dm-g4" and fp16.precision == "fp16"
    assert int8.layer_precisions["correlation"]["Int8"] == 33  # all but conv_in / conv_out
    assert "Int8" not in fp16.layer_precisions["correlation"]
    assert sorted(p.name for p in eng.glob("*.plan")) == ["default-fp16.plan", "default-ptq4dm-g4.onegraph.plan"]
    report = json.loads((eng / "default-ptq4dm-g4.onegraph.onnx.json").read_text())
    assert report["violations"] == [] and report["layer_comparison_fp32"]["max_code_diff"] <= 1
    assert report["extra"]["one_graph"]["groups"] == 4
    assert main(args + ["--no-baseline"]) == 0
    assert "statistics reused from cache" in capsys.readouterr().out


def test_inspector_precisions_reads_the_engine_inspector_json():
    """Full TensorRT's layer report comes from its engine inspector (it needs the GPU the engine was built for);
    the parse, on the JSON layout that ProfilingVerbosity.DETAILED gives ({"Layers": [{"LayerType", "Inputs":
    [{"Format/Datatype"}]}]}), runs here."""
    from trt_dm.targets.trt_builder import inspector_precisions
    info = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution", "Inputs": [{"Name": "x", "Format/Datatype": "Int8 NC/32HW32"}]},
        {"Name": "conv2", "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Channel major FP16 format"}]},
        {"Name": "gemm", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [{"Format/Datatype": "Int8 NC/32HW32"}]},
        {"Name": "act", "LayerType": "PointWiseV2", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]},
        "only-a-name"]}
    assert inspector_precisions(info) == {"convolution": {"Int8": 1, "Half": 1}, "gemm": {"Int8": 1}}
    assert inspector_precisions({"Layers": ["a", "b"]}) == {}


def test_layer_comparison_refused_without_memory_and_skippable(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    """A stage that would not fit is refused with the numbers before it starts (exit 1, the stage table says how
    far the run got); --no-layer-comparison skips that stage and says so in the report."""
    import trt_dm.export.qdq as Q
    from trt_dm.cli.main import main
    args = ["export", "--model", str(tiny_pipeline_dir), "--out-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cc"),
            "--calib-n", "4", "--calib-steps", "4", "--batch", "4", "--no-progress", "--precision", "fp32",
            "--recipe", "ptq4dm"]
    monkeypatch.setattr(Q, "COMPARISON_MEMORY_PER_GRAPH_BYTE", 1e9)  # a graph of a few MB would need PBs
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "the layer comparison of" in err and "GiB is available here" in err and "--no-layer-comparison" in err
    stages = json.loads((tmp_path / f"{tiny_pipeline_dir.name}-ptq4dm.stages.json").read_text())
    names = [s["stage"] for s in stages["stages"]]  # the checks were the last stage done; "export" ended with the error
    assert stages["error"].startswith("InsufficientMemoryError") and names[-2].endswith("checks") and names[-1] == "export"
    assert main(args + ["--no-layer-comparison"]) == 0
    assert "layer comparison with ONNX Runtime skipped" in capsys.readouterr().out
    report = json.loads((tmp_path / f"{tiny_pipeline_dir.name}-ptq4dm.fp32.onnx.json").read_text())
    assert report["layer_comparison_fp32"] == {"skipped": "--no-layer-comparison"} and report["violations"] == []




def test_build_refused_without_memory_names_the_way_past(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    """The engine build that would not fit is refused before it starts (exit 1): the unquantized baseline's names
    --no-baseline, without which the run builds the int8 engine."""
    import trt_dm.targets.tensorrt as T
    from trt_dm.cli.main import main
    args = ["engine", "--model", str(tiny_pipeline_dir), "--out-dir", str(tmp_path), "--cache-dir",
            str(tmp_path / "cc"), "--calib-n", "4", "--calib-steps", "4", "--batch", "4", "--no-progress",
            "--recipe", "ptq4dm", "--rtx-targets", "SM89", "--opt-level", "0", "--max-batch", "2", "--opt-batch", "1"]
    monkeypatch.setitem(T.BUILD_MEMORY_PER_GRAPH_BYTE, "unquantized", 1e9)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "the engine build of" in err and "at least 1000000000.0x" in err and "--no-baseline skips" in err
    assert main(args + ["--no-baseline"]) == 0
    assert (tmp_path / f"{tiny_pipeline_dir.name}-ptq4dm.plan").is_file()


def test_fp8_build_options_keep_fp8_targets_and_refuse_others():
    from trt_dm.targets.trt_builder import FP8_RTX_TARGETS, BuildOptions, for_format
    default = BuildOptions()
    assert for_format(default, "int8") is default
    assert for_format(default, "fp8").rtx_targets == tuple(t for t in default.rtx_targets if t in FP8_RTX_TARGETS)
    assert for_format(BuildOptions(rtx_targets=("SM120",)), "fp8").rtx_targets == ("SM120",)
    with pytest.raises(ValueError, match="TensorRT-RTX targets SM75, SM86 have no FP8"):
        for_format(BuildOptions(rtx_targets=("SM75", "SM86", "SM89")), "fp8")
