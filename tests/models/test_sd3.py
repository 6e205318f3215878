"""Stable Diffusion 3's MMDiT (``SD3Transformer2DModel``) with rectified-flow sampling: the images `trt-dm sample`
draws are diffusers' ``StableDiffusion3Pipeline``'s for the same embeddings and seeds; the flow model's float time
inputs go through calibration (floored keys), the step-level server and the drop-in; what does not apply is refused."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from trt_dm import api
from trt_dm.core.flow import FlowSchedule
from trt_dm.core.schedule import make_generators, randn_per_sample
from trt_dm.models.builders import write_tiny_sd3, write_tiny_sd3_pipeline
from trt_dm.models.dropin import DropInUNet
from trt_dm.sampling import SampleSettings


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny SD3 layout (transformer/ + scheduler/, shift 3) of other sizes than the builder's defaults, and a file
    of embeddings for 2 prompts with their negatives."""
    root = write_tiny_sd3(tmp_path_factory.mktemp("m") / "tiny_sd3", seed=3, num_layers=3, num_attention_heads=3,
                          caption_projection_dim=24, joint_attention_dim=10, pooled_projection_dim=6)
    g = torch.Generator().manual_seed(1)
    emb = root / "emb.safetensors"
    save_file({"prompt_embeds": torch.randn(2, 7, 10, generator=g),
               "pooled_prompt_embeds": torch.randn(2, 6, generator=g),
               "negative_prompt_embeds": torch.randn(1, 7, 10, generator=g),
               "negative_pooled_prompt_embeds": torch.randn(1, 6, generator=g)}, str(emb))
    return root, emb


