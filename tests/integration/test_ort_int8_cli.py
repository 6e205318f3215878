"""`trt-dm engine --target ort-cpu` end to end, unconditional and class-conditional."""
import json

import onnx


def test_engine_target_ort_cpu(tiny_pipeline_dir, tmp_path, capsys):
    from trt_dm.cli.main import main
    assert main(["engine", "--target", "ort-cpu", "--model", str(tiny_pipeline_dir), "--out-dir", str(tmp_path / "new"),
                 "--cache-dir", str(tmp_path / "cc"), "--calib-n", "8", "--calib-steps", "4", "--batch", "4",
                 "--no-progress"]) == 0
    out = tmp_path / "new" / f"{tiny_pipeline_dir.name}-ptq4dm.ort-int8.onnx"  # the folder is created
    report = json.loads(out.with_name(out.name + ".json").read_text())
    assert report["target"] == "ort-cpu" and report["extra"]["optimized_int8_ops"]["QLinearConv"] >= 20
    assert "QLinearConv" in capsys.readouterr().out


def test_ort_cpu_target_on_a_class_conditional_model(tiny_cls_pipeline_dir, tmp_path, capsys):
    """The ONNX Runtime int8 layout of a class-conditional model: class_labels is a graph input, the output
    ranges are measured on guided calls (both halves), and the graph samples with labels and guidance."""
    from trt_dm.cli.main import main
    assert main(["export", "--target", "ort-cpu", "--model", str(tiny_cls_pipeline_dir), "--guidance-scale", "2",
                 "--out-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cc"), "--calib-n", "8", "--calib-steps",
                 "4", "--batch", "4", "--no-progress"]) == 0
    path = tmp_path / f"{tiny_cls_pipeline_dir.name}-ptq4dm.ort-int8.onnx"
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["sample", "timestep", "class_labels"]
    assert main(["sample", "--model", str(tiny_cls_pipeline_dir), "--onnx", str(path), "--class-labels", "1", "2",
                 "--guidance-scale", "2", "--steps", "3", "--n", "2", "--no-progress", "--out", str(tmp_path / "g.png")]) == 0
