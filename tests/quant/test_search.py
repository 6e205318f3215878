"""The per-layer format search (trt_dm.quant.search) and the format mix it returns (QuantConfig.fp8_layers)."""
import dataclasses
import json

import numpy as np
import pytest

from trt_dm.models.loading import load_model
from trt_dm.quant.calib.fp8 import is_fp8
from trt_dm.quant.calib.stats import CalibStats
from trt_dm.quant.calib.timesteps import TimestepSpec
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.calibrate import calibrate, fp_calibration_set
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.fakequant import fake_quant_unet
from trt_dm.quant.modules import quantized_layers
from trt_dm.quant.search import BudgetError, FormatSearch, search_formats
from trt_dm.quant.sensitivity import LeaveOut

SPEC = CalibSpec(TimestepSpec("ndtc", mu=0.4, sigma=0.4), n=8, steps=5, seed=0)
RECIPE = "max@groups=2"


def test_a_mix_quantizes_each_layer_in_its_format_with_its_formats_ranges(tiny_pipeline_dir, tmp_path):
    """fp8_layers: those layers' quantizers are E4M3 and their ranges the FP8 run's, the others int8 with int8's
    ranges, all from the one set of statistics; the mix has its own ranges file and graph name."""
    from trt_dm.export.job import graph_stem
    loaded = load_model(tiny_pipeline_dir)
    kw = dict(cache_root=tmp_path, batch_size=4, progress=False)
    mix = QuantConfig(fp8_layers=("down_blocks.0.*",))
    assert mix.uses_fp8 and mix.precision == "int8+fp8" and mix.format_of("down_blocks.0.resnets.0.conv1") == "fp8"
    i8, f8, m = (calibrate(loaded, SPEC, q, "ptq4dm", **kw) for q in (QuantConfig(), QuantConfig(format="fp8"), mix))
    assert m.stats_reused and m.stats_dir == i8.stats_dir and m.ranges_path.name.startswith("ptq4dm.mix-")
    a8, af, am = i8.ranges.amax(), f8.ranges.amax(), m.ranges.amax()
    fp8_names = [n for n in am if n.startswith("down_blocks.0.")]
    assert fp8_names and any(af[n] != a8[n] for n in fp8_names)
    assert am == {n: (af if n in fp8_names else a8)[n] for n in am}
    layers = quantized_layers(fake_quant_unet(loaded, mix, m.ranges))
    for name, layer in layers.items():
        assert is_fp8(layer.input_quantizer) == is_fp8(layer.weight_quantizer) == (name in fp8_names)
    assert graph_stem("m", "ptq4dm", mix) != graph_stem("m", "ptq4dm", QuantConfig())
    with pytest.raises(ValueError, match="fp8_layers names the FP8 layers of an int8 model"):
        QuantConfig(format="fp8", fp8_layers=("conv_in",))