def _diffusers_latents(root, emb, seeds, steps, scale):
    """The latents diffusers' StableDiffusion3Pipeline makes from these embeddings (no text encoders, no VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors.torch import load_file
    d = load_file(str(emb))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(root / "transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    n = len(seeds)
    rows = torch.arange(n) % 2
    return pipe(prompt_embeds=d["prompt_embeds"][rows], pooled_prompt_embeds=d["pooled_prompt_embeds"][rows],
                negative_prompt_embeds=d["negative_prompt_embeds"].expand(n, -1, -1),
                negative_pooled_prompt_embeds=d["negative_pooled_prompt_embeds"].expand(n, -1),
                num_inference_steps=steps, guidance_scale=scale, generator=make_generators(seeds),
                height=8 * 8, width=8 * 8, output_type="latent").images


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_samples_are_diffusers_sd3_pipelines(sd3, scale):
    root, emb = sd3
    loaded = api.load(root)
    assert loaded.kind == "SD3Transformer2DModel" and isinstance(loaded.schedule(), FlowSchedule)
    sig = loaded.signature
    assert sig["timestep"].dtype == torch.float32 and sig["text_embeds"].shape == ("batch", 6)
    assert sig["encoder_hidden_states"].shape == ("batch", "sequence", 10)
    settings = SampleSettings(steps=5, n=3, seed=4, batch=3, embeddings=str(emb), guidance_scale=scale)
    with api.open_denoiser(loaded) as den:
        ours, _ = api.draw(loaded, den, settings, progress=False)
    ref = _diffusers_latents(root, emb, list(settings.seeds), 5, scale)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    with api.open_denoiser(loaded) as den:  # diffusers' name for the step: the same images
        euler, _ = api.draw(loaded, den, SampleSettings(**{**settings.__dict__, "sampler": "euler"}), progress=False)
    torch.testing.assert_close(euler, ours, atol=0, rtol=0)


def test_flow_samplers_and_bare_dirs_are_refused_or_defaulted_clearly(sd3, tmp_path, capsys):
    from trt_dm.cli.main import main
    root, emb = sd3
    common = ["sample", "--model", str(root), "--embeddings", str(emb), "--n", "1", "--steps", "2", "--save-samples",
              str(tmp_path / "s.safetensors"), "--no-progress"]
    assert main([*common, "--sampler", "ddpm"]) == 2
    assert "'ddpm' does not step a flow-matching model; accepted: ddim, euler" in capsys.readouterr().err
    assert main([*common, "--eta", "0.5"]) == 2
    assert "samples deterministically here; accepted: eta 0" in capsys.readouterr().err
    bare = tmp_path / "bare"  # the transformer alone: SD3's scheduler (rectified flow, shift 3) by default
    shutil.copytree(root / "transformer", bare)
    assert api.load(bare).schedule() == FlowSchedule(shift=3.0)
    time_ids = tmp_path / "t.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 7, 10), "pooled_prompt_embeds": torch.zeros(1, 6),
               "add_time_ids": torch.zeros(1, 6)}, str(time_ids))
    assert main(["sample", "--model", str(bare), "--embeddings", str(time_ids), "--n", "1", "--save-samples",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "['add_time_ids'] are SDXL's micro-conditioning" in capsys.readouterr().err
    pipe = tmp_path / "pipe"  # a pipeline with CLIP-L only: refused naming CLIP-G
    shutil.copytree(root, pipe)
    (pipe / "text_encoder").mkdir()
    (pipe / "tokenizer").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert main(["info", "--model", str(pipe)]) == 2
    assert "needs text_encoder_2/ (CLIP-L in text_encoder/, CLIP-G in text_encoder_2/)" in capsys.readouterr().err


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_pipeline_prompts_and_images_are_diffusers(tmp_path, t5):
    """A StableDiffusion3Pipeline directory (CLIP-L, CLIP-G, with or without T5, a shifted VAE): the prompt encoding
    is encode_prompt's bit for bit (the negative to an ulp), and the decoded images of `sample --prompt` with guidance are the pipeline's."""
    from diffusers import StableDiffusion3Pipeline
    root = write_tiny_sd3_pipeline(tmp_path / "p", seed=2, t5=t5, joint=28, clip=(10, 12), projection=(4, 8),
                                   num_layers=2, num_attention_heads=2)
    loaded = api.load(root)
    assert loaded.seq_len == 8 + 256 and loaded.text.describe()["vae_shift_factor"] == pytest.approx(0.0609)
    pipe = StableDiffusion3Pipeline.from_pretrained(root, **({} if t5 else dict(text_encoder_3=None,
                                                                                tokenizer_3=None)))
    prompts = ["a red apple", "the cat at dusk"]
    with torch.no_grad():  # as the pipeline's __call__ runs it
        pe, npe, ppe, nppe = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True)
    ours, neg = loaded.text.encode(prompts), loaded.text.encode_negative("")
    assert torch.equal(ours["encoder_hidden_states"], pe) and torch.equal(ours["text_embeds"], ppe)
    for k, ref in (("encoder_hidden_states", npe[:1]), ("text_embeds", nppe[:1])):  # diffusers encodes "" twice here:
        torch.testing.assert_close(neg[k], ref, atol=1e-6, rtol=0)  # a batch of 2 rounds its projection apart by ulps
    settings = SampleSettings(steps=3, n=2, seed=6, batch=2, prompts=tuple(prompts), guidance_scale=5.0)
    with api.open_denoiser(loaded) as den:
        images, _ = api.draw(loaded, den, settings, progress=False)
    ref = pipe(prompt=prompts, num_inference_steps=3, guidance_scale=5.0, generator=make_generators(settings.seeds),
               height=8 * loaded.text.vae_scale_factor, width=8 * loaded.text.vae_scale_factor, output_type="pt").images
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), ref, atol=1e-5, rtol=0)


def test_calibration_of_float_time_inputs_is_deterministic_and_floored(sd3, tmp_path):
    from trt_dm.quant.calib.timesteps import TimestepSpec
    from trt_dm.quant.calib.trajectories import CalibSpec
    root, emb = sd3
    loaded = api.load(root)
    spec = CalibSpec(TimestepSpec("uniform"), n=8, steps=8, embeddings=str(emb), guidance_scale=4.0)
    runs = [api.calibrate(loaded, api.QuantSettings(recipe="ptq4dm-g4", spec=spec, cache_root=tmp_path / f"c{i}",
                                                    batch=4), progress=False) for i in range(2)]
    a, b = (r.ranges for r in runs)
    assert a.t_ranges == b.t_ranges and all(ga.amax == gb.amax for ga, gb in zip(a.groups, b.groups))
    levels = loaded.schedule().timesteps(8)
    assert levels[0] == 1000.0 and all(isinstance(t, float) for t in levels)
    floors = sorted({int(t) for t in levels}, reverse=True)
    assert a.t_ranges[0][0] == floors[0] and a.t_ranges[-1][1] == floors[-1]  # groups bound the floored inputs


def test_step_level_server_and_dropin_draw_the_sampler_images(sd3):
    from trt_dm.serve.scheduler import Request, StepScheduler
    root, emb = sd3
    loaded = api.load(root)
    settings = SampleSettings(steps=4, n=2, seed=9, batch=2, embeddings=str(emb), guidance_scale=1.0)
    cond, _ = api.conditioning(loaded, settings)
    with api.open_denoiser(loaded) as den:
        ref, _ = api.draw(loaded, den, settings, progress=False)
        sched = StepScheduler(den, loaded.schedule(), loaded.sample_shape, max_rows=4)
        h = sched.submit(Request(n=2, steps=4, seed=9, conditioning=cond))
        sched.run_until_idle()
        torch.testing.assert_close(h.images, ref, atol=1e-6, rtol=0)
        drop = DropInUNet(loaded, den)
        x = randn_per_sample(make_generators([0, 1]), loaded.sample_shape)
        t = torch.tensor(812.5)  # a float time input goes through unrounded
        out = drop(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                   pooled_projections=cond["text_embeds"], joint_attention_kwargs=None, return_dict=False)[0]
        direct = den(x, t.expand(2), **cond)
    torch.testing.assert_close(out, direct, atol=0, rtol=0)


def test_service_serves_an_sd3_pipeline_and_documents_its_samplers(tmp_path):
    """`trt-dm serve` on an SD3 pipeline: a prompt gives the images `sample --prompt` draws; the OpenAPI document
    lists the flow model's samplers (ddim, euler) and a request for ddpm is a 422 naming the field."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from trt_dm.core.images import to_uint8
    from trt_dm.serve.engine import Service
    from trt_dm.serve.http import create_app
    loaded = api.load(write_tiny_sd3_pipeline(tmp_path / "p", seed=4))
    settings = SampleSettings(steps=3, n=2, seed=7, prompts=("a red apple",), guidance_scale=3.0)
    with api.open_denoiser(loaded) as den:
        ref = to_uint8(api.draw(loaded, den, settings, progress=False)[0])
        with TestClient(create_app(Service(loaded, den, max_rows=4))) as client:
            doc = client.get("/openapi.json").json()
            enum = json.dumps(doc["components"]["schemas"]["Generate"]["properties"]["sampler"])
            assert '"ddim"' in enum and '"euler"' in enum and '"ddpm"' not in enum
            bad = client.post("/v1/generate", json={"n": 1, "steps": 3, "prompt": "a cat", "sampler": "ddpm"})
            assert bad.status_code == 422 and "sampler" in bad.text
            r = client.post("/v1/generate", json={"n": 2, "steps": 3, "seed": 7, "prompt": "a red apple",
                                                  "guidance_scale": 3.0, "sampler": "euler", "output": "json"})
            assert r.status_code == 200, r.text
    import base64
    import io

    import numpy as np
    from PIL import Image
    got = [np.array(Image.open(io.BytesIO(base64.b64decode(b))))[2:-2, 2:-2] for b in r.json()["images"]]
    for i in range(2):
        assert np.abs(got[i].astype(int) - ref[i].astype(int)).max() <= 1
