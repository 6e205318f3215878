"""`trt-dm profile` end to end: report files, rows, bad architectures."""
import json

import pytest

from trt_dm.cli.main import main


def test_profile_writes_json_markdown_and_plot(tiny_unet_dir, tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--arch", str(tiny_unet_dir), "--batches", "1", "2", "--threads", "1", "--steps", "2",
                 "--warmup", "1", "--iters", "3", "--out-dir", str(out)]) == 0
    doc = json.loads((out / "profile.json").read_text())
    assert doc["profile_version"] == 1
    assert {"cpu", "cpu_count", "torch_threads", "gpu", "torch", "onnxruntime", "int8_isa"} <= set(doc["machine"])
    (res,) = doc["results"]
    assert res["params"] > 0 and res["threads"] == 1
    # the MACs of one image, counted from the model's own layers (conv: out elements x k x k x in / groups)
    from trt_dm.eval.profile import feed_for
    from trt_dm.models.builders import build_arch
    from trt_dm.quant.sensitivity import layer_macs
    unet, _ = build_arch(str(tiny_unet_dir))
    one = feed_for(unet, 1)
    assert res["macs_per_image"] == sum(layer_macs(unet, one.pop("sample"), one.pop("timestep"), one).values()) > 0
    assert set(res["runners"]) == {"torch-fp32", "ort-fp32", "ort-int8", "ort-int8-all-ops", "ort-int8-trt-layout",
                                   *_openvino_rows()}
    assert all("ov-" in n or "OpenVINO" in n for n in res["notes"])
    for row in res["runners"].values():
        assert [r["batch"] for r in row["latency"]] == [1, 2]
        for r in row["latency"]:
            assert 0 < r["median_ms"] <= r["p90_ms"] and r["images_per_s"] > 0
            assert r["gmac_per_s"] == pytest.approx(res["macs_per_image"] * r["images_per_s"] / 1e9)
            assert len(r["times_ms"]) == 3 and min(r["times_ms"]) == round(r["min_ms"], 3) and r["min_ms"] <= r["median_ms"] <= max(r["times_ms"])
        s = row["sampling"]
        assert s["batch"] == 2 and s["steps"] == 2 and s["images_per_s"] > 0 and 0 <= s["outside_unet_share"] < 1
        assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0
    md = (out / "profile.md").read_text()
    assert "| ort-int8 | 2 |" in md and "speed-up vs ort-fp32" in md and "GMAC/s" in md
    assert f"int8 dot products: {doc['machine']['int8_isa']}" in md and "GMAC per image" in md
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _openvino_rows() -> set[str]:
    """The OpenVINO rows `trt-dm profile` has here: none without OpenVINO, bf16 only with native bf16."""
    try:
        import openvino as ov
    except ImportError:
        return set()
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ({"ov-fp32", "ov-int8", "ov-int8-onegraph", "ov-int8-groups"}
            | ({"ov-bf16", "ov-int8-bf16", "ov-int8-groups-bf16"} if bf16 else set()))


def test_unknown_arch_is_a_clear_error(capsys):
    assert main(["profile", "--arch", "resnet50", "--out-dir", "/nonexistent"]) == 2
    assert ("neither one of ddpm-cifar10, sd15-unet, sdxl-unet, dit-xl-2, pixart-sigma, sd3-medium nor a loadable "
            "model") in capsys.readouterr().err


def test_profile_a_class_conditional_model_with_guidance(tiny_cls_pipeline_dir, tmp_path):
    """Every runner (the int8 graphs included) takes the class_labels input; the sampling run is guided."""
    out = tmp_path / "prof"
    assert main(["profile", "--arch", str(tiny_cls_pipeline_dir), "--batches", "2", "--threads", "1", "--steps", "2",
                 "--warmup", "1", "--iters", "2", "--guidance-scale", "2", "--runners", "torch-fp32", "ort-int8",
                 "--out-dir", str(out)]) == 0
    (res,) = json.loads((out / "profile.json").read_text())["results"]
    assert set(res["runners"]) == {"torch-fp32", "ort-int8"}
    assert all(r["sampling"]["guidance_scale"] == 2.0 for r in res["runners"].values())
