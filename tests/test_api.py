"""The library API under the CLI: denoisers from artifacts (one graph, K timestep-group graphs), deployment
results as types, and refusals of ambiguous requests."""
import pytest
import torch

from trt_dm import api
from trt_dm.quant.calib.timesteps import TimestepSpec
from trt_dm.quant.calib.trajectories import CalibSpec

SPEC = CalibSpec(TimestepSpec("uniform"), n=8, steps=4, seed=0)


@pytest.fixture(scope="module")
def grouped_graphs(tiny_pipeline_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    loaded = api.load(str(tiny_pipeline_dir))
    quant = api.QuantSettings(recipe="max@groups=2", spec=SPEC, cache_root=tmp / "cc", batch=4)
    made = api.deploy(loaded, quant, target="tensorrt", out_dir=tmp, precision="fp32", progress=lambda _: None,
                      show_progress=False, options={"group_engines": True})
    return loaded, made


def test_default_recipe_is_ptq4dm_g4_unless_the_settings_take_one_range_set():
    """No recipe named: ptq4dm-g4 (deployed as one graph), and the paper's ptq4dm, with the reason, where a
    groups=K recipe cannot go: the ort-cpu layout, learned input ranges (one per layer), split shortcuts, quantized
    attention matmuls, fewer calibration steps than groups. A named recipe is never replaced."""
    from trt_dm.quant.config import QuantConfig
    assert api.default_recipe() == ("ptq4dm-g4", "")
    assert api.default_recipe(QuantConfig(weight_bits=4, rounding="adaround")) == ("ptq4dm-g4", "")
    assert api.default_recipe(QuantConfig(weight_bits=4), SPEC, "openvino") == ("ptq4dm-g4", "")
    for qcfg, spec, target, flag in ((None, None, "ort-cpu", "--target ort-cpu"),
                                     (QuantConfig(rounding="adaround", recon_act_iters=5), None, None, "--recon-act-iters"),
                                     (QuantConfig(shortcut_split=True), None, None, "--shortcut-split"),
                                     (QuantConfig(quantize_attention=True), None, "tensorrt", "--quantize-attention"),
                                     (None, CalibSpec(steps=3), None, "--calib-steps 3")):
        recipe, why = api.default_recipe(qcfg, spec, target)
        assert recipe == "ptq4dm" and flag in why and "ptq4dm-g4" in why, why
    assert api.QuantSettings(spec=SPEC).resolved().recipe == "ptq4dm-g4"
    assert api.QuantSettings(spec=CalibSpec(steps=3)).resolved(target="tensorrt").recipe == "ptq4dm"
    assert api.QuantSettings(recipe="max", spec=SPEC).resolved(target="ort-cpu").recipe == "max"


def test_deploy_result_is_typed(grouped_graphs):
    loaded, made = grouped_graphs
    assert [g.report.group for g in made.graphs] == [0, 1] and all(g.report.int8 for g in made.graphs)
    assert made.calibration.ranges.is_grouped and made.sidecars == [] and made.not_built is None
    assert made.graphs[0].report.signature == loaded.signature.to_dict()
    assert made.graphs[0].report.schedule_fingerprint == loaded.schedule_fingerprint()
    assert "trt-dm sample --engine" in made.usage


def test_group_graphs_are_switched_per_row(grouped_graphs):
    """K graphs of a groups=K recipe behind one denoiser: a batch whose rows belong to different groups is split
    by group, and each row gets exactly what its own group's graph gives it alone."""
    loaded, made = grouped_graphs
    (hi, _), (_, lo) = made.calibration.ranges.t_ranges
    paths = [g.onnx for g in made.graphs]
    feed = loaded.signature.example(2, seed=3)
    x, t = feed["sample"], torch.tensor([hi, lo])
    with api.open_denoiser(loaded, onnx=paths) as den:
        assert den.describe["t_ranges"] == made.calibration.ranges.t_ranges
        both = den(x, t)
    for k in range(2):
        with api.open_denoiser(loaded, onnx=paths[k]) as alone:
            assert torch.equal(both[k:k + 1], alone(x[k:k + 1], t[k:k + 1]))
    with api.open_denoiser(loaded, onnx=paths[0]) as g0:
        assert not torch.equal(both[1:], g0(x[1:], t[1:]))  # row 1 really went to group 1's graph


def test_open_denoiser_refuses_ambiguous_requests(grouped_graphs, tmp_path):
    loaded, made = grouped_graphs
    with pytest.raises(ValueError, match="give one of engines, onnx, openvino or ranges"):
        with api.open_denoiser(loaded, onnx=made.graphs[0].onnx, ranges=made.calibration.ranges):
            pass
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(made.graphs[0].onnx.read_bytes())  # a graph without an export report: no t_range
    with pytest.raises(ValueError, match="timestep groups of one groups=K recipe"):
        with api.open_denoiser(loaded, onnx=[plain, made.graphs[1].onnx]):
            pass
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        with api.open_denoiser(loaded, onnx=tmp_path / "none.onnx"):
            pass
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        api.SampleSettings(steps=0)


def test_sensitivity_through_the_api(tiny_pipeline_dir, tmp_path):
    """api.sensitivity: the block report of the quantized model (pooled ranges here), and a clear error for an
    unknown kind."""
    loaded = api.load(str(tiny_pipeline_dir))
    quant = api.QuantSettings(recipe="max", spec=CalibSpec(TimestepSpec("uniform"), n=8, steps=4), cache_root=tmp_path,
                              batch=8)
    rep = api.sensitivity(loaded, quant, by="blocks", progress=False)
    assert rep["recipe"] == "max" and rep["guidance_scale"] == 1 and rep["rel_mse"] > 0 and rep["n"] == 8
    assert {"down_blocks.0.resnets.0", "mid_block.attentions.0"} <= {r["block"] for r in rep["blocks"]}
    with pytest.raises(ValueError, match="accepted 'blocks' or 'layers'"):
        api.sensitivity(loaded, quant, by="heads", progress=False)
