"""Precision by timestep (``--keep-fp PATTERN --keep-fp-from-t T``): some layers in FP at the noisy steps only.
The fake-quant model, the exported graphs (one per timestep segment) and the runners that switch them by t."""
import contextlib
import json
import copy

import pytest
import torch

from trt_dm.calib.timesteps import TimestepSpec
from trt_dm.calib.trajectories import CalibSpec
from trt_dm.calibrate import calibrate, fake_quant_denoiser, fake_quant_unet, grouped_denoiser, segment_unets
from trt_dm.models import load_model
from trt_dm.quant import DEFAULT_EXCLUDE, QuantConfig, quantize_model, quantized_layers, range_names

SPEC = CalibSpec(TimestepSpec("all"), n=8, steps=5, seed=0)
KEEP = ("down_blocks.0.*",)
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
    from trt_dm.core.artifacts import RangeGroup, RangeSet
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


def test_engine_per_segment_runs_in_onnx_runtime_and_tensorrt_rtx(tiny_pipeline_dir, tmp_path, capsys):
    """`trt-dm engine --keep-fp 'down_blocks.0.*' --keep-fp-from-t T`: one checked graph + engine per timestep
    segment (the default one-graph form inside each), their reports / sidecars carry the segment's t_range; ONNX
    Runtime over the two graphs, switched by t, equals the fake-quant denoiser within the int8 flips' reach; the
    noisy segment's engine runs the kept convolutions in half, the other's every quantized one on int8 inputs. Here
    the noisy segment holds one range group (a plain graph) and the other two (one graph with both).
    Refused before any work: --target ort-cpu, --keep-fp-from-t without --keep-fp, with --rounding adaround."""
    from trt_dm import api
    from trt_dm.cli import main
    from trt_dm.engine import load_sidecar
    cache, out, split = tmp_path / "cc", tmp_path / "eng", 70  # groups (90..50), (40..0): 70 cuts the first
    common = ["--model", str(tiny_pipeline_dir), "--timesteps", "all", "--calib-n", "8", "--calib-steps", "10",
              "--batch", "8", "--cache-dir", str(cache), "--no-progress"]
    keep = ["--keep-fp", "down_blocks.0.*", "--keep-fp-from-t", str(split)]
    for bad, msg in ((["export", "--target", "ort-cpu", "--recipe", "ptq4dm", *keep], "one per timestep segment"),
                     (["export", "--keep-fp-from-t", "50"], "give --keep-fp PATTERN"),
                     (["export", "--rounding", "adaround", *keep], "learned rounding"),
                     (["calibrate", "--sensitivity", "blocks", *keep], "is for evaluation and deployment")):
        assert main([*bad, *common, "--out-dir", str(tmp_path / "bad")] if bad[0] == "export"
                    else [*bad, *common]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["engine", *common, *keep, "--recipe", "max@groups=2", "--out-dir", str(out), "--no-baseline",
                 "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1", "--opt-batch", "4",
                 "--max-batch", "4"]) == 0
    printed = capsys.readouterr().out
    plans = sorted(out.glob("*.plan"))
    assert [p.name.split(".", 1)[1] for p in plans] == [f"t{split - 1}-0.onegraph.plan", f"t99-{split}.plan"]
    assert "--engine" in printed and all(str(p) in printed for p in plans)  # the usage line names both
    noisy_plan, data_plan = plans[1], plans[0]
    assert [load_sidecar(p).t_range for p in (noisy_plan, data_plan)] == [[99, split], [split - 1, 0]]
    noisy_rep = json.loads(noisy_plan.with_suffix(".onnx.json").read_text())
    assert noisy_rep["violations"] == [] and noisy_rep["extra"]["precision_by_t"]["fp_layers"] == list(KEEP)
    assert noisy_rep["quant"]["fp_from_t"] == split and "one_graph" not in noisy_rep["extra"]

    loaded = api.load(str(tiny_pipeline_dir))
    quant = api.QuantSettings(recipe="max@groups=2", spec=CalibSpec(TimestepSpec("all"), n=8, steps=10, seed=0),
                              cache_root=cache, batch=8, qcfg=QuantConfig(noisy_fp=KEEP, fp_from_t=split))
    calib = api.calibrate(loaded, quant, progress=False)
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([99, 75, split, split - 1, 45, 0])  # both segments, all groups, a gap (45), in one batch
    graphs = [p.with_name(p.name.replace(".plan", ".fp32.onnx")) for p in plans]
    with api.open_denoiser(loaded, onnx=graphs) as ort_den, \
            api.open_denoiser(loaded, ranges=calib.ranges, qcfg=quant.qcfg) as fq:
        assert ort_den.describe["t_ranges"] == [(split - 1, 0), (99, split)]
        got, ref = ort_den(x, t), fq(x, t)
    print("ORT segments vs fake-quant, max |diff|:", (got - ref).abs().max().item())
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0)
    # the layer report: the noisy engine has the kept block's convolutions in half, the other none besides the defaults
    data_convs = load_sidecar(data_plan).layer_precisions["correlation"]
    noisy_convs = load_sidecar(noisy_plan).layer_precisions["correlation"]
    segs = segment_unets(loaded, quant.qcfg, calib.ranges)
    n_convs = [sum(isinstance(m, torch.nn.Conv2d) for m in quantized_layers(s.unet).values()) for s in segs]
    assert noisy_convs == {"Int8": n_convs[0], "Half": 2 + n_convs[1] - n_convs[0]} and n_convs[0] < n_convs[1]
    assert data_convs == {"Int8": n_convs[1], "Half": 2}
    # `trt-dm eval --onnx A B`: the pair scored against FP like any deployment, both graphs named in the result
    assert main(["eval", "--model", str(tiny_pipeline_dir), "--onnx", *map(str, graphs), "--steps", "4", "--n", "4",
                 "--eps-n", "2", "--ref-limit", "16", "--no-progress", "--out-dir", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert result["onnx"] == " ".join(map(str, graphs)) and result["psnr_vs_fp"] > 0
