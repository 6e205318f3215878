"""Timestep-dependent activation ranges in ONE graph (trt_dm.onegraph): a groups=K recipe whose layers scale their
input per row by the timestep group's ratio. Exact to the K-range fake-quant model up to int8 rounding flips, in
torch and in ONNX Runtime (Q/DQ executed as written); the graph passes TensorRT's Q/DQ checks and TensorRT-RTX
still runs its convolutions on int8 inputs."""

import pytest
import torch

from trt_dm import api
from trt_dm.quant.calib.timesteps import parse
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.fakequant import fake_quant_unet, grouped_denoiser
from trt_dm.quant.modules import quantized_layers
from trt_dm.quant.onegraph import one_graph


def _codes(qunet, x, t):
    """Each quantized layer's int8 input codes on one forward."""
    codes, hooks = {}, []
    for name, mod in quantized_layers(qunet).items():
        def hook(_m, _a, out, name=name.removesuffix(".layer"), q=mod.input_quantizer):
            codes[name] = torch.round(out.float() / (q.amax.float() / 127))
        hooks.append(mod.input_quantizer.register_forward_hook(hook))
    with torch.no_grad():
        out = qunet(x, t).sample
    for h in hooks:
        h.remove()
    return codes, out


def test_one_graph_equals_the_k_range_model(grouped):
    """Layer by layer on the same inputs (each layer of the one-graph model fed what the K-range model's layer got):
    the int8 codes agree except where float rounding of x * r lands on the other side of a rounding boundary
    (at most 1 code, rarely); end to end, per group and in a batch mixing every group, within 0.05 (one such flip
    early moves the output by about that much; the attention blocks spread it)."""
    from trt_dm.quant.modules import apply_ranges
    loaded, quant, ranges = grouped
    ref = fake_quant_unet(loaded, quant.qcfg, ranges)
    og = one_graph(fake_quant_unet(loaded, quant.qcfg, ranges), ranges)
    assert og.one_graph_t_ranges == ranges.t_ranges and len(ranges.groups) == 4
    layers = quantized_layers(ref)
    flips = total = 0
    for k, (hi, lo) in enumerate(ranges.t_ranges):  # a batch per group, against that group's range set
        apply_ranges(ref, ranges.amax(k))
        x, t = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(k)), torch.tensor([hi, lo] * 3)
        inputs, hooks = {}, []
        for name, mod in layers.items():
            hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0])))
        ref_codes, out_ref = _codes(ref, x, t)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            out_og = og(x, t).sample
        for name, x_in in inputs.items():
            wrapped = og.get_submodule(name)
            wrapped._groups.index = torch.full((x_in.shape[0],), k)
            got = {}
            h = wrapped.layer.input_quantizer.register_forward_hook(lambda m, a, out: got.__setitem__("q", out))
            with torch.no_grad():
                wrapped(x_in)
            h.remove()
            q = wrapped.layer.input_quantizer
            d = (torch.round(got["q"].float() / (q.amax.float() / 127)) - ref_codes[name]).abs()
            assert d.max() <= 1, name
            flips, total = flips + int((d > 0).sum()), total + d.numel()
        torch.testing.assert_close(out_og, out_ref, atol=0.05, rtol=0)
    print(f"one graph vs K-range, layer by layer: {flips} of {total} int8 codes differ")
    assert flips / total < 1e-4, f"{flips} of {total} codes differ"
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([99, 80, 60, 45, 30, 20, 5, 0])  # every group in one batch
    with torch.no_grad():
        torch.testing.assert_close(og(x, t).sample, grouped_denoiser(ref, ranges)(x, t), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="groups=K"):
        one_graph(fake_quant_unet(loaded, quant.qcfg, ranges), type(ranges).pooled(ranges.amax(0)))


def test_default_recipe_goes_into_one_graph_on_a_text_conditional_unet(tiny_sd_pipeline_dir, tmp_path):
    """The default recipe on a Stable Diffusion layout pipeline (cross-attention, guidance 7.5, timestep a scalar
    per call): one checked graph, the attention projections (Linear on (B, S, D) inputs) scaled per row like the
    convolutions, int8 codes equal to the torch one-graph model's layer by layer up to one flip."""
    loaded = api.load(str(tiny_sd_pipeline_dir))
    quant = api.QuantSettings(spec=CalibSpec(parse("uniform"), n=8, steps=4, guidance_scale=7.5),
                              cache_root=tmp_path / "cc", batch=4)
    made = api.deploy(loaded, quant, target="tensorrt", out_dir=tmp_path, precision="fp32", progress=lambda _: None,
                      show_progress=False)
    (graph,) = made.graphs
    assert graph.onnx.name == "tiny_sd-ptq4dm-g4.onegraph.fp32.onnx" and made.calibration.ranges.is_grouped
    report = graph.report
    assert report.violations == [] and report.extra["one_graph"]["groups"] == 4
    assert report.layer_comparison_fp32["max_code_diff"] <= 1