def test_search_meets_the_budget_and_the_deployed_mix_measures_what_the_search_did(tiny_pipeline_dir, tmp_path):
    """The search keeps the mix within the budget on its held-out batch, a looser budget keeps at least as many
    MACs in 8-bit formats, the result is cached and reproduced exactly, and the final config (its FP16 layers
    excluded: statistics collected for it alone) gives the same error on the same held-out batch."""
    loaded = load_model(tiny_pipeline_dir)
    kw = dict(cache_root=tmp_path, batch_size=4, progress=False)
    loose = search_formats(loaded, SPEC, QuantConfig(), RECIPE, FormatSearch(budget=2e-3, n=8), **kw)
    all_int8 = loose.all_8bit["int8"]["rel_mse"]
    tight = FormatSearch(budget=all_int8 / 10, n=8)
    mix = search_formats(loaded, SPEC, QuantConfig(), RECIPE, tight, **kw)
    assert mix.rel_mse <= tight.budget < all_int8
    assert 0 < 1 - mix.macs_share()["fp16"] <= 1 - loose.macs_share()["fp16"]
    assert sum(mix.macs_share().values()) == pytest.approx(1)
    fp16 = {r["layer"] for r in mix.layers if r["format"] == "fp16"}
    assert fp16 and set(mix.qcfg.exclude) == set(QuantConfig().exclude) | fp16
    assert set(mix.qcfg.fp8_layers) == {r["layer"] for r in mix.layers if r["format"] == "fp8"}
    assert all(r["best"] == min(("int8", "fp8"), key=lambda f: (r[f], f)) for r in mix.layers)
    doc = json.loads(mix.path.read_text())
    assert doc["rel_mse"] == mix.rel_mse and doc["quant"] == mix.qcfg.to_dict()
    again = search_formats(loaded, SPEC, QuantConfig(), RECIPE, tight, **kw)
    assert again.qcfg == mix.qcfg and again.rel_mse == mix.rel_mse and again.path == mix.path
    # the deployed mix: its layers' statistics taken from the search's collection (FP activations: the same), the
    # same held-out batch, the same error
    res = calibrate(loaded, SPEC, mix.qcfg, RECIPE, **kw)
    assert res.stats_reused and res.stats_dir != loose.path.parent
    full = CalibStats.load(loose.path.parent)
    sub = CalibStats.load(res.stats_dir)
    assert sub.meta["subset_of"] == loose.path.parent.name and set(sub.names) < set(full.names)
    assert all(np.array_equal(h.counts, full.hists[k].counts) and h.range == full.hists[k].range
               for k, h in sub.hists.items())
    calib, guidance = fp_calibration_set(loaded, dataclasses.replace(SPEC, seed=SPEC.seed + 1), batch_size=4,
                                         progress=False)
    leave = LeaveOut(loaded, fake_quant_unet(loaded, mix.qcfg, res.ranges), res.ranges, calib, guidance, mix.qcfg, 4)
    assert leave.errors([])["rel_mse"] == pytest.approx(mix.rel_mse, rel=1e-6)


def test_a_mix_under_the_budget_is_loosened_to_spend_it(tiny_pipeline_dir, tmp_path):
    """Errors do not add exactly: a first choice that measures under the budget leaves 8-bit MACs unused. The search
    then loosens its working budget and keeps the mix within the budget with the most 8-bit MACs (never fewer than
    the first choice's)."""
    loaded = load_model(tiny_pipeline_dir)
    kw = dict(cache_root=tmp_path, batch_size=4, progress=False)
    probe = search_formats(loaded, SPEC, QuantConfig(), RECIPE, FormatSearch(budget=1.0, n=8), **kw)
    all_int8, loosened = probe.all_8bit["int8"]["rel_mse"], 0
    for share in (1 / 2, 1 / 3, 1 / 5, 1 / 10):
        budget = all_int8 * share
        mix = search_formats(loaded, SPEC, QuantConfig(), RECIPE, FormatSearch(budget=budget, n=8), **kw)
        # in the steps' units: the share of the searched layers' MACs (macs_share also counts the excluded layers)
        first = mix.steps[0]
        eight_bit = sum(r["macs"] for r in mix.layers if r["format"] != "fp16") / sum(r["macs"] for r in mix.layers)
        assert mix.rel_mse <= budget
        if first["rel_mse"] <= budget and first["fp16_layers"]:
            assert mix.steps[1]["working_budget"] > first["working_budget"]
            assert eight_bit >= first["macs_8bit"] - 1e-12
            loosened += eight_bit > first["macs_8bit"]
    assert loosened  # on this model at least one budget buys more 8-bit MACs than its first choice


