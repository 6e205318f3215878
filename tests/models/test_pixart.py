"""PixArt (``PixArtTransformer2DModel``, T5 captions with their padding mask): prompts encoded as diffusers' PixArt
pipelines do, images equal to ``PixArtSigmaPipeline``'s (with the DDIM scheduler built from the same config), the
drop-in in diffusers' pipeline, a bare transformer from embeddings, and the refusals."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from trt_dm import api
from trt_dm.core.schedule import make_generators
from trt_dm.models.builders import write_tiny_pixart_pipeline
from trt_dm.models.dropin import DropInUNet
from trt_dm.models.loading import ModelLoadError
from trt_dm.sampling import SampleSettings


@pytest.mark.parametrize("kind,learned,length", [("PixArtSigmaPipeline", True, 300),
                                                 ("PixArtAlphaPipeline", False, 120)])
def test_prompts_images_and_dropin_are_diffusers(tmp_path, kind, learned, length):
    from diffusers import DDIMScheduler, PixArtSigmaPipeline
    root = write_tiny_pixart_pipeline(tmp_path / "p", seed=3, kind=kind, width=20, learned_sigma=learned,
                                      num_layers=3, num_attention_heads=3, cross_attention_dim=24)
    loaded = api.load(root)
    assert loaded.kind == "PixArtTransformer2DModel" and loaded.seq_len == length
    assert loaded.signature.names == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    pipe = PixArtSigmaPipeline.from_pretrained(root)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the sampler trt-dm runs (DDIM)
    prompts = ["a red apple", "  The cat at DUSK "]  # lower-cased and stripped, as clean_caption=False does
    with torch.no_grad():
        pe, pm, npe, npm = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, clean_caption=False,
                                              max_sequence_length=length)
    ours, neg = loaded.text.encode(prompts), loaded.text.encode_negative("")
    assert torch.equal(ours["encoder_hidden_states"], pe) and torch.equal(ours["encoder_attention_mask"], pm.float())
    assert torch.equal(neg["encoder_hidden_states"], npe[:1]) and torch.equal(neg["encoder_attention_mask"],
                                                                              npm[:1].float())
    settings = SampleSettings(steps=4, n=2, seed=6, batch=2, prompts=tuple(prompts), guidance_scale=4.5)
    call = dict(prompt=prompts, num_inference_steps=4, guidance_scale=4.5, height=16, width=16, output_type="pt",
                clean_caption=False, use_resolution_binning=False, max_sequence_length=length)
    with api.open_denoiser(loaded) as den:
        images, _ = api.draw(loaded, den, settings, progress=False)
        ref = pipe(generator=make_generators(settings.seeds), **call).images
        torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), ref, atol=1e-5, rtol=0)
        pipe.transformer = DropInUNet(loaded, den)  # the deployed denoiser inside diffusers' own pipeline
        dropped = pipe(generator=make_generators(settings.seeds), **call).images
    torch.testing.assert_close(dropped, ref, atol=1e-5, rtol=0)


def test_bare_transformer_from_embeddings_and_refusals(tmp_path, capsys):
    from trt_dm.cli.main import main
    root = write_tiny_pixart_pipeline(tmp_path / "p", seed=1)
    bare = tmp_path / "bare"
    shutil.copytree(root / "transformer", bare)
    f = tmp_path / "e.safetensors"
    enc = api.load(root).text.encode(["a cat", "a dog"])
    save_file({"prompt_embeds": enc["encoder_hidden_states"][:, :9].contiguous(),
               "prompt_attention_mask": enc["encoder_attention_mask"][:, :9].contiguous()}, str(f))
    out = tmp_path / "lat.safetensors"
    assert main(["sample", "--model", str(bare), "--embeddings", str(f), "--n", "2", "--steps", "2",
                 "--guidance-scale", "1", "--save-samples", str(out), "--no-progress"]) == 0 and out.is_file()
    capsys.readouterr()
    save_file({"prompt_embeds": enc["encoder_hidden_states"][:, :9].contiguous()}, str(f))
    assert main(["sample", "--model", str(bare), "--embeddings", str(f), "--n", "1", "--save-samples", str(out)]) == 2
    assert "needs prompt_attention_mask (the tokens' padding mask" in capsys.readouterr().err
    cfg = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**cfg, "use_additional_conditions": True}))
    with pytest.raises(ModelLoadError, match="no resolution / aspect-ratio conditioning"):
        api.load(bare)
