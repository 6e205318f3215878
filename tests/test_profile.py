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
    assert set(res["runners"]) == {"torch-fp32", "ort-fp32", "ort-int8", "ort-int8-all-ops", "ort-int8-trt-layout"}
    for row in res["runners"].values():
        assert [r["batch"] for r in row["latency"]] == [1, 2]
        for r in row["latency"]:
            assert 0 < r["median_ms"] <= r["p90_ms"] and r["images_per_s"] > 0
        s = row["sampling"]
        assert s["batch"] == 2 and s["steps"] == 2 and s["images_per_s"] > 0 and 0 <= s["outside_unet_share"] < 1
        assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0
    md = (out / "profile.md").read_text()
    assert "| ort-int8 | 2 |" in md and "speed-up vs ort-fp32" in md
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_architectures_have_the_stated_sizes():
    # parameter counts of the reference models (DDPM CIFAR-10: 35.7 M; SD 1.5 UNet: 859.5 M)
    unet, _ = build_arch("ddpm-cifar10")
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 35.7
    assert set(ARCHS) == {"ddpm-cifar10", "sd15-unet"}


def test_unknown_arch_is_a_clear_error(capsys):
    assert main(["profile", "--arch", "resnet50", "--out-dir", "/nonexistent"]) == 2
    assert "neither one of ddpm-cifar10, sd15-unet nor a loadable model" in capsys.readouterr().err
