"""A Stable Diffusion 3 pipeline (MMDiT, CLIP-L, CLIP-G, T5, rectified flow) through `trt-dm info / sample / engine`,
as a new user tries it: an image grid from a prompt; one TensorRT-RTX plan of the timestep groups in one graph with its
GEMMs on int8, float time inputs in the graph and the profiles, and the Q/DQ graph in ONNX Runtime agreeing with the
torch fake-quant model at float time inputs between the levels."""
import json

import torch

from trt_dm import api
from trt_dm.cli.main import main
from trt_dm.models.builders import write_tiny_sd3_pipeline


def test_sd3_transformer_through_info_and_engine(tmp_path, capsys):
    import onnxruntime as ort

    from trt_dm.quant.calib.timesteps import TimestepSpec
    from trt_dm.quant.calib.trajectories import CalibSpec
    from trt_dm.targets.trt_builder import load_sidecar
    root = write_tiny_sd3_pipeline(tmp_path / "sd3", seed=5, joint=20, clip=(8, 10), projection=(6, 4),
                                   num_layers=2, num_attention_heads=3, caption_projection_dim=24)
    assert main(["info", "--model", str(root)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "SD3Transformer2DModel" and info["scheduler_source"] == "dir"
    assert {i["name"]: i["dtype"] for i in info["signature"]["inputs"]}["timestep"] == "float32"
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(root), "--prompt", "a red apple", "--n", "2", "--steps", "3", "--out",
                 str(grid), "--no-progress"]) == 0
    assert "ddim, 3 steps" in capsys.readouterr().out and grid.is_file()
    eng = tmp_path / "eng"
    common = ["--timesteps", "uniform", "--calib-n", "8", "--calib-steps", "8",
              "--guidance-scale", "4", "--batch", "4", "--cache-dir", str(tmp_path / "cc"), "--no-progress"]
    assert main(["engine", "--model", str(root), *common, "--out-dir", str(eng), "--no-baseline",
                 "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1", "--max-batch", "2",
                 "--opt-batch", "1"]) == 0
    out = capsys.readouterr().out
    plan = eng / "sd3-ptq4dm-g4.onegraph.plan"
    assert plan.is_file() and "'Int8': " in out.split("gemm", 1)[1]
    side = load_sidecar(plan)
    assert side.inputs["timestep"]["dtype"] == "FLOAT" and side.inputs["text_embeds"]["max"] == [4, 10]
    assert side.inputs["encoder_hidden_states"]["opt"] == [2, 8 + 256, 20]
    loaded = api.load(str(root))
    quant = api.QuantSettings(recipe="ptq4dm-g4", spec=CalibSpec(TimestepSpec("uniform"), n=8, steps=8,
                                                                 guidance_scale=4.0),
                              cache_root=tmp_path / "cc", batch=4)
    calib = api.calibrate(loaded, quant, progress=False)
    feed = loaded.signature.example(4, seed=0, seq_len=9, height=8)
    feed["timestep"] = torch.tensor([999.3, 640.25, 301.5, 27.75])  # one row in each group, between the levels
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    graph = ort.InferenceSession(str(eng / "sd3-ptq4dm-g4.onegraph.fp32.onnx"), opts,
                                 providers=["CPUExecutionProvider"])
    assert {i.name: i.type for i in graph.get_inputs()}["timestep"] == "tensor(float)"
    one = torch.from_numpy(graph.run(None, {k: v.numpy() for k, v in feed.items()})[0])
    with api.open_denoiser(loaded, ranges=calib.ranges, qcfg=quant.resolved(loaded).qcfg) as fq:
        ref = fq(feed["sample"], feed["timestep"], **{k: v for k, v in feed.items() if k not in ("sample", "timestep")})
    assert (one - ref).abs().max() < 0.03


def _small_engine(root, tmp_path, capsys, *extra: str) -> str:
    """`trt-dm engine` with the one-range recipe on a few calibration samples, one plan for 1..2 rows; its stdout."""
    assert main(["engine", "--model", str(root), "--recipe", "ptq4dm", "--calib-n", "6", "--calib-steps", "4",
                 "--batch", "4", "--cache-dir", str(tmp_path / "cc"), "--no-progress", "--out-dir",
                 str(tmp_path / "eng"), "--no-baseline", "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch",
                 "1", "--max-batch", "2", "--opt-batch", "1", *extra]) == 0
    return capsys.readouterr().out


def test_pixart_pipeline_through_sample_and_engine(tmp_path, capsys):
    """A PixArt-Sigma pipeline (T5 with its padding mask, learned variance): `sample --prompt` draws a grid, `engine`
    builds one plan whose profiles carry the mask on the sequence axis, GEMMs on int8."""
    from trt_dm.models.builders import write_tiny_pixart_pipeline
    from trt_dm.targets.trt_builder import load_sidecar
    root = write_tiny_pixart_pipeline(tmp_path / "pixart", seed=2, width=12, num_layers=2, num_attention_heads=2,
                                      attention_head_dim=10, cross_attention_dim=20)
    grid = tmp_path / "g.png"
    assert main(["sample", "--model", str(root), "--prompt", "a red apple", "--n", "2", "--steps", "3", "--out",
                 str(grid), "--no-progress"]) == 0
    assert "guidance 7.5" in capsys.readouterr().out and grid.is_file()
    eng = tmp_path / "eng"
    out = _small_engine(root, tmp_path, capsys)
    assert "'Int8': " in out.split("gemm", 1)[1]
    side = load_sidecar(eng / "pixart-ptq4dm.plan")
    assert side.inputs["encoder_attention_mask"]["opt"] == [2, 300] and side.inputs["timestep"]["dtype"] == "INT64"


def test_flux_pipeline_through_sample_and_engine(tmp_path, capsys):
    """A Flux.1-dev-style pipeline (packed latents, embedded guidance 3.5 by default): `sample --prompt` draws a grid,
    `engine` builds one plan (FP32 graph around the Q/DQ, to keep the test short) whose GEMMs run on int8 and whose
    profiles carry the float time and guidance inputs."""
    from trt_dm.models.builders import write_tiny_flux_pipeline
    from trt_dm.targets.trt_builder import load_sidecar
    root = write_tiny_flux_pipeline(tmp_path / "flux", seed=3, clip=12, joint=16, num_attention_heads=2)
    grid = tmp_path / "g.png"
    assert main(["sample", "--model", str(root), "--prompt", "a red apple", "--n", "2", "--steps", "3", "--out",
                 str(grid), "--no-progress"]) == 0
    assert "guidance 3.5" in capsys.readouterr().out and grid.is_file()
    eng = tmp_path / "eng"
    out = _small_engine(root, tmp_path, capsys, "--precision", "fp32")
    assert "'Int8': " in out.split("gemm", 1)[1]
    side = load_sidecar(next(eng.glob("flux-ptq4dm*.plan")))
    assert side.inputs["timestep"]["dtype"] == "FLOAT" and side.inputs["guidance"]["max"] == [2]
    assert side.inputs["encoder_hidden_states"]["opt"] == [1, 512, 16]
