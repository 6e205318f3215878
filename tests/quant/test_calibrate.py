"""Calibration end to end on a tiny pipeline: cache reuse and invalidation, bit-identical reruns,
damaged cache, fake-quant model built from the ranges."""
import json

import pytest
import torch

from trt_dm.models.loading import load_model
from trt_dm.quant.calib.stats import CalibCacheError
from trt_dm.quant.calib.timesteps import TimestepSpec
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.calibrate import calibrate
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.fakequant import fake_quant_unet, grouped_denoiser
from trt_dm.quant.modules import check_calibrated

SPEC = CalibSpec(TimestepSpec("ndtc", mu=0.4, sigma=0.4), n=8, steps=5, seed=0)


def test_calibrate_caches_and_reuses(tiny_pipeline_dir, tmp_path):
    loaded = load_model(tiny_pipeline_dir)
    a = calibrate(loaded, SPEC, QuantConfig(), "ptq4dm", cache_root=tmp_path, batch_size=4, progress=False)
    assert not a.stats_reused and a.ranges_path.exists() and a.unet_calls > 0
    assert a.stats_dir.parent.name == loaded.data_key()[:16]
    saved = json.loads(a.ranges_path.read_text())
    assert saved["provenance"]["recipe"] == "ptq4dm"
    b = calibrate(loaded, SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=4, progress=False)
    assert b.stats_reused and b.stats_dir == a.stats_dir
    # max >= mse-clipped ranges, layer by layer
    ra, rb = a.ranges.amax(), b.ranges.amax()
    assert all(rb[n] >= ra[n] * (1 - 1e-9) for n in ra)
    # bit-identical rerun from scratch
    c = calibrate(loaded, SPEC, QuantConfig(), "ptq4dm", cache_root=tmp_path / "other", batch_size=4, progress=False)
    assert c.ranges == a.ranges
    assert (c.stats_dir / "stats.safetensors").read_bytes() == (a.stats_dir / "stats.safetensors").read_bytes()
    # another calibration set or layer set -> another entry
    d = calibrate(loaded, CalibSpec(TimestepSpec("uniform"), n=8, steps=5), QuantConfig(), "ptq4dm",
                  cache_root=tmp_path, batch_size=4, progress=False)
    e = calibrate(loaded, SPEC, QuantConfig(exclude=()), "ptq4dm", cache_root=tmp_path, batch_size=4, progress=False)
    assert len({a.stats_dir, d.stats_dir, e.stats_dir}) == 3 and not d.stats_reused and not e.stats_reused
    # a W4 caller of the same statistics gets the same activation ranges, and the file it rewrites records only
    # what decides them (it read "weight_bits 4" after a W4A8 run, although the ranges are every caller's)
    w4 = calibrate(loaded, SPEC, QuantConfig(weight_bits=4, weight_calib="mse"), "ptq4dm", cache_root=tmp_path,
                   batch_size=4, progress=False)
    assert w4.stats_reused and w4.ranges == a.ranges and w4.ranges_path == a.ranges_path
    assert json.loads(w4.ranges_path.read_text()) == saved
    assert "weight_bits" not in saved["provenance"]["quant"] and saved["provenance"]["quant"]["act_bits"] == 8


def test_damaged_cache_is_refused(tiny_pipeline_dir, tmp_path):
    loaded = load_model(tiny_pipeline_dir)
    a = calibrate(loaded, SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=8, progress=False)
    f = a.stats_dir / "stats.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CalibCacheError, match="stats"):
        calibrate(loaded, SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=8, progress=False)


