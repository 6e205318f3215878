"""`trt-dm export --target openvino`, `sample` / `eval` / `profile` with `--openvino`, end to end."""
from __future__ import annotations

import json
import os

import pytest

ov = pytest.importorskip("openvino")
from support import EXPORT, ort_reference, rel_rmse  # noqa: E402

from trt_dm.core.cpu import cpu_int8_isa  # noqa: E402
from trt_dm.core.signature import OUTPUT_NAME  # noqa: E402
from trt_dm.models.loading import load_model  # noqa: E402
from trt_dm.runtime.openvino import OpenVinoRunner  # noqa: E402


def test_w7_graph_cannot_saturate_and_openvino_computes_it(cls_graph, tmp_path, caplog):
    """--weight-bits 7: the 7-bit weight integers on the int8 grid (codes within [-64, 63], checked by the export),
    so OpenVINO's int8 kernels compute the graph itself on any x86 CPU, VNNI or not: relative RMSE against the
    float Q/DQ reference < 3e-2 (the VNNI bound of the 8-bit graph above; without VNNI the 8-bit graph measured
    0.29 on this model), and no saturation warning."""
    from trt_dm.cli.main import main
    from trt_dm.export.onnx import weight_code_ranges
    from trt_dm.export.qdq import probe_inputs
    model_dir, w8_graph, w8_out = cls_graph
    assert main(["export", "--target", "openvino", "--weight-bits", "7", "--model", str(model_dir),  # its statistics
                 "--out-dir", str(tmp_path), "--cache-dir", str(w8_out / "cc"), *EXPORT]) == 0
    graph = tmp_path / f"{model_dir.name}-ptq4dm-w7.fp32.onnx"
    report = json.loads((tmp_path / (graph.name + ".json")).read_text())
    assert not report["violations"] and report["quant"]["weight_bits"] == 7
    codes = weight_code_ranges(graph)
    assert len(codes) == report["quantized_layers"]
    assert report["extra"]["weight_codes"]["bits"] == 7 and -64 <= min(lo for lo, _ in codes.values())
    assert max(hi for _, hi in codes.values()) <= 63 and max(hi for _, hi in codes.values()) >= 60  # the range is used
    doc = json.loads((tmp_path / (graph.name + ".openvino.json")).read_text())
    assert doc["weight_code_max"] <= 64 and not doc["weights_can_saturate"]
    assert "--weight-bits 7" not in (tmp_path / (graph.name + ".openvino.txt")).read_text()
    feed = probe_inputs(load_model(model_dir))
    with caplog.at_level("WARNING", logger="trt_dm.runtime.openvino"):
        with OpenVinoRunner(graph, threads=1, cache_dir=False) as r:
            out = r.infer(feed)[OUTPUT_NAME]
        assert "--weight-bits 7" not in caplog.text
        with OpenVinoRunner(w8_graph, threads=1, cache_dir=False) as r:
            out8 = r.infer(feed)[OUTPUT_NAME]
    assert rel_rmse(out, ort_reference(graph, feed)) < 3e-2
    saturates = cpu_int8_isa() in ("avx2", "none")
    # a runner started on such a CPU warns too (the export may have run elsewhere), from the graph's report
    assert ("weight codes reach 127" in caplog.text and "--weight-bits 7" in caplog.text) is saturates
    if saturates:  # the 8-bit graph saturates here, the 7-bit one does not
        assert rel_rmse(out8, ort_reference(w8_graph, feed)) > rel_rmse(out, ort_reference(graph, feed))


