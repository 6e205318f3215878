"""Learned weight rounding by block reconstruction (trt_dm.calib.reconstruct): the rounding variables start at
round-to-nearest, the learned rounding lowers the W4 model's error against FP, lies on the quantizers' grid
(so it exports as ordinary Q/DQ with 4-bit codes), is cached and bit-identical on a rerun."""
import json

import pytest
import torch
from safetensors.torch import load_file

from trt_dm.core.ranges import RangeSet
from trt_dm.models.loading import load_model
from trt_dm.quant.calib.reconstruct import TEMB_UNIT, _AdaRound, _LearnedRange, blocks_in_order, separate_temb
from trt_dm.quant.calib.timesteps import TimestepSpec
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.calibrate import calibrate, fp_calibration_set
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.fakequant import fake_quant_unet
from trt_dm.quant.modules import quantized_layers

SPEC = CalibSpec(TimestepSpec("ndtc", mu=0.4, sigma=0.4), n=16, steps=8, seed=0)


def test_rounding_variables_start_at_round_to_nearest_and_the_regulariser_ends_at_zero():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g)
    step = w.abs().amax(dim=(1, 2, 3)) / 7
    ada = _AdaRound(w, step, -8, 7)
    ada.hard = True
    nearest = (w / step.view(-1, 1, 1, 1)).round().clamp(-8, 7) * step.view(-1, 1, 1, 1)
    assert torch.allclose(ada(None), nearest, atol=1e-6)
    ada.hard = False
    soft = ada(None)
    assert torch.allclose(soft, w, atol=1e-3)  # h(v0) = frac(w / s): the soft weight starts at w itself
    with torch.no_grad():
        ada.v.copy_(torch.where(ada.v >= 0, 10.0, -10.0))
    assert ada.regulariser(2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_blocks_are_resnets_and_attentions_in_forward_order(tiny_pipeline_dir, tmp_path):
    loaded = load_model(tiny_pipeline_dir)
    ranges = calibrate(loaded, SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=8, progress=False).ranges
    q = fake_quant_unet(loaded, QuantConfig(), ranges)
    x = torch.randn(2, *loaded.sample_shape)
    units = blocks_in_order(q, lambda: q(x, torch.tensor([10, 900])))
    names = [n for n, _, _ in units]
    assert names[0] == "down_blocks.0.resnets.0" and "mid_block.attentions.0" in names
    assert names.index("mid_block.resnets.0") < names.index("mid_block.attentions.0") < names.index("mid_block.resnets.1")
    assert sorted(sum((ls for _, _, ls in units), [])) == sorted(quantized_layers(q))  # every layer once
    resnet = dict((n, ls) for n, _, ls in units)["down_blocks.0.resnets.0"]
    assert any(layer.endswith("time_emb_proj") for layer in resnet)  # the time-embedding projection is in its block


def test_adaround_lowers_w4_error_is_on_grid_cached_and_reproducible(tiny_pipeline_dir, tmp_path):
    loaded = load_model(tiny_pipeline_dir)
    nearest_cfg = QuantConfig(weight_bits=4)
    ada_cfg = QuantConfig(weight_bits=4, rounding="adaround", recon_iters=60)
    near = calibrate(loaded, SPEC, nearest_cfg, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    a = calibrate(loaded, SPEC, ada_cfg, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    assert near.weights_path is None and a.weights_path.exists() and a.weights_path.parent == a.stats_dir
    assert a.ranges == near.ranges  # the activation ranges are the recipe's; only the weights change
    mtime = a.weights_path.stat().st_mtime_ns
    b = calibrate(loaded, SPEC, ada_cfg, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    assert b.weights_path == a.weights_path and a.weights_path.stat().st_mtime_ns == mtime  # reused
    c = calibrate(loaded, SPEC, ada_cfg, "ptq4dm", cache_root=tmp_path / "fresh", batch_size=8, progress=False)
    wa, wc = load_file(str(a.weights_path)), load_file(str(c.weights_path))
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)  # bit-identical rerun
    q_near = fake_quant_unet(loaded, nearest_cfg, near.ranges)
    q_ada = fake_quant_unet(loaded, ada_cfg, a.ranges, weights=a.weights_path)
    with torch.no_grad():
        for name, m in quantized_layers(q_ada).items():  # on the 4-bit grid: the weight quantizer reproduces it
            w = m._parameters["weight"]
            assert torch.allclose(m.weight_quantizer(w), w, atol=1e-6), name
    held_out = CalibSpec(SPEC.timesteps, n=16, steps=8, seed=1)
    calib, _ = fp_calibration_set(loaded, held_out, batch_size=16, progress=False)
    with torch.no_grad():
        x, t, cond = next(calib.batches(16))
        ref = loaded.unet(x, t).sample
        err_near = (q_near(x, t).sample - ref).pow(2).mean().item()
        err_ada = (q_ada(x, t).sample - ref).pow(2).mean().item()
    assert err_ada < err_near, (err_ada, err_near)
    with pytest.raises(ValueError, match="needs the reconstructed weights"):
        fake_quant_unet(loaded, ada_cfg, a.ranges)
    act_cfg = QuantConfig(weight_bits=4, rounding="adaround", recon_iters=5, recon_act_iters=5)
    with pytest.raises(ValueError, match="needs one range set"):  # one learned range per layer: not K range sets
        calibrate(loaded, SPEC, act_cfg, "max@groups=2", cache_root=tmp_path, batch_size=8, progress=False)
    assert not list(tmp_path.glob("*/*/max@groups=2.adaround-*"))  # nothing written


def test_adaround_with_timestep_groups_learns_under_each_rows_ranges(tiny_pipeline_dir, tmp_path):
    """A groups=K recipe with learned rounding: every calibration row runs with its timestep group's ranges (the
    capture batches are cut by group, each training step draws one group's rows); one set of weights, on the W4
    grid, bit-identical on a rerun, and the K-range model's error against FP (each row with its group's ranges,
    as deployed) below round-to-nearest's with the same ranges."""
    from trt_dm.core.ranges import group_index
    from trt_dm.quant.calib.reconstruct import _RowGroups
    from trt_dm.quant.calibrate import _split_batches_by_group
    from trt_dm.quant.fakequant import grouped_denoiser
    loaded = load_model(tiny_pipeline_dir)
    recipe = "mse:2.4@groups=2"
    near_cfg = QuantConfig(weight_bits=4)
    ada_cfg = QuantConfig(weight_bits=4, rounding="adaround", recon_iters=60)
    near = calibrate(loaded, SPEC, near_cfg, recipe, cache_root=tmp_path, batch_size=8, progress=False)
    a = calibrate(loaded, SPEC, ada_cfg, recipe, cache_root=tmp_path, batch_size=8, progress=False)
    assert a.ranges.is_grouped and a.ranges == near.ranges and a.weights_path.exists()
    c = calibrate(loaded, SPEC, ada_cfg, recipe, cache_root=tmp_path / "fresh", batch_size=8, progress=False)
    wa, wc = load_file(str(a.weights_path)), load_file(str(c.weights_path))
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)
    pooled = calibrate(loaded, SPEC, ada_cfg, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    wp = load_file(str(pooled.weights_path))
    assert any(not torch.equal(wa[k], wp[k]) for k in wa)  # the groups' ranges changed what was learned

    calib, guidance = fp_calibration_set(loaded, SPEC, batch_size=8, progress=False)
    batches = list(calib.unet_batches(8, guidance))
    cut, groups = _split_batches_by_group(batches, a.ranges.t_ranges)
    assert sum(b[0].shape[0] for b in cut) == sum(b[0].shape[0] for b in batches) and len(set(groups)) == 2
    for (x, t, _c), k in zip(cut, groups):
        assert (group_index(t, a.ranges.t_ranges) == k).all()
    used = []
    rg = _RowGroups([b[0].shape[0] for b in cut], groups, used.append, 0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # a training batch holds one group's rows
        assert len(torch.unique(rg.row[rg.draw(g, 8)])) == 1
    split = list(rg.split(torch.arange(len(rg.row))))
    assert [k for k, _ in split] == sorted(set(groups)) and used == [k for k, _ in split]
    with pytest.raises(ValueError, match="needs one range set"):
        _RowGroups([4], [0], used.append, 3)

    held_out = CalibSpec(SPEC.timesteps, n=16, steps=8, seed=1)
    hcal, _ = fp_calibration_set(loaded, held_out, batch_size=16, progress=False)
    x, t, _cond = next(hcal.batches(16))
    assert len(torch.unique(group_index(t, a.ranges.t_ranges))) == 2
    with torch.no_grad():
        ref = loaded.unet(x, t).sample
    errs = []
    for cfg, res in ((near_cfg, near), (ada_cfg, a)):
        q = fake_quant_unet(loaded, cfg, res.ranges, weights=res.weights_path)
        errs.append((grouped_denoiser(q, res.ranges)(x, t) - ref).pow(2).mean().item())
    assert errs[1] < errs[0], errs


def test_separate_time_embedding_unit_comes_first_and_lowers_the_error(tiny_pipeline_dir, tmp_path):
    """--recon-temb separate (TFMQ-DM's time block): every resnet's time_emb_proj leaves its resnet for one unit
    reconstructed first on the projections' own outputs; the weights are another cache entry, on the W4 grid,
    and the model's error against FP on held-out data is below round-to-nearest's."""
    loaded = load_model(tiny_pipeline_dir)
    ranges = calibrate(loaded, SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=8, progress=False).ranges
    q = fake_quant_unet(loaded, QuantConfig(), ranges)
    x = torch.randn(2, *loaded.sample_shape)
    units = blocks_in_order(q, lambda: q(x, torch.tensor([10, 900])))
    sep = separate_temb(units, dict(q.named_modules()))
    temb = [ly for ly in quantized_layers(q) if ly.endswith(".time_emb_proj")]
    assert sep[0][0] == TEMB_UNIT and sorted(sep[0][2]) == sorted(temb) and len(temb) >= 2
    temb = sep[0][2]  # in forward order
    assert not any(ly.endswith("time_emb_proj") for _, _, ls in sep[1:] for ly in ls)
    assert sorted(sum((ls for _, _, ls in sep), [])) == sorted(quantized_layers(q))  # every layer once
    with torch.no_grad():  # the unit computes each projection of its inputs, side by side
        ins = [torch.randn(3, q.get_submodule(ly).in_features) for ly in temb]
        out = sep[0][1](*ins)
        assert torch.equal(out, torch.cat([q.get_submodule(ly)(i) for ly, i in zip(temb, ins)], 1))

    near_cfg = QuantConfig(weight_bits=4)
    block_cfg = QuantConfig(weight_bits=4, rounding="adaround", recon_iters=30)
    sep_cfg = QuantConfig(weight_bits=4, rounding="adaround", recon_iters=30, recon_temb="separate")
    near = calibrate(loaded, SPEC, near_cfg, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    b = calibrate(loaded, SPEC, block_cfg, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    s = calibrate(loaded, SPEC, sep_cfg, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    assert s.weights_path != b.weights_path and s.ranges == near.ranges
    q_near = fake_quant_unet(loaded, near_cfg, near.ranges)
    q_sep = fake_quant_unet(loaded, sep_cfg, s.ranges, weights=s.weights_path)
    with torch.no_grad():
        for name, m in quantized_layers(q_sep).items():
            w = m._parameters["weight"]
            assert torch.allclose(m.weight_quantizer(w), w, atol=1e-6), name
    calib, _ = fp_calibration_set(loaded, CalibSpec(SPEC.timesteps, n=16, steps=8, seed=1), batch_size=16,
                                  progress=False)
    with torch.no_grad():
        x, t, _ = next(calib.batches(16))
        ref = loaded.unet(x, t).sample
        assert (q_sep(x, t).sample - ref).pow(2).mean() < (q_near(x, t).sample - ref).pow(2).mean()


def test_bad_rounding_settings_are_refused():
    with pytest.raises(ValueError, match="rounding must be one of nearest, adaround"):
        QuantConfig(rounding="stochastic")
    with pytest.raises(ValueError, match=r"recon_iters \(--recon-iters\) must be >= 1"):
        QuantConfig(rounding="adaround", recon_iters=0)
    with pytest.raises(ValueError, match="recon_temb must be one of block, separate"):
        QuantConfig(rounding="adaround", recon_temb="first")
    with pytest.raises(ValueError, match="it needs rounding 'adaround'"):
        QuantConfig(recon_temb="separate")


def test_cli_calibrate_with_learned_rounding_and_bad_iters(tiny_pipeline_dir, tmp_path, capsys):
    from trt_dm.cli.main import main
    base = ["calibrate", "--model", str(tiny_pipeline_dir), "--cache-dir", str(tmp_path), "--calib-n", "8",
            "--calib-steps", "4", "--timesteps", "all", "--batch", "8", "--no-progress", "--weight-bits", "4",
            "--rounding", "adaround"]
    assert main(base + ["--recon-iters", "5"]) == 0
    out, err = capsys.readouterr()
    # no recipe named: the default ptq4dm-g4, its 4 range sets applied by timestep while the rounding is learned
    assert "weights with learned rounding (adaround) ->" in out and "ptq4dm-g4.adaround-" in out
    assert "the default ptq4dm-g4" not in err
    assert main(base + ["--recon-iters", "5", "--recon-act-iters", "5"]) == 0
    out, err = capsys.readouterr()  # learned input ranges take one range set; the CLI says so
    assert "recipe ptq4dm (the default ptq4dm-g4" in err and "--recon-act-iters takes one" in err
    assert "ptq4dm.adaround-" in out
    assert main(base + ["--recon-iters", "0"]) == 2
    assert "recon_iters (--recon-iters) must be >= 1" in capsys.readouterr().err


def test_learned_range_starts_at_the_quantizers_output_and_learns_through_the_step(tiny_pipeline_dir, tmp_path):
    """The LSQ parametrisation of an input quantizer reproduces modelopt's fake quant at u = 0 and passes a
    gradient to u (through the step and the clipped values)."""
    loaded = load_model(tiny_pipeline_dir)
    ranges = calibrate(loaded, SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=8, progress=False).ranges
    q = next(iter(quantized_layers(fake_quant_unet(loaded, QuantConfig(), ranges)).values())).input_quantizer
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * float(q.amax)
    lr = _LearnedRange(q)
    with torch.no_grad():
        assert torch.allclose(lr(x), q(x), atol=1e-6 * float(q.amax))
    lr(x).pow(2).sum().backward()
    assert lr.u.grad is not None and lr.u.grad.abs().item() > 0


def test_learned_input_ranges_after_rounding_become_the_calibration_ranges(tiny_pipeline_dir, tmp_path):
    """--recon-act-iters: with each block's rounding fixed, its layers' input ranges are learned; they replace the
    recipe's ranges in the calibration result (a ranges file beside the weights, read back into the model), a
    rerun gives the same ranges bit for bit, and the model's error stays that of learned rounding alone or lower
    (on the tiny random-weight model W4's error is in the weights: refinement is neutral there, within 3 %)."""
    loaded = load_model(tiny_pipeline_dir)
    ada = QuantConfig(weight_bits=4, rounding="adaround", recon_iters=20)
    act = QuantConfig(weight_bits=4, rounding="adaround", recon_iters=20, recon_act_iters=20)
    a = calibrate(loaded, SPEC, ada, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    r = calibrate(loaded, SPEC, act, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    assert r.weights_path != a.weights_path and r.ranges_path == r.weights_path.with_suffix(".json")
    layers = quantized_layers(fake_quant_unet(loaded, act, r.ranges, weights=r.weights_path))
    changed = [n for n in r.ranges.names if r.ranges.amax(0)[n] != a.ranges.amax(0)[n]]
    assert set(changed) <= set(layers) and len(changed) >= len(layers) // 2, changed
    assert all(float(m.input_quantizer.amax) == r.ranges.amax(0)[n] for n, m in layers.items())
    assert RangeSet.from_dict(json.loads(r.ranges_path.read_text())["ranges"]) == r.ranges
    again = calibrate(loaded, SPEC, act, "ptq4dm", cache_root=tmp_path / "fresh", batch_size=8, progress=False)
    assert again.ranges == r.ranges
    calib, _ = fp_calibration_set(loaded, SPEC, batch_size=16, progress=False)
    q_ada = fake_quant_unet(loaded, ada, a.ranges, weights=a.weights_path)
    q_act = fake_quant_unet(loaded, act, r.ranges, weights=r.weights_path)
    with torch.no_grad():
        x, t, _ = next(calib.batches(16))
        ref = loaded.unet(x, t).sample
        err_ada = (q_ada(x, t).sample - ref).pow(2).mean().item()
        err_act = (q_act(x, t).sample - ref).pow(2).mean().item()
    assert err_act < 1.03 * err_ada, (err_act, err_ada)
    with pytest.raises(ValueError, match="needs rounding 'adaround'"):
        QuantConfig(recon_act_iters=10)
