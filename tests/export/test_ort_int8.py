"""The ONNX Runtime int8 CPU target: ranges from the calibration statistics (asymmetric), the layout ONNX
Runtime fuses into int8 kernels (checked on the optimised graph's op types), CLI target."""
import os

import onnx
import pytest
import torch

from trt_dm.core.signature import OUTPUT_NAME
from trt_dm.export.onnx import export_onnx
from trt_dm.export.ort_int8 import INT8_OPS, export_ort_int8, layer_inputs, optimized_op_types, range_overrides
from trt_dm.models.loading import load_model
from trt_dm.quant.calib.stats import CalibStats
from trt_dm.quant.calib.timesteps import TimestepSpec
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.calibrate import calibrate
from trt_dm.quant.config import QuantConfig
from trt_dm.runtime.ort import OrtRunner
from trt_dm.runtime.torch_runner import TorchRunner

SPEC = CalibSpec(TimestepSpec("ndtc", mu=0.4, sigma=0.4), n=8, steps=5, seed=0)


@pytest.fixture(scope="module")
def calibrated(tiny_pipeline_dir, tmp_path_factory):
    loaded = load_model(tiny_pipeline_dir)
    res = calibrate(loaded, SPEC, QuantConfig(), "ptq4dm", cache_root=tmp_path_factory.mktemp("cc"), batch_size=4,
                    progress=False)
    return loaded, res, CalibStats.load(res.stats_dir)


def test_overrides_are_asymmetric_ranges_from_the_statistics(calibrated, tmp_path):
    loaded, res, stats = calibrated
    inputs = layer_inputs(onnx.load(str(export_onnx(loaded.unet, tmp_path / "fp.onnx"))))
    assert set(res.ranges.names) <= set(inputs)
    ov = range_overrides(stats, res.ranges, inputs)
    assert len(ov) == len({inputs[layer][1] for layer in res.ranges.names}) < len(res.ranges)  # q/k/v share a tensor
    asymmetric = 0
    for layer, amax in res.ranges.amax().items():
        hists = stats.for_quantizer(layer).values()
        lo, hi = min(h.min for h in hists), max(h.max for h in hists)
        (o,) = ov[inputs[layer][1]]
        # layers sharing a tensor saw the same values: the same range
        assert float(o["rmin"]) == pytest.approx(min(max(lo, -amax), 0.0), rel=1e-6)
        assert float(o["rmax"]) == pytest.approx(max(min(hi, amax), 0.0), rel=1e-6)
        asymmetric += abs(float(o["rmin"]) + float(o["rmax"])) > 0.05 * amax
    assert asymmetric > len(res.ranges) // 4  # e.g. post-SiLU inputs: min ~ -0.28, max >> 1


def test_ort_int8_graph_fuses_int8_kernels_and_stays_close_to_fp(calibrated, tmp_path):
    loaded, res, stats = calibrated
    g = torch.Generator().manual_seed(0)
    feeds = [{"sample": torch.randn(4, 1, 16, 16, generator=g), "timestep": torch.randint(0, 100, (4,), generator=g)}
             for _ in range(2)]
    path = export_ort_int8(loaded.unet, tmp_path / "int8.onnx", feeds, layers=set(res.ranges.names), stats=stats,
                           ranges=res.ranges)
    ops = optimized_op_types(path)
    assert ops.get("QLinearConv", 0) >= 20, ops  # quantized convs run as int8 kernels
    assert sum(ops.get(k, 0) for k in INT8_OPS) >= len(res.ranges) - 2
    every = export_ort_int8(loaded.unet, tmp_path / "all.onnx", feeds, layers=set(res.ranges.names), stats=stats,
                            ranges=res.ranges, ops="all")
    ops_all = optimized_op_types(every)
    assert ops_all.get("QLinearAdd", 0) > 0 and ops_all.get("QLinearConv", 0) == ops["QLinearConv"]
    with OrtRunner(path) as o, OrtRunner(every) as o_all, TorchRunner(loaded.unet, device="cpu") as fp:
        a, a_all, b = (r.infer(feeds[0])[OUTPUT_NAME] for r in (o, o_all, fp))
    # ONNX Runtime's u8s8 int8 kernels without VNNI (AVX2 only) can saturate their 16-bit intermediate sums
    # (ONNX Runtime's quantization docs; measured here: cosine 0.968 on an AVX2-only CPU, > 0.98 with AVX-512 VNNI)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > (0.98 if _vnni() else 0.95)
    assert torch.nn.functional.cosine_similarity(a_all.flatten(), b.flatten(), dim=0) > 0.9
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def _vnni() -> bool:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_ort_cpu_refuses_w4_and_groups(tiny_pipeline_dir, tmp_path, capsys):
    from trt_dm.cli.main import main
    base = ["export", "--target", "ort-cpu", "--model", str(tiny_pipeline_dir), "--out-dir", str(tmp_path),
            "--cache-dir", str(tmp_path / "cc"), "--calib-n", "4", "--calib-steps", "4", "--batch", "4", "--no-progress"]
    assert main(base + ["--weight-bits", "4"]) == 2
    assert "supports W8A8" in capsys.readouterr().err
    assert main(base + ["--recipe", "ptq4dm-g4"]) == 2
    assert "'ptq4dm-g4' has timestep groups (for the tensorrt and openvino targets)" in capsys.readouterr().err
    # ONNX Runtime's quantizer sets the weights itself: a searched clip or learned rounding is refused, not dropped
    for extra in (["--weight-calib", "mse"], ["--rounding", "adaround"]):
        assert main(base + extra) == 2
        assert "ONNX Runtime's own abs-max ranges" in capsys.readouterr().err
    assert main(base + ["--smooth", "0.5"]) == 2  # its quantizer runs the FP model: balancing would be dropped
    assert "--smooth needs --target tensorrt or openvino" in capsys.readouterr().err
    assert not (tmp_path / "cc").exists() and not list(tmp_path.glob("*.onnx"))  # refused before any work