def test_sample_with_openvino_and_guidance(cls_graph, tmp_path, capsys):
    from trt_dm.cli.main import main
    model_dir, graph, _ = cls_graph
    assert main(["sample", "--model", str(model_dir), "--openvino", str(graph), "--class-labels", "1", "2",
                 "--guidance-scale", "2", "--steps", "3", "--n", "2", "--threads", "1", "--no-progress",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists() and "2 images" in capsys.readouterr().out
    assert main(["sample", "--model", str(model_dir), "--openvino", str(tmp_path / "none.onnx"), "--steps", "2",
                 "--n", "1", "--no-progress", "--out", str(tmp_path / "h.png")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    assert main(["sample", "--model", str(model_dir), "--openvino", str(graph), "--onnx", str(graph), "--steps", "2",
                 "--n", "1", "--no-progress", "--out", str(tmp_path / "h.png")]) == 2
    assert "give one of engines, onnx, openvino or ranges" in capsys.readouterr().err


def test_eval_refuses_two_sources(cls_graph, capsys):
    from trt_dm.cli.main import main
    model_dir, graph, _ = cls_graph
    assert main(["eval", "--model", str(model_dir), "--openvino", str(graph), "--recipe", "ptq4dm", "--n", "2"]) == 2
    assert "give one, not --recipe and --openvino" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("TRT_DM_SLOW") != "1", reason="set TRT_DM_SLOW=1: samples and scores 8 images")
def test_eval_with_openvino(cls_graph, tmp_path):
    from trt_dm.cli.main import main
    model_dir, graph, _ = cls_graph
    assert main(["eval", "--model", str(model_dir), "--openvino", str(graph), "--classes", "all", "--n", "8",
                 "--steps", "3", "--eps-n", "2", "--ref-limit", "16", "--no-progress", "--threads", "1",
                 "--out-dir", str(tmp_path / "ev"), "--cache-dir", str(tmp_path / "cc")]) == 0
    res = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert res["openvino"] == str(graph) and res["ov_precision"] == "f32" and res["psnr_vs_fp"] > 0


def test_profile_has_openvino_rows(tiny_cls_pipeline_dir, tmp_path):
    """`trt-dm profile` times OpenVINO beside ONNX Runtime in the same interleaved rounds (guided sampling run)."""
    from trt_dm.cli.main import main
    out = tmp_path / "prof"
    assert main(["profile", "--arch", str(tiny_cls_pipeline_dir), "--batches", "2", "--threads", "1", "--steps", "2",
                 "--warmup", "1", "--iters", "2", "--guidance-scale", "2", "--runners", "ort-fp32", "ov-fp32", "ov-int8",
                 "--out-dir", str(out)]) == 0
    doc = json.loads((out / "profile.json").read_text())
    (res,) = doc["results"]
    assert set(res["runners"]) == {"ort-fp32", "ov-fp32", "ov-int8"}
    assert doc["machine"]["openvino"] == ov.get_version().split("-")[0]
    assert all(row["sampling"]["images_per_s"] > 0 for row in res["runners"].values())
    assert "| ov-int8 | 2 |" in (out / "profile.md").read_text()


def test_profile_times_the_timestep_group_deployments_on_a_mixed_batch(tiny_pipeline_dir, tmp_path):
    """The two deployments of a groups=K recipe side by side with the plain int8 graph: its one graph
    (``ov-int8-onegraph``) and its K graphs switched by each row's timestep (``ov-int8-groups``), on rows whose
    timesteps are spread over the schedule (the K-graph runner splits the call by group)."""
    from trt_dm.cli.main import main
    out = tmp_path / "prof"
    runners = ["ov-int8", "ov-int8-onegraph", "ov-int8-groups"]
    assert main(["profile", "--arch", str(tiny_pipeline_dir), "--batches", "4", "--threads", "1", "--steps", "2",
                 "--warmup", "1", "--iters", "2", "--timesteps", "spread", "--runners", *runners,
                 "--out-dir", str(out)]) == 0
    (res,) = json.loads((out / "profile.json").read_text())["results"]
    assert set(res["runners"]) == set(runners) and res["timesteps"] == "spread"
    assert all(row["latency"][0]["median_ms"] > 0 and row["sampling"]["images_per_s"] > 0
               for row in res["runners"].values())
    assert "timesteps spread over the schedule" in (out / "profile.md").read_text()