def test_a_sampled_budget_bounds_the_error_of_images_sampled_end_to_end(tiny_pipeline_dir, tmp_path):
    """--budget-on sampled: the mix's images, sampled from held-out seeds with the calibration's sampler and steps
    (its range groups switched by timestep), are within the budget of FP's; the number is what an independent
    draw of those images measures, and the all-8bit models' sampled errors are recorded."""
    import torch

    from trt_dm.core.schedule import Schedule
    from trt_dm.quant.fakequant import grouped_denoiser
    from trt_dm.runtime.torch_runner import unet_denoiser
    from trt_dm.sampling import sample_many
    loaded = load_model(tiny_pipeline_dir)
    kw = dict(cache_root=tmp_path, batch_size=4, progress=False)
    probe = search_formats(loaded, SPEC, QuantConfig(), RECIPE, FormatSearch(budget=1.0, n=8, measure="sampled",
                                                                             sampled_n=4), **kw)
    all_int8 = probe.all_8bit["int8"]["sampled_rel_mse"]
    assert all_int8 > 0 and probe.all_8bit["fp8"]["sampled_rel_mse"] > 0 and probe.measure == "sampled"
    tight = FormatSearch(budget=all_int8 / 4, n=8, measure="sampled", sampled_n=4)
    mix = search_formats(loaded, SPEC, QuantConfig(), RECIPE, tight, **kw)
    assert mix.rel_mse <= tight.budget and mix.macs_share()["fp16"] > probe.macs_share()["fp16"]
    assert json.loads(mix.path.read_text())["measure"] == "sampled"
    # the same images drawn independently: the deployed mix (its own calibration) on seeds (seed + 2) * 1000003 + j
    res = calibrate(loaded, SPEC, mix.qcfg, RECIPE, **kw)
    seeds = [(SPEC.seed + 2) * 1_000_003 + j for j in range(4)]
    sched = Schedule.from_config(loaded.scheduler_config)

    def draw(den):
        return sample_many(den, sched, seeds, loaded.sample_shape, progress=False, sampler=SPEC.sampler,
                           steps=SPEC.steps, eta=SPEC.eta)
    ref = draw(unet_denoiser(loaded.unet))
    got = draw(grouped_denoiser(fake_quant_unet(loaded, mix.qcfg, res.ranges), res.ranges))
    assert float((got - ref).double().square().mean() / ref.double().square().mean()) == pytest.approx(
        mix.rel_mse, rel=1e-5)
    assert torch.isfinite(got).all()


def test_a_budget_that_cannot_be_met_says_what_the_best_mix_reached(tiny_pipeline_dir, tmp_path):
    loaded = load_model(tiny_pipeline_dir)
    kw = dict(cache_root=tmp_path, batch_size=4, progress=False)
    with pytest.raises(BudgetError, match=r"cannot be met with --formats int8,fp8: relative MSE 1e-09; the best "
                       r"mix reached 0.00\d+ with 9\d.\d% of the MACs"):
        search_formats(loaded, SPEC, QuantConfig(), RECIPE, FormatSearch(budget=1e-9, formats=("int8", "fp8"), n=8),
                       **kw)
    with pytest.raises(BudgetError, match=r"1e-06 with at least 99.0% of the MACs in 8-bit formats; the best mix"):
        search_formats(loaded, SPEC, QuantConfig(), RECIPE, FormatSearch(budget=1e-6, min_8bit_macs=0.99, n=8), **kw)
    assert not list(tmp_path.rglob("*.formats-*.json"))  # no search result recorded


@pytest.mark.parametrize("kw, match", [
    (dict(formats=("int8", "fp4")), "unknown format 'fp4'"),
    (dict(formats=("fp16",)), "at least one 8-bit format"),
    (dict(budget=0.0), "--budget must be a relative MSE > 0"),
    (dict(min_8bit_macs=1.5), r"--min-8bit-macs must be a share in \[0, 1\]"),
    (dict(measure="trajectory"), r"--budget-on 'trajectory': accepted step, sampled"),
])
def test_bad_search_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        FormatSearch(**{"budget": 1e-3, **kw})


def test_the_search_starts_from_w8a8_with_nearest_rounding():
    s = FormatSearch.parse("auto", 1e-3)
    assert s.formats == ("int8", "fp8", "fp16") and FormatSearch.parse("int8, fp16", 1e-3).formats == ("int8", "fp16")
    for bad in (QuantConfig(format="fp8"), QuantConfig(weight_bits=4), QuantConfig(rounding="adaround")):
        with pytest.raises(ValueError, match="--formats searches W8A8 layers"):
            s.check_base(bad)
    with pytest.raises(ValueError, match="--formats needs --budget"):
        FormatSearch.parse("auto", None)
