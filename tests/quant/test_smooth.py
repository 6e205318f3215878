"""Channel balancing (SmoothQuant, ``--smooth``): exact in FP, flatter activation ranges, less int8 error on
outlier channels, cached beside the statistics, exported as a Mul before the layer's Q/DQ."""
import copy
import json
import re

import pytest
import torch
from torch import nn

from trt_dm.quant.calib import smooth
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.modules import activation_quantizers, all_quantizers, quantize_model


class TwoLinear(nn.Module):
    """x -> fc2(gelu(fc1(x))) with a (B, tokens, 16) input: two quantizable linear layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x, t=None):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _outlier_inputs(n: int = 6) -> list:
    g = torch.Generator().manual_seed(1)
    xs = []
    for _ in range(n):
        x = torch.randn(4, 10, 16, generator=g)
        x[..., 3] *= 60.0  # one outlier channel, as transformer activations have
        xs.append((x, torch.zeros(4), {}))
    return xs


def _quantized(model: nn.Module, alpha: float) -> tuple[nn.Module, dict]:
    """The model quantized (W8A8, abs-max input ranges over the batches), balanced first when alpha > 0."""
    q = quantize_model(copy.deepcopy(model), QuantConfig(exclude=()))
    scales = {}
    batches = _outlier_inputs()
    if alpha:
        layers = smooth.smoothed_layers(q)
        scales = smooth.factors(layers, smooth.channel_absmax(q, layers, batches), alpha)
        smooth.apply(q, scales)
    from trt_dm.quant.modules import observing
    amax: dict[str, float] = {}
    with torch.no_grad(), observing(q, lambda n, x: amax.__setitem__(n, max(amax.get(n, 0.0), float(x.abs().max())))):
        for x, t, _ in batches:
            q(x)
    for name, quantizer in activation_quantizers(q).items():
        quantizer.amax = torch.tensor(amax[name])
    return q, scales


def test_balancing_is_exact_in_full_precision_and_cuts_the_int8_error_of_an_outlier_channel():
    model = TwoLinear()
    x = _outlier_inputs(1)[0][0]
    plain, _ = _quantized(model, 0.0)
    balanced, scales = _quantized(model, 0.5)
    assert set(scales) == {"fc1", "fc2"} and scales["fc1"][3] > 5 * scales["fc1"].median()
    with torch.no_grad():
        ref = model(x)
        for m in (plain, balanced):  # quantizers off: the balanced model is the FP model (up to float rounding)
            for q in all_quantizers(m).values():
                q.disable()
        assert torch.allclose(balanced(x), ref, rtol=1e-5, atol=1e-4)
        for m in (plain, balanced):
            for q in all_quantizers(m).values():
                q.enable()
        err_plain = (plain(x) - ref).square().mean()
        err_balanced = (balanced(x) - ref).square().mean()
    assert err_balanced < 0.5 * err_plain  # the outlier no longer sets the step of every other channel
    # the input quantizer divides by s before quantizing; the weight columns carry s
    assert torch.allclose(balanced.fc1.input_quantizer.pre_quant_scale, 1 / scales["fc1"])
    assert torch.allclose(balanced.fc1.weight, model.fc1.weight * scales["fc1"])


def test_factors_follow_the_migration_strength_and_leave_dead_channels_alone():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 0.5, 0.0], [0.5, 1.0, 0.25, 0.0]]))
    act = torch.tensor([4.0, 1.0, 16.0, 3.0])
    s = smooth.factors({"l": layer}, {"l": act}, 0.5)["l"]
    assert torch.allclose(s, torch.tensor([2.0, 0.5 ** 0.5, 4.0 / 0.5 ** 0.5, 1.0]))
    assert torch.equal(smooth.factors({"l": layer}, {"l": act}, 1.0)["l"][:3], act[:3])


def test_bad_smoothing_settings_are_refused_naming_what_is_accepted():
    with pytest.raises(ValueError, match=r"migration strength in \[0, 1\]"):
        QuantConfig(smooth=1.5)
    with pytest.raises(ValueError, match="needs --smooth ALPHA"):
        QuantConfig(smooth_layers=("*.ff.*",))
    with pytest.raises(ValueError, match="does not combine with --rounding adaround"):
        QuantConfig(smooth=0.5, rounding="adaround")
    q = quantize_model(TwoLinear(), QuantConfig(exclude=()))
    with pytest.raises(ValueError, match=r"--smooth-layers pattern 'attn\*' matches no quantized linear or convolution layer"):
        smooth.smoothed_layers(q, ("attn*",))
    assert list(smooth.smoothed_layers(q, ("fc2",))) == ["fc2"]


def test_a_balanced_dit_exports_a_checked_graph_with_its_mul_before_the_qdq(tiny_dit_pipeline_dir, tmp_path, capsys):
    """`trt-dm export --smooth 0.5 --smooth-layers '*.ff.*'` on a DiT with two timestep groups in one graph: the
    factors are cached beside the statistics of the balanced inputs (another entry than unbalanced), the graph
    passes the Q/DQ checks and the layer comparison, and each balanced layer reads Mul(x, 1/s) through its Q/DQ."""
    import onnx
    from safetensors.torch import load_file

    from trt_dm.cli.main import main
    from trt_dm.export.onnx import check_qdq
    cache, out = tmp_path / "cc", tmp_path / "e"
    argv = ["export", "--model", str(tiny_dit_pipeline_dir), "--classes", "all", "--recipe", "max@groups=2",
            "--timesteps", "uniform", "--calib-n", "8", "--calib-steps", "4", "--batch", "4", "--cache-dir",
            str(cache), "--out-dir", str(out), "--no-progress", "--precision", "fp32"]
    assert main([*argv, "--smooth", "0.5", "--smooth-layers", "*.ff.*"]) == 0
    text = capsys.readouterr().out
    assert "channel balancing (alpha 0.5): 4 layers" in text
    (factors_file,) = cache.glob("*/*/smooth.safetensors")
    factors = load_file(str(factors_file))
    assert sorted(factors) == ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                               "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2"]
    (graph,) = out.glob("*.onegraph*.onnx")
    assert "-sq0.5" in graph.name  # its own file name: an unbalanced export does not overwrite it
    assert check_qdq(graph).violations == []
    # each balanced layer: x * (1/s) by the input quantizer, then the one graph's per-row scale, then its Q
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    for layer in factors:
        scope = "/unet" + "".join(f".{part}" if part.isdigit() else f"/{part}" for part in layer.split("."))
        ops = [n.op_type for n in nodes if n.name.startswith(scope + "/")]
        assert ops.count("Mul") == 2 and "QuantizeLinear" in ops, (layer, ops)
    unbalanced = [n for n in nodes if n.name.startswith("/unet/transformer_blocks.0/attn1/to_q/")]
    assert [n.op_type for n in unbalanced].count("Mul") == 1
    # unbalanced: another statistics entry and graph, no factors; its ranges are those of unbalanced inputs (what a
    # cache without the balanced entry collects), never taken from the balanced statistics
    assert main(argv) == 0
    assert len(list(cache.glob("*/*/stats.json"))) == 2 and len(list(cache.glob("*/*/smooth.safetensors"))) == 1
    assert len(list(out.glob("*.onegraph*.onnx"))) == 2
    fresh = tmp_path / "fresh"
    assert main([*argv[:argv.index("--cache-dir") + 1], str(fresh), *argv[argv.index("--cache-dir") + 2:]]) == 0
    (plain,) = [p for p in cache.glob("*/*/max@groups=2.json") if not (p.parent / "smooth.safetensors").exists()]
    (again,) = fresh.glob("*/*/max@groups=2.json")
    assert json.loads(plain.read_text())["ranges"] == json.loads(again.read_text())["ranges"]


def test_a_convolution_is_balanced_per_input_channel_exactly():
    """Conv2d: s per input channel (axis 1 of the input, of the weight); the balanced model is the FP one with its
    quantizers off, its int8 error on an outlier channel lower."""
    class Conv(nn.Sequential):
        def forward(self, x, t=None):
            return self[0](x)

    torch.manual_seed(0)
    conv = Conv(nn.Conv2d(8, 6, 3, padding=1))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 6, 6, generator=g)
    x[:, 5] *= 40.0
    plain = quantize_model(copy.deepcopy(conv), QuantConfig(exclude=()))
    balanced = quantize_model(copy.deepcopy(conv), QuantConfig(exclude=()))
    layers = smooth.smoothed_layers(balanced)
    assert list(layers) == ["0"]
    scales = smooth.factors(layers, smooth.channel_absmax(balanced, layers, [(x, None, {})]), 0.5)
    assert scales["0"].shape == (8,) and int(scales["0"].argmax()) == 5
    smooth.apply(balanced, scales)
    assert balanced[0].input_quantizer.pre_quant_scale.shape == (1, 8, 1, 1)
    for m in (plain, balanced):
        activation_quantizers(m)["0"].amax = torch.tensor(float((x * (
            m[0].input_quantizer.pre_quant_scale if m is balanced else 1)).abs().max()))
    with torch.no_grad():
        ref = conv(x)
        err = {id(m): float((m(x) - ref).square().mean()) for m in (plain, balanced)}
        for q in all_quantizers(balanced).values():
            q.disable()
        assert torch.allclose(balanced(x), ref, rtol=1e-5, atol=1e-4)
    assert err[id(balanced)] < 0.5 * err[id(plain)]


def test_a_balanced_unet_exports_checked_with_its_convolutions_balanced(tiny_pipeline_dir, tmp_path, capsys):
    """A UNet with --smooth: its convolutions and linear layers balanced, the graph checked layer by layer against
    the fake-quant model (int8 codes equal up to an occasional flip at a rounding boundary)."""
    from safetensors.torch import load_file

    from trt_dm.cli.main import main
    from trt_dm.export.onnx import check_qdq
    assert main(["export", "--model", str(tiny_pipeline_dir), "--recipe", "max@groups=2", "--timesteps", "uniform",
                 "--calib-n", "8", "--calib-steps", "4", "--batch", "4", "--cache-dir", str(tmp_path / "cc"),
                 "--out-dir", str(tmp_path / "e"), "--no-progress", "--precision", "fp32", "--smooth", "0.5"]) == 0
    text = capsys.readouterr().out
    (factors,) = (tmp_path / "cc").glob("*/*/smooth.safetensors")
    names = load_file(str(factors))
    assert any("conv" in n for n in names) and f"channel balancing (alpha 0.5): {len(names)} layers" in text
    flipped, max_diff = re.search(r"layer by layer: ([0-9.e+-]+) flipped \(max diff (\d+)", text).groups()
    assert float(flipped) < 1e-4 and int(max_diff) <= 1  # rounding-boundary flips only, as between any two frameworks
    (graph,) = (tmp_path / "e").glob("*-sq0.5.onegraph*.onnx")
    assert check_qdq(graph).violations == []


def test_balancing_with_layers_in_fp_at_the_noisy_steps(tiny_pipeline_dir, tmp_path):
    """--smooth with --keep-fp-from-t: the noisy segment's FP layers stay unbalanced (and exact), the other segment
    balances them; both segments are built from one calibration."""
    from trt_dm import api
    from trt_dm.quant.calib.timesteps import parse
    from trt_dm.quant.calib.trajectories import CalibSpec
    from trt_dm.quant.calibrate import calibrate
    from trt_dm.quant.fakequant import segment_unets
    loaded = api.load(str(tiny_pipeline_dir))
    qcfg = QuantConfig(smooth=0.5, noisy_fp=("down_blocks.0.*",), fp_from_t=50)  # the tiny schedule: T = 100
    res = calibrate(loaded, CalibSpec(parse("uniform"), n=4, steps=4), qcfg, "max", cache_root=tmp_path,
                    batch_size=4, progress=False)
    noisy, rest = segment_unets(loaded, qcfg, res.ranges, weights=res.weights_path)
    name = "down_blocks.0.resnets.0.conv1"
    assert noisy.unet.get_submodule(name).input_quantizer.pre_quant_scale is None
    assert rest.unet.get_submodule(name).input_quantizer.pre_quant_scale is not None
    assert torch.equal(noisy.unet.get_submodule(name).weight, loaded.unet.get_submodule(name).weight)
