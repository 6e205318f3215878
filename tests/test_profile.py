"""`trt-dm profile` on a tiny model: the report's schema, the runners it finds, the files it writes."""
import json

from trt_dm.cli import main
from trt_dm.profile import ARCHS, build_arch


def test_profile_writes_json_markdown_and_plot(tiny_unet_dir, tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--arch", str(tiny_unet_dir), "--batches", "1", "2", "--threads", "1", "--steps", "2",
                 "--warmup", "1", "--iters", "3", "--out-dir", str(out)]) == 0
    doc = json.loads((out / "profile.json").read_text())
    assert doc["profile_version"] == 1
    assert {"cpu", "cpu_count", "torch_threads", "gpu", "torch", "onnxruntime"} <= set(doc["machine"])
    (res,) = doc["results"]
    assert res["params"] > 0 and res["threads"] == 1
    assert set(res["runners"]) == {"torch-fp32", "ort-fp32", "ort-int8", "ort-int8-all-ops", "ort-int8-trt-layout",
                                   *_openvino_rows()}
    assert all("ov-" in n or "OpenVINO" in n for n in res["notes"])
    for row in res["runners"].values():
        assert [r["batch"] for r in row["latency"]] == [1, 2]
        for r in row["latency"]:
            assert 0 < r["median_ms"] <= r["p90_ms"] and r["images_per_s"] > 0
            assert len(r["times_ms"]) == 3 and min(r["times_ms"]) == round(r["min_ms"], 3) and r["min_ms"] <= r["median_ms"] <= max(r["times_ms"])
        s = row["sampling"]
        assert s["batch"] == 2 and s["steps"] == 2 and s["images_per_s"] > 0 and 0 <= s["outside_unet_share"] < 1
        assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0
    md = (out / "profile.md").read_text()
    assert "| ort-int8 | 2 |" in md and "speed-up vs ort-fp32" in md
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _openvino_rows() -> set[str]:
    """The OpenVINO rows `trt-dm profile` has here: none without OpenVINO, bf16 only with native bf16."""
    try:
        import openvino as ov
    except ImportError:
        return set()
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {"ov-fp32", "ov-int8", "ov-int8-onegraph"} | ({"ov-bf16"} if bf16 else set())


def test_benchmark_architectures_have_the_stated_sizes():
    # parameter counts of the reference models (DDPM CIFAR-10: 35.7 M; SD 1.5 UNet: 859.5 M)
    unet, _ = build_arch("ddpm-cifar10")
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 35.7
    assert set(ARCHS) == {"ddpm-cifar10", "sd15-unet"}


def test_unknown_arch_is_a_clear_error(capsys):
    assert main(["profile", "--arch", "resnet50", "--out-dir", "/nonexistent"]) == 2
    assert "neither one of ddpm-cifar10, sd15-unet nor a loadable model" in capsys.readouterr().err


def test_interleaved_timing_rounds_rotate_and_settle(tiny_unet_dir):
    # every runner gets exactly `iters` timings; each round starts with an untimed (settling) call per runner,
    # and the order of runners rotates from round to round
    import copy

    import torch

    from trt_dm.models import load_model
    from trt_dm.profile import _time_interleaved, feed_for
    from trt_dm.runners import TorchRunner

    unet = load_model(tiny_unet_dir).unet
    log: list[str] = []
    runners = {}
    for name in ("a", "b", "c"):
        net = copy.deepcopy(unet)
        net.register_forward_hook(lambda m, i, o, name=name: log.append(name))
        runners[name] = TorchRunner(net, device="cpu", dtype=torch.float32, name=name)
    with runners["a"], runners["b"], runners["c"]:
        times = _time_interleaved(runners, feed_for(unet, 1), warmup=1, iters=7, block=3, settle=1)
    assert {n: len(v) for n, v in times.items()} == {"a": 7, "b": 7, "c": 7}
    assert all(t > 0 for v in times.values() for t in v)
    body = log[3:]  # after one warm-up call each
    # rounds of (1 settling + 3 timed) calls per runner, twice, then a last round of (1 + 1)
    assert len(body) == 3 * (4 + 4 + 2)
    assert body[0:12] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert body[12:24] == ["b"] * 4 + ["c"] * 4 + ["a"] * 4
    assert body[24:] == ["c", "c", "a", "a", "b", "b"]


def test_profile_a_class_conditional_model_with_guidance(tiny_cls_pipeline_dir, tmp_path):
    """Every runner (the int8 graphs included) takes the class_labels input; the sampling run is guided."""
    out = tmp_path / "prof"
    assert main(["profile", "--arch", str(tiny_cls_pipeline_dir), "--batches", "2", "--threads", "1", "--steps", "2",
                 "--warmup", "1", "--iters", "2", "--guidance-scale", "2", "--runners", "torch-fp32", "ort-int8",
                 "--out-dir", str(out)]) == 0
    (res,) = json.loads((out / "profile.json").read_text())["results"]
    assert set(res["runners"]) == {"torch-fp32", "ort-int8"}
    assert all(r["sampling"]["guidance_scale"] == 2.0 for r in res["runners"].values())
