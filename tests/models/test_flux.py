"""Flux.1 (``FluxTransformer2DModel``: packed latents, rotary position ids, rectified flow with resolution-dependent
shift, embedded guidance): prompts encoded and images drawn exactly as diffusers' ``FluxPipeline`` does, for a
guidance-distilled (dev-style) and a plain (schnell-style) transformer; the graph's batch and text length stay
dynamic; defaults and refusals."""
import json
import shutil

import numpy as np
import pytest
import torch

from trt_dm import api
from trt_dm.core.schedule import make_generators
from trt_dm.models.builders import write_tiny_flux_pipeline
from trt_dm.models.loading import ModelLoadError
from trt_dm.sampling import SampleSettings


@pytest.mark.parametrize("embedded", [True, False])
def test_prompts_and_images_are_flux_pipelines(tmp_path, embedded):
    from diffusers import FluxPipeline
    root = write_tiny_flux_pipeline(tmp_path / "f", seed=4, guidance_embeds=embedded, clip=10, joint=20,
                                    num_layers=2, num_single_layers=2, num_attention_heads=3)
    loaded = api.load(root)
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds"] + (["guidance"] if embedded else [])
    assert loaded.signature.names == names and loaded.sample_shape == (4, 8, 8) and loaded.seq_len == 512
    sched = loaded.schedule()
    assert sched.levels_from == "linspace" and sched.mu == pytest.approx(sched.mu_for(16))
    pipe = FluxPipeline.from_pretrained(root)
    prompts = ["a red apple", "the cat at dusk"]
    with torch.no_grad():
        pe, ppe, _ = pipe.encode_prompt(prompts, prompts)
    ours = loaded.text.encode(prompts)
    assert torch.equal(ours["encoder_hidden_states"], pe) and torch.equal(ours["text_embeds"], ppe)
    scale = 3.5 if embedded else 1.0  # FluxPipeline: embedded guidance 3.5; a schnell-style model: none
    settings = SampleSettings(steps=4, n=2, seed=3, batch=2, prompts=tuple(prompts), guidance_scale=scale)
    with api.open_denoiser(loaded) as den:
        images, _ = api.draw(loaded, den, settings, progress=False)
    ref = pipe(prompt=prompts, num_inference_steps=4, guidance_scale=scale, generator=make_generators(settings.seeds),
               height=16, width=16, output_type="pt").images
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), ref, atol=1e-5, rtol=0)
    if not embedded:  # true classifier-free guidance with a negative prompt: FluxPipeline's true_cfg_scale
        cfg = SampleSettings(**{**settings.__dict__, "guidance_scale": 2.0, "negative_prompt": "blurry"})
        with api.open_denoiser(loaded) as den:
            guided, _ = api.draw(loaded, den, cfg, progress=False)
        ref = pipe(prompt=prompts, negative_prompt="blurry", true_cfg_scale=2.0, num_inference_steps=4,
                   generator=make_generators(settings.seeds), height=16, width=16, output_type="pt").images
        torch.testing.assert_close((guided / 2 + 0.5).clamp(0, 1), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("embedded", [True, False])
def test_a_deployed_flux_drops_into_diffusers_flux_pipeline(tmp_path, embedded):
    """`pipe.transformer = DropInUNet(loaded, denoiser)`: FluxPipeline's packed latents, position ids and time / 1000
    go to the graph's unpacked sample and sigma x 1000, its velocity back packed; the images are the pipeline's own
    (here over the FP denoiser; an engine or graph goes in the same way). Other position ids are refused."""
    from diffusers import FluxPipeline

    from trt_dm.models.dropin import DropInUNet
    root = write_tiny_flux_pipeline(tmp_path / "f", seed=5, guidance_embeds=embedded, clip=10, joint=20,
                                    num_layers=1, num_single_layers=1, num_attention_heads=2)
    loaded = api.load(root)
    pipe = FluxPipeline.from_pretrained(root)
    kw = dict(prompt=["a red apple", "a boot"], num_inference_steps=3, height=16, width=16, output_type="pt",
              guidance_scale=3.5 if embedded else 1.0)
    ref = pipe(generator=make_generators([1, 2]), **kw).images
    with api.open_denoiser(loaded) as den:
        pipe.transformer = DropInUNet(loaded, den)
        got = pipe(generator=make_generators([1, 2]), **kw).images
        packed = torch.zeros(1, 16, 16)
        ids = torch.zeros(16, 3)
        ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
        with pytest.raises(ValueError, match="FluxPipeline's own position ids"):
            pipe.transformer(hidden_states=packed, timestep=torch.tensor([0.5]), img_ids=ids + 1,
                             txt_ids=torch.zeros(4, 3), encoder_hidden_states=torch.zeros(1, 4, 20),
                             pooled_projections=torch.zeros(1, 10), return_dict=False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_graph_keeps_batch_and_text_length_dynamic(tmp_path):
    """diffusers applies the rotary embedding with a reshape to x.shape[:-1], which the ONNX exporter freezes; the
    denoiser's own rotary (unflatten) keeps the graph's batch and sequence dynamic."""
    import onnxruntime as ort

    from trt_dm.export.onnx import export_onnx
    loaded = api.load(write_tiny_flux_pipeline(tmp_path / "f", seed=1))
    path = export_onnx(loaded.unet, tmp_path / "fp.onnx", batch=2, seq_len=8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq in ((2, 8), (3, 8), (1, 5)):
        feed = loaded.signature.example(batch, seq_len=seq, height=8)
        out = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        with torch.no_grad():
            ref = loaded.unet(**feed).sample.numpy()
        assert out.shape == (batch, 4, 8, 8) and np.abs(out - ref).max() < 1e-5


def test_defaults_and_refusals(tmp_path, capsys):
    from trt_dm.cli.main import main
    from trt_dm.cli.settings import guidance_scale_of
    root = write_tiny_flux_pipeline(tmp_path / "f", seed=2)
    args = type("A", (), {"guidance_scale": None, "model": str(root)})()
    assert guidance_scale_of(args) == 3.5  # FluxPipeline's default for embedded guidance
    bare = tmp_path / "bare"  # the transformer alone: 1024 px (128 latent) and Flux's dynamic-shift scheduler
    shutil.copytree(root / "transformer", bare)
    alone = api.load(bare)
    assert alone.sample_shape == (4, 128, 128) and alone.schedule().use_dynamic_shifting
    (bare / "trt_dm.json").write_text(json.dumps({"sample_size": 7}))
    with pytest.raises(ModelLoadError, match="sample_size 7: accepted an even integer"):
        api.load(bare)
    cfg = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**cfg, "patch_size": 2}))
    (bare / "trt_dm.json").unlink()
    assert main(["info", "--model", str(bare)]) == 2
    assert "supported: Flux.1's layout (patch_size 1 on 2x2-packed latents" in capsys.readouterr().err