def test_fake_quant_and_grouped_ranges(tiny_pipeline_dir, tmp_path):
    loaded = load_model(tiny_pipeline_dir)
    res = calibrate(loaded, SPEC, QuantConfig(), "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    q = fake_quant_unet(loaded, QuantConfig(), res.ranges)
    check_calibrated(q)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([60, 60])
    with torch.no_grad():
        fp, fq = loaded.unet(x, t).sample, q(x, t).sample
    assert 0 < (fp - fq).abs().max() < 0.5
    spec = CalibSpec(TimestepSpec("all"), n=10, steps=5, seed=0)
    g = calibrate(loaded, spec, QuantConfig(), "mse:2.4@groups=2", cache_root=tmp_path, batch_size=5, progress=False)
    groups = g.ranges.groups
    assert len(groups) == 2 and groups[0].t_min > groups[1].t_max
    qg = fake_quant_unet(loaded, QuantConfig(), g.ranges)
    den = grouped_denoiser(qg, g.ranges)
    name = g.ranges.names[0]
    quantizer = dict(qg.named_modules())[name].input_quantizer
    lo, hi = groups[1].t_min, groups[0].t_max
    out_lo = den(x, torch.full((2,), lo))
    assert quantizer.amax.item() == pytest.approx(g.ranges.amax(1)[name])
    out_hi = den(x, torch.full((2,), hi))
    assert quantizer.amax.item() == pytest.approx(g.ranges.amax(0)[name])
    # a batch whose rows sit in different groups: each row gets its own group's ranges
    mixed = den(x, torch.tensor([hi, lo]))
    assert torch.equal(mixed[:1], den(x[:1], torch.tensor([hi]))) and torch.equal(mixed[1:], den(x[1:], torch.tensor([lo])))
    assert not torch.equal(out_lo[1], out_hi[1])  # the two groups' ranges really differ


def test_pipeline_and_its_unet_dir_do_not_share_a_cache(tiny_pipeline_dir, tmp_path):
    """The same UNet under another noise schedule (the pipeline's scheduler/ vs the DDPM default of its bare
    unet/ folder) draws other trajectories: its statistics must be collected, not reused."""
    pipe = calibrate(load_model(tiny_pipeline_dir), SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=8,
                     progress=False)
    bare = calibrate(load_model(tiny_pipeline_dir / "unet"), SPEC, QuantConfig(), "max", cache_root=tmp_path,
                     batch_size=8, progress=False)
    assert not pipe.stats_reused and not bare.stats_reused and pipe.stats_dir != bare.stats_dir
    assert pipe.ranges.amax() != bare.ranges.amax()
    again = calibrate(load_model(tiny_pipeline_dir), SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=8,
                      progress=False)
    assert again.stats_reused and again.ranges == pipe.ranges


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_folded_weights_give_bit_identical_outputs(tiny_pipeline_dir, tmp_path, weight_bits):
    # evaluation folds the fake-quantized weights once; it must not change a single output bit
    loaded = load_model(tiny_pipeline_dir)
    qcfg = QuantConfig(weight_bits=weight_bits)
    res = calibrate(loaded, SPEC, qcfg, "ptq4dm", cache_root=tmp_path, batch_size=8, progress=False)
    q = fake_quant_unet(loaded, qcfg, res.ranges)
    f = fake_quant_unet(loaded, qcfg, res.ranges, fold_weights=True)
    assert not any(m.weight_quantizer.is_enabled for m in f.modules() if hasattr(m, "weight_quantizer"))
    assert any(m.weight_quantizer.is_enabled for m in q.modules() if hasattr(m, "weight_quantizer"))
    x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 40, 90])
    with torch.no_grad():
        assert torch.equal(q(x, t).sample, f(x, t).sample)
    check_calibrated(f)


