import pytest
import torch

from trt_dm.models.builders import tiny_unet2d
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.modules import (
    UncalibratedQuantizerError,
    activation_quantizers,
    apply_ranges,
    check_calibrated,
    observing,
    quantize_model,
    quantized_layers,
)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, 16, 16, generator=g), torch.tensor([10, 700])


def test_insertion_exclusion_and_fp_observation():
    ref_net = tiny_unet2d(seed=0).eval()
    x, t = _inputs()
    with torch.no_grad():
        ref = ref_net(x, t).sample
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig())
    layers = quantized_layers(q)
    convs_linears = [n for n, m in tiny_unet2d(seed=0).named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    expected = [n for n in convs_linears if not (n.startswith("time_embedding.") or n in ("conv_in", "conv_out"))]
    assert sorted(layers) == sorted(expected)
    # weights: exact per-output-channel abs-max
    w = dict(q.named_modules())[expected[0]]
    torch.testing.assert_close(w.weight_quantizer.amax.flatten(), w.weight.detach().abs().flatten(1).amax(1))
    seen = {}
    with observing(q, lambda name, x: seen.setdefault(name, x.abs().max().item())), torch.no_grad():
        out = q(x, t).sample
    assert torch.equal(out, ref)  # observation runs the model in full precision
    assert set(seen) == set(layers)
    # after the block quantizers are enabled again, and uncalibrated -> caught
    with pytest.raises(UncalibratedQuantizerError, match=r"no usable range.*\(no amax\)"):
        check_calibrated(q)
    apply_ranges(q, {n: v for n, v in seen.items()})
    assert check_calibrated(q) == 2 * len(layers)
    with torch.no_grad():
        outq = q(x, t).sample
    assert 0 < (outq - ref).abs().max() < 0.5  # quantized: close, not equal


def test_planted_uncalibrated_quantizer_is_caught():
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig())
    names = list(quantized_layers(q))
    apply_ranges(q, {n: 1.0 for n in names})
    victim = dict(q.named_modules())[names[3]]
    victim.input_quantizer.reset_amax()
    with pytest.raises(UncalibratedQuantizerError, match=names[3]):
        check_calibrated(q)
    victim.input_quantizer.amax = torch.tensor(float("nan"))
    with pytest.raises(UncalibratedQuantizerError, match="non-finite"):
        check_calibrated(q)


def test_apply_ranges_rejects_mismatch_and_bad_values():
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig(exclude=()))
    names = list(quantized_layers(q))
    assert "conv_in" in names and "time_embedding.linear_1" in names
    with pytest.raises(ValueError, match=r"missing \['conv_in'\]"):
        apply_ranges(q, {n: 1.0 for n in names if n != "conv_in"})
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        apply_ranges(q, {**{n: 1.0 for n in names}, "nope": 1.0})
    with pytest.raises(ValueError, match="finite and > 0, got 0.0"):
        apply_ranges(q, {n: 0.0 for n in names})
    with pytest.raises(ValueError, match="weight_bits must be one of 8, 7, 4, got 6"):
        QuantConfig(weight_bits=6)


def test_shortcut_split_finds_concat_boundaries_and_applies_two_ranges():
    from trt_dm.quant.modules import concat_splits, range_names
    unet = tiny_unet2d(seed=0)
    splits = concat_splits(unet)
    # independent check: record the real concatenations' channel counts in a forward pass
    seen = {}
    mods = dict(unet.named_modules())
    for b, block in enumerate(unet.up_blocks):
        def pre(mod, args, b=b):
            h = args[0]
            for i, r in enumerate(mod.resnets):
                seen[f"up_blocks.{b}.resnets.{i}.conv1"] = h.shape[1]
                h = torch.zeros(1, r.out_channels)  # resnet i+1 reads resnet i's output channels
            return None
        block.register_forward_pre_hook(pre)
    x, t = _inputs()
    with torch.no_grad():
        unet(x, t)
    assert {n: k for n, k in splits.items() if n.endswith("conv1")} == seen
    assert all(0 < k < mods[n].in_channels for n, k in splits.items())
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig(shortcut_split=True))
    names = range_names(q, QuantConfig(shortcut_split=True))
    split_name = next(iter(splits))
    assert split_name + "#h" in names and split_name + "#skip" in names and split_name not in names
    apply_ranges(q, {n: (2.0 if n.endswith("#skip") else 1.0) for n in names})
    amax = dict(q.named_modules())[split_name].input_quantizer.amax.flatten()
    k = splits[split_name]
    assert (amax[:k] == 1.0).all() and (amax[k:] == 2.0).all()
    check_calibrated(q)


