"""Precision by timestep (``--keep-fp PATTERN --keep-fp-from-t T``): some layers in FP at the noisy steps only.
The fake-quant model, the exported graphs (one per timestep segment) and the runners that switch them by t."""
import contextlib
import copy

import pytest
import torch
from support import KEEP  # noqa: E402

from trt_dm.models.loading import load_model
from trt_dm.quant.calib.timesteps import TimestepSpec
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.calibrate import calibrate
from trt_dm.quant.config import DEFAULT_EXCLUDE, QuantConfig
from trt_dm.quant.fakequant import fake_quant_denoiser, fake_quant_unet, grouped_denoiser, segment_unets
from trt_dm.quant.modules import quantize_model, quantized_layers, range_names

SPEC = CalibSpec(TimestepSpec("all"), n=8, steps=5, seed=0)
SPLIT = 50  # the tiny schedule has T = 100


def test_config_segments_and_refusals():
    q = QuantConfig(noisy_fp=KEEP, fp_from_t=SPLIT)
    (noisy_t, noisy), (data_t, data) = q.segments(100)
    assert noisy_t == (99, SPLIT) and data_t == (SPLIT - 1, 0)
    assert noisy.exclude == DEFAULT_EXCLUDE + KEEP and data.exclude == DEFAULT_EXCLUDE
    assert noisy.fp_from_t is None and data.fp_from_t is None
    assert QuantConfig().segments(100) == [(None, QuantConfig())]
    assert q.to_dict()["noisy_fp"] == list(KEEP) and q.to_dict()["fp_from_t"] == SPLIT
    assert q.activation_dict() == QuantConfig().activation_dict()  # same statistics and ranges as the plain config
    for kw, msg in ((dict(noisy_fp=KEEP), "give both or neither"), (dict(fp_from_t=10), "give both or neither"),
                    (dict(noisy_fp=KEEP, fp_from_t=0), ">= 1"),
                    (dict(noisy_fp=("conv_in",), fp_from_t=10), "excluded at every step already"),
                    (dict(noisy_fp=KEEP, fp_from_t=10, rounding="adaround"), "learned rounding")):
        with pytest.raises(ValueError, match=msg):
            QuantConfig(**kw)
    with pytest.raises(ValueError, match="beyond the schedule's timesteps 0..99"):
        q.segments(100) and QuantConfig(noisy_fp=KEEP, fp_from_t=100).segments(100)
    with pytest.raises(ValueError, match="use segment_unets"):
        fake_quant_unet(None, q, None)


@pytest.mark.parametrize("recipe", ["ptq4dm", "mse:2.4@groups=2"])
def test_fake_quant_switches_precision_by_timestep(tiny_pipeline_dir, tmp_path, recipe):
    """Rows at t >= T run the model with the kept layers unquantized, rows below it the fully quantized one, each
    with the recipe's ranges for its timestep; a batch with rows on both sides equals the rows run alone."""
    loaded = load_model(tiny_pipeline_dir)
    q = QuantConfig(noisy_fp=KEEP, fp_from_t=SPLIT)
    res = calibrate(loaded, SPEC, q, recipe, cache_root=tmp_path, batch_size=8, progress=False)
    plain = calibrate(loaded, SPEC, QuantConfig(), recipe, cache_root=tmp_path, batch_size=8, progress=False)
    # the plain config's statistics and ranges
    assert plain.stats_reused and plain.stats_dir == res.stats_dir and res.ranges == plain.ranges

    noisy, data = segment_unets(loaded, q, res.ranges)
    assert not any(n.startswith("down_blocks.0.") for n in quantized_layers(noisy.unet))
    assert set(quantized_layers(data.unet)) == set(res.ranges.names)
    assert set(noisy.ranges.names) == {n for n in res.ranges.names if not n.startswith("down_blocks.0.")}

    def reference(exclude, t):  # the fake-quant model of one exclusion list, alone, with its layers' ranges
        qcfg = QuantConfig(exclude=exclude)
        ranges = res.ranges.subset(range_names(quantize_model(copy.deepcopy(loaded.unet), qcfg), qcfg))
        ref = fake_quant_unet(loaded, qcfg, ranges)
        with torch.no_grad():
            return grouped_denoiser(ref, ranges)(x, t) if ranges.is_grouped else ref(x, t).sample

    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with contextlib.ExitStack() as stack:
        den, describe = fake_quant_denoiser(loaded, q, res.ranges, stack=stack)
        assert describe["t_ranges"] == [(99, SPLIT), (SPLIT - 1, 0)] and describe["runner"] == "fakequant-cpu-float32"
        hi, lo = torch.tensor([90, SPLIT, 70]), torch.tensor([10, SPLIT - 1, 0])
        out_hi, out_lo = den(x, hi), den(x, lo)
        assert torch.equal(out_hi, reference(DEFAULT_EXCLUDE + KEEP, hi))
        assert torch.equal(out_lo, reference(DEFAULT_EXCLUDE, lo))
        t = torch.tensor([90, 10, SPLIT])
        mixed = den(x, t)
        rows = [0, 2]  # t >= SPLIT: one call of these two rows, the other row alone
        assert torch.equal(mixed[rows], den(x[rows], t[rows])) and torch.equal(mixed[1:2], den(x[1:2], t[1:2]))
        assert not torch.equal(out_hi, reference(DEFAULT_EXCLUDE, hi))  # the noisy rows run another model


def test_clip_keeps_each_segments_groups_and_tiles_its_ends():
    from trt_dm.core.ranges import RangeGroup, RangeSet
    rs = RangeSet(tuple(RangeGroup({"a": float(k + 1)}, t_max=hi, t_min=lo)
                        for k, (hi, lo) in enumerate([(990, 750), (740, 500), (490, 250), (240, 0)])))
    assert rs.clip(999, 500).t_ranges == [(999, 750), (740, 500)]
    assert rs.clip(499, 0).t_ranges == [(499, 250), (240, 0)]
    assert [g.amax["a"] for g in rs.clip(499, 0).groups] == [3.0, 4.0]
    assert rs.clip(999, 600).t_ranges == [(999, 750), (740, 600)] and rs.clip(599, 0).t_ranges[0] == (599, 500)
    assert rs.clip(745, 745).amax() == {"a": 1.0} and not rs.clip(745, 745).is_grouped  # a gap: the nearest group
    assert rs.clip(999, 800).amax() == {"a": 1.0}  # one group left: pooled
    pooled = RangeSet.pooled({"a": 1.0})
    assert pooled.clip(999, 500) is pooled
    with pytest.raises(ValueError, match="no ranges for"):
        pooled.subset(["a", "b"])