def test_layer_sensitivity_report(tiny_pipeline_dir, tmp_path):
    from trt_dm.quant.sensitivity import layer_sensitivity
    loaded = load_model(tiny_pipeline_dir)
    rows = layer_sensitivity(loaded, SPEC, "max", cache_root=tmp_path, n=8, batch_size=8, progress=False)
    names = [n for n, m in loaded.unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(r["layer"] for r in rows) == sorted(names)  # every layer, none excluded
    errs = [r["rel_mse"] for r in rows]
    assert errs == sorted(errs, reverse=True) and all(e > 0 for e in errs)
    # W4 weights hurt more than W8, layer by layer on the most sensitive layer
    rows4 = layer_sensitivity(loaded, SPEC, "max", cache_root=tmp_path, weight_bits=4, n=8, batch_size=8,
                              progress=False)
    top = rows[0]["layer"]
    assert next(r["rel_mse"] for r in rows4 if r["layer"] == top) > rows[0]["rel_mse"]


def test_shortcut_split_end_to_end(tiny_pipeline_dir, tmp_path):
    loaded = load_model(tiny_pipeline_dir)
    qcfg = QuantConfig(weight_bits=4, shortcut_split=True)
    res = calibrate(loaded, SPEC, qcfg, "max", cache_root=tmp_path, batch_size=8, progress=False)
    r = res.ranges.amax()
    halves = [n for n in r if n.endswith("#h")]
    assert halves and all(n[:-2] + "#skip" in r for n in halves)
    plain = calibrate(loaded, SPEC, QuantConfig(weight_bits=4), "max", cache_root=tmp_path, batch_size=8,
                      progress=False)
    for n in halves:  # the max over the whole input is the larger of the two halves' maxima
        assert plain.ranges.amax()[n[:-2]] == pytest.approx(max(r[n], r[n[:-2] + "#skip"]))
    q = fake_quant_unet(loaded, qcfg, res.ranges)
    check_calibrated(q)


def test_attention_matmul_quantization(tiny_pipeline_dir, tmp_path):
    loaded = load_model(tiny_pipeline_dir)
    qcfg = QuantConfig(quantize_attention=True)
    res = calibrate(loaded, SPEC, qcfg, "max", cache_root=tmp_path, batch_size=8, progress=False)
    bmm = sorted(n for n in res.ranges.names if n.endswith("_bmm"))
    attn = [n for n, m in loaded.unet.named_modules() if type(m).__name__ == "Attention"]
    assert bmm == sorted(f"{a}.{x}_bmm" for a in attn for x in "qkv")
    base = calibrate(loaded, SPEC, QuantConfig(), "max", cache_root=tmp_path, batch_size=8, progress=False)
    assert set(res.ranges.names) - set(base.ranges.names) == set(bmm)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([60, 60])
    with torch.no_grad():
        a = fake_quant_unet(loaded, qcfg, res.ranges)(x, t).sample
        b = fake_quant_unet(loaded, QuantConfig(), base.ranges)(x, t).sample
    assert not torch.equal(a, b)  # the matmul inputs are really quantized


def test_conditional_calibration_sees_both_halves_of_every_guided_call(tiny_cls_pipeline_dir, tmp_path):
    """A class-conditional model calibrates on every class in turn, with the guidance it will sample with: the
    statistics see both halves of each 2B call, and guidance and labels key the cache."""
    import dataclasses

    from trt_dm import api
    from trt_dm.quant.calib.stats import CalibStats
    loaded = api.load(str(tiny_cls_pipeline_dir))
    q1 = api.QuantSettings(recipe="max", spec=SPEC, cache_root=tmp_path, batch=4)
    assert q1.resolved(loaded).spec.labels == "all"
    plain = api.calibrate(loaded, q1, progress=False)
    q3 = dataclasses.replace(q1, spec=dataclasses.replace(SPEC, guidance_scale=3.0))
    guided = api.calibrate(loaded, q3, progress=False)
    assert not guided.stats_reused and guided.stats_dir != plain.stats_dir
    s1, s3 = CalibStats.load(plain.stats_dir), CalibStats.load(guided.stats_dir)
    assert sum(s1.counts.values()) == SPEC.n and sum(s3.counts.values()) == 2 * SPEC.n
    assert guided.ranges.amax() != plain.ranges.amax()
    only3 = api.calibrate(loaded, dataclasses.replace(q3, spec=dataclasses.replace(SPEC, guidance_scale=3.0, labels="3")),
                          progress=False)
    assert only3.stats_dir not in (plain.stats_dir, guided.stats_dir)
    assert api.calibrate(loaded, q3, progress=False).stats_reused
    with pytest.raises(ValueError, match="out of range"):
        api.calibrate(loaded, dataclasses.replace(q1, spec=dataclasses.replace(SPEC, labels="11")), progress=False)
    # a guidance interval: null rows only for the samples inside it, as the sampler calls the UNet; keyed
    from trt_dm.quant.calibrate import fp_calibration_set
    spec = dataclasses.replace(SPEC, guidance_scale=3.0, guidance_interval=(0, 50))
    part = api.calibrate(loaded, dataclasses.replace(q1, spec=spec), progress=False)
    calib, _ = fp_calibration_set(loaded, dataclasses.replace(spec, labels="all"), batch_size=4, progress=False)
    inside = int((calib.t <= 50).sum())
    assert 0 < inside < SPEC.n and sum(CalibStats.load(part.stats_dir).counts.values()) == SPEC.n + inside
    assert part.stats_dir not in (plain.stats_dir, guided.stats_dir)


def test_block_sensitivity_matches_excluding_the_block(tiny_cls_pipeline_dir, tmp_path):
    """The per-block report under guidance with 2 timestep range sets: each block's error equals that of a model
    calibrated and quantized with the block excluded (so disabling a block's quantizers, the per-group ranges and
    the guided prediction are what a real exclusion gives), and the blocks partition the quantized layers."""
    import dataclasses

    from trt_dm.core.guidance import cfg_denoiser
    from trt_dm.quant.calibrate import fp_calibration_set
    from trt_dm.quant.config import DEFAULT_EXCLUDE
    from trt_dm.quant.modules import quantized_layers
    from trt_dm.quant.sensitivity import block_of, block_sensitivity
    loaded = load_model(tiny_cls_pipeline_dir)
    spec = dataclasses.replace(SPEC, labels="all", guidance_scale=3.0)
    recipe = "max@groups=2"
    rep = block_sensitivity(loaded, spec, QuantConfig(), recipe, cache_root=tmp_path, n=8, batch_size=8,
                            cumulative=3, progress=False)
    layers = quantized_layers(fake_quant_unet(loaded, QuantConfig(), calibrate(
        loaded, spec, QuantConfig(), recipe, cache_root=tmp_path, batch_size=8, progress=False).ranges))
    assert sorted(r["block"] for r in rep["blocks"]) == sorted({block_of(n) for n in layers})
    assert sum(r["layers"] for r in rep["blocks"]) == len(layers)
    assert sum(r["macs_share"] for r in rep["blocks"]) == pytest.approx(rep["quantized_macs_share"])
    assert 0.9 < rep["quantized_macs_share"] < 1 and rep["guidance_scale"] == 3 and rep["rel_mse"] > 0
    removed = [r["removed"] for r in rep["blocks"]]
    assert removed == sorted(removed, reverse=True)
    assert [len(r["blocks"]) for r in rep["together"]] == [2, 3]
    assert rep["together"][-1]["blocks"] == [r["block"] for r in rep["blocks"][:3]]

    calib, guidance = fp_calibration_set(loaded, dataclasses.replace(spec, n=8, seed=spec.seed + 1), progress=False)

    def rel_mse(exclude):
        qcfg = QuantConfig(exclude=DEFAULT_EXCLUDE + exclude)
        res = calibrate(loaded, spec, qcfg, recipe, cache_root=tmp_path, batch_size=8, progress=False)
        den = cfg_denoiser(grouped_denoiser(fake_quant_unet(loaded, qcfg, res.ranges), res.ranges), guidance)
        fp = cfg_denoiser(lambda x, t, **c: loaded.unet(x, t, **c).sample, guidance)
        with torch.no_grad():
            out, ref = den(calib.x, calib.t, **calib.cond), fp(calib.x, calib.t, **calib.cond)
        return float((out - ref).double().square().mean() / ref.double().square().mean())

    assert rel_mse(()) == pytest.approx(rep["rel_mse"], rel=1e-5)
    for row in (rep["blocks"][0], rep["blocks"][-1]):
        assert rel_mse((row["block"] + ".*",)) == pytest.approx(row["rel_mse"], rel=1e-5)
    top2 = rep["together"][0]
    assert rel_mse(tuple(b + ".*" for b in top2["blocks"])) == pytest.approx(top2["rel_mse"], rel=1e-5)

    # weights or activations: the activations-only error does not depend on the weights' bits, the weights-only
    # error does (4-bit steps are 16x coarser); the per-kind shares are given for the first `cumulative` blocks
    assert [("removed_by_weights" in r, "removed_by_activations" in r) for r in rep["blocks"]][:4] == \
        [(True, True)] * 3 + [(False, False)]
    rep4 = block_sensitivity(loaded, spec, QuantConfig(weight_bits=4), recipe, cache_root=tmp_path, n=8, batch_size=8,
                             cumulative=2, progress=False)
    assert rep4["activations_only"]["rel_mse"] == rep["activations_only"]["rel_mse"] > 0
    assert rep4["weights_only"]["rel_mse"] > 10 * rep["weights_only"]["rel_mse"] > 0


def test_block_sensitivity_with_learned_rounding_restores_fp_weights(tiny_pipeline_dir, tmp_path):
    """Learned rounding stores its weights on the grid, so a layer kept in FP must get its FP weights back: with
    only the activations quantized, the report of a reconstructed W4 model equals that of a nearest-rounded one
    (same activation ranges, FP weights in both), while with its weights quantized it differs."""
    from trt_dm.quant.sensitivity import block_sensitivity
    loaded = load_model(tiny_pipeline_dir)
    kw = dict(cache_root=tmp_path, n=8, batch_size=8, cumulative=2, progress=False)
    nearest = block_sensitivity(loaded, SPEC, QuantConfig(weight_bits=4), "max", **kw)
    learned = block_sensitivity(loaded, SPEC, QuantConfig(weight_bits=4, rounding="adaround", recon_iters=20), "max",
                                **kw)
    assert learned["activations_only"]["rel_mse"] == pytest.approx(nearest["activations_only"]["rel_mse"], rel=1e-6)
    assert learned["weights_only"]["rel_mse"] != pytest.approx(nearest["weights_only"]["rel_mse"], rel=1e-3)


def test_fp8_ranges_from_the_same_statistics_and_an_e4m3_fake_quant_model(tiny_pipeline_dir, tmp_path):
    """--format fp8: the int8 run's statistics are reused, the FP8 ranges go to their own file (mse searched on
    the E4M3 grid; max equal to int8's), and the fake-quant layers compute E4M3 weights and inputs."""
    from trt_dm.quant.calib.fp8 import quantize_e4m3
    from trt_dm.quant.modules import quantized_layers
    loaded = load_model(tiny_pipeline_dir)
    kw = dict(cache_root=tmp_path, batch_size=4, progress=False)
    i8 = calibrate(loaded, SPEC, QuantConfig(), "ptq4dm", **kw)
    f8 = calibrate(loaded, SPEC, QuantConfig(format="fp8"), "ptq4dm", **kw)
    assert f8.stats_reused and f8.stats_dir == i8.stats_dir and f8.ranges_path.name == "ptq4dm.fp8.json"
    assert json.loads(f8.ranges_path.read_text())["provenance"]["format"] == "fp8"
    a8, af = i8.ranges.amax(), f8.ranges.amax()
    assert a8.keys() == af.keys() and any(af[n] != a8[n] for n in a8)
    assert calibrate(loaded, SPEC, QuantConfig(format="fp8"), "max", **kw).ranges == \
        calibrate(loaded, SPEC, QuantConfig(), "max", **kw).ranges
    qunet = fake_quant_unet(loaded, QuantConfig(format="fp8"), f8.ranges)
    name, layer = next(iter(quantized_layers(qunet).items()))
    x = torch.randn(2, layer.in_channels, 4, 4) * af[name]
    wq, xq = layer.weight_quantizer, layer.input_quantizer
    # the same E4M3 codes; modelopt multiplies by 448 / amax where the reference divides by amax / 448 (1 ulp)
    torch.testing.assert_close(wq(layer.weight), quantize_e4m3(layer.weight, wq.amax), atol=0, rtol=3e-7)
    torch.testing.assert_close(xq(x), quantize_e4m3(x, af[name]), atol=0, rtol=3e-7)
    with pytest.raises(ValueError, match="--format fp8 quantizes weights to E4M3"):
        QuantConfig(format="fp8", weight_bits=4)
    with pytest.raises(ValueError, match="--format must be one of int8, fp8"):
        QuantConfig(format="fp4")