def test_weight_mse_search_matches_brute_force_and_beats_abs_max():
    """W4 weights, weight_calib="mse" (modelopt's data-free search): per output channel the clip reaches the
    least squared weight error over the search grid (exhaustive check), never above the abs-max; in total
    the error is below the abs-max ranges'. Rerunning gives the same ranges bit for bit."""
    with pytest.raises(ValueError, match=r"weight_calib must be one of max, mse, got 'l1'"):
        QuantConfig(weight_calib="l1")
    q_max = quantize_model(tiny_unet2d(seed=0), QuantConfig(weight_bits=4))
    q_mse = quantize_model(tiny_unet2d(seed=0), QuantConfig(weight_bits=4, weight_calib="mse"))
    again = quantize_model(tiny_unet2d(seed=0), QuantConfig(weight_bits=4, weight_calib="mse"))
    grid = torch.arange(30, 101, dtype=torch.float64) / 100  # WEIGHT_MSE_SEARCH: 0.30 ... 1.00
    mods, mods_max, mods_again = (dict(q.named_modules()) for q in (q_mse, q_max, again))
    total_max = total_mse = 0.0
    with torch.no_grad():
        for name in quantized_layers(q_mse):
            m = mods[name]
            w, wq, wq_max = m.weight, m.weight_quantizer, mods_max[name].weight_quantizer
            absmax = w.abs().flatten(1).amax(1)
            assert torch.equal(wq.amax, mods_again[name].weight_quantizer.amax)
            amax = wq.amax.flatten()
            assert (amax <= absmax * (1 + 1e-6)).all() and (amax >= 0.3 * absmax * (1 - 1e-6)).all()

            def err(quantizer):
                return ((quantizer(w) - w) ** 2).flatten(1).sum(1)
            got, e_max = err(wq), err(wq_max)
            saved = wq.amax.clone()
            best = torch.full_like(got, float("inf"))
            for mult in grid:
                wq.amax = (absmax * float(mult)).reshape(saved.shape)
                best = torch.minimum(best, err(wq))
            wq.amax = saved
            assert (got <= best * (1 + 1e-5) + 1e-12).all(), name
            assert (got <= e_max * (1 + 1e-5) + 1e-12).all(), name
            total_max, total_mse = total_max + e_max.sum().item(), total_mse + got.sum().item()
    assert total_mse < 0.9 * total_max


def test_sharing_copy_holds_the_weights_once_and_leaves_the_fp_model_alone(tiny_pipeline_dir, tmp_path):
    """The calibration's and the export's fake-quant models share the FP UNet's weight tensors (a 2.6 B UNet would
    otherwise hold its 10.3 GB of weights twice); quantizing the copy, exporting it (W8A8), and a W4A8 export (whose
    weights go onto the int8 grid in place, so it gets a full copy) leave the FP model's weights bit for bit."""
    from trt_dm import api
    from trt_dm.quant.calib.trajectories import CalibSpec
    from trt_dm.quant.modules import sharing_copy
    u = tiny_unet2d(seed=0)
    q = quantize_model(sharing_copy(u), QuantConfig())
    shared = {p.data_ptr() for p in u.parameters()}
    assert {p.data_ptr() for n, p in q.named_parameters()} <= shared and len(shared) == len(list(u.parameters()))
    assert activation_quantizers(q) and not activation_quantizers(u)  # the quantizers are the copy's own
    loaded = api.load(str(tiny_pipeline_dir))
    before = loaded.fingerprint()
    for bits in (8, 4):
        quant = api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=4, steps=4), cache_root=tmp_path / "cc", batch=4,
                                  qcfg=QuantConfig(weight_bits=bits))
        api.deploy(loaded, quant, target="tensorrt", out_dir=tmp_path / f"w{bits}", precision="fp32",
                   baseline=False, progress=lambda s: None, show_progress=False)
        assert loaded.fingerprint() == before, f"W{bits}A8 export changed the FP weights"
