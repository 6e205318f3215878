"""`trt-dm engine` of a groups=K recipe end to end: ONE graph, in ONNX Runtime and as a TensorRT-RTX plan with int8 layers."""
import json

import onnxruntime as ort
import torch

from trt_dm import api
from trt_dm.quant.fakequant import fake_quant_unet, grouped_denoiser
from trt_dm.quant.modules import quantized_layers


def test_engine_one_graph_onnx_runtime_and_int8_layers(tiny_pipeline_dir, grouped, tmp_path, capsys):
    """`trt-dm engine --recipe max@groups=2` (one graph is the default; --one-graph insists, --group-engines opts
    out, the two together or --one-graph on a one-range recipe are refused before any work): one checked graph and
    one TensorRT-RTX engine; ONNX
    Runtime (Q/DQ as written) on the graph equals the K-range fake-quant model on rows of every group within the
    flips' reach (0.05); the builder's layer report has every quantized convolution and GEMM on int8 inputs."""
    import dataclasses

    from trt_dm.cli.main import main
    from trt_dm.targets.trt_builder import load_sidecar
    loaded, quant, _ = grouped
    quant = dataclasses.replace(quant, recipe="max@groups=2")
    ranges = api.calibrate(loaded, quant, progress=False).ranges  # the same statistics, two groups
    base = ["engine", "--model", str(tiny_pipeline_dir), "--recipe", "max@groups=2", "--timesteps", "uniform",
            "--calib-n", "32", "--calib-steps", "20", "--batch", "16", "--cache-dir", str(quant.cache_root),
            "--no-progress", "--no-baseline", "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1",
            "--max-batch", "8", "--opt-batch", "8"]
    for bad, msg in ((["--one-graph", "--group-engines"], "exclude each other"),
                     (["--one-graph", "--recipe", "max"], "needs a groups=K recipe")):
        assert main([*base, *bad, "--out-dir", str(tmp_path / "bad")]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*base, "--out-dir", str(tmp_path / "one")]) == 0
    stem = f"{tiny_pipeline_dir.name}-max_groups2"
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert f"{stem}.onegraph.plan" in files and not any(".g1." in f for f in files)
    report = json.loads((tmp_path / "one" / f"{stem}.onegraph.onnx.json").read_text())
    assert report["violations"] == [] and report["extra"]["one_graph"]["groups"] == 2 and "t_range" not in report
    assert report["layer_comparison_fp32"]["max_code_diff"] <= 1
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(tmp_path / "one" / f"{stem}.onegraph.fp32.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    x, t = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([99, 80, 60, 45, 30, 20, 5, 0])
    got = torch.from_numpy(sess.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0])
    ref = grouped_denoiser(fake_quant_unet(loaded, quant.qcfg, ranges), ranges)(x, t)
    print("ORT one graph vs K-range fake-quant, max |diff|:", (got - ref).abs().max().item())
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0)
    one = load_sidecar(tmp_path / "one" / f"{stem}.onegraph.plan").layer_precisions
    # TensorRT-RTX's layer report ("correlation" = convolution): every quantized Conv2d on int8 inputs, the two
    # excluded ones (conv_in, conv_out) in half; GEMMs on int8 too. Measured: a K-engine build of the same recipe
    # reports exactly the same (correlation 23 int8 + 2 half, gemm 9 int8 + 9 half)
    layers = quantized_layers(fake_quant_unet(loaded, quant.qcfg, ranges)).values()
    assert one["correlation"] == {"Int8": sum(isinstance(m, torch.nn.Conv2d) for m in layers), "Half": 2}
    assert one["gemm"]["Int8"] > 0
    capsys.readouterr()
