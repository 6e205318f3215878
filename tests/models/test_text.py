"""Text-to-image pipelines in the Stable Diffusion layout, on a tiny pipeline written offline: prompts encoded by
the pipeline's own tokenizer and text encoder, sampling in latent space with classifier-free guidance, images
decoded by its VAE; calibration from prompts (cache keyed by the prompt set); the engine path with the sequence
length in the profiles and the text encoder / VAE named in the sidecar; the ONNX Runtime run of the Q/DQ graph
against torch fake-quant; precomputed embeddings; one clear error for each kind of bad input."""
import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")

from trt_dm import api  # noqa: E402
from trt_dm.models.text import builtin_prompts  # noqa: E402


def test_prompt_to_image_in_torch(sd):
    assert sd.text_conditioned and sd.seq_len == 8 and sd.sample_shape == (4, 8, 8)
    s = api.SampleSettings(steps=4, n=3, seed=2, prompts=("a red apple", "the cat"), guidance_scale=7.5)
    with api.open_denoiser(sd, device="cpu") as den:
        a, _ = api.draw(sd, den, s, progress=False)
        b, _ = api.draw(sd, den, s, progress=False)
        one, _ = api.draw(sd, den, api.SampleSettings(steps=4, n=1, seed=4, prompts=("a red apple",),
                                                      guidance_scale=7.5), progress=False)
        other, _ = api.draw(sd, den, api.SampleSettings(steps=4, n=3, seed=2, prompts=("a blue car",),
                                                        guidance_scale=7.5), progress=False)
        unguided, _ = api.draw(sd, den, api.SampleSettings(steps=4, n=3, seed=2, prompts=("a red apple", "the cat")),
                               progress=False)
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1  # decoded by the VAE: 3 x 16 x 16
    assert torch.equal(a, b)  # seeds reproduce
    torch.testing.assert_close(a[2], one[0], atol=1e-5, rtol=0)  # image 2 = seed 4, prompt 0 (cycled), any batch
    assert not torch.allclose(a[0], other[0]) and not torch.allclose(a, unguided)  # prompt and guidance matter


def test_encoding_matches_the_text_encoder_and_negative_prompt_is_the_null_row(sd):
    te = sd.text
    ids = te.tokenizer(["the cat"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(sd.conditioning_for(2, prompts=["the cat"])["encoder_hidden_states"][1],
                               te.text_encoder(ids)[0][0])
    g = sd.guidance(3.0, negative_prompt="blurry")
    torch.testing.assert_close(g.null["encoder_hidden_states"], te.encode(["blurry"])["encoder_hidden_states"])
    assert set(g.null) == {"encoder_hidden_states"} and not te.force_zeros_for_empty_prompt  # SD: no pooled, no zeros
    assert not torch.equal(sd.guidance(3.0).null["encoder_hidden_states"], g.null["encoder_hidden_states"])


def test_builtin_prompts_are_many_and_distinct():
    prompts = builtin_prompts()
    assert len(prompts) >= 128 and len(set(prompts)) == len(prompts)
    lengths = sorted(len(p.split()) for p in prompts)
    assert lengths[0] <= 2 and lengths[-1] >= 15  # (17 words at most)  # from two words to long sentences


def test_calibration_from_prompts_is_keyed_by_the_prompt_set(sd, tmp_path):
    from trt_dm.quant.calib.trajectories import CalibSpec
    spec = CalibSpec(n=6, steps=4)
    quant = api.QuantSettings(spec=spec, cache_root=tmp_path, batch=4).resolved(sd)
    assert quant.spec.prompts == builtin_prompts()
    a = api.calibrate(sd, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=6, steps=4, guidance_scale=7.5),
                                            cache_root=tmp_path, batch=4), progress=False)
    b = api.calibrate(sd, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=6, steps=4, guidance_scale=7.5,
                                                                             prompts=("a cat",)),
                                            cache_root=tmp_path, batch=4), progress=False)
    assert a.stats_dir != b.stats_dir and a.ranges.to_dict() != b.ranges.to_dict()
    calib = json.loads(json.loads((b.stats_dir / "stats.json").read_text())["meta"]["calib"])
    assert calib["prompts"]["n"] == 1 and len(calib["prompts"]["sha256"]) == 64 and calib["guidance_scale"] == 7.5
    assert "a cat" not in (b.stats_dir / "stats.json").read_text()  # the key holds the prompts' sha256, not the text
    again = api.calibrate(sd, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=6, steps=4, guidance_scale=7.5),
                                                cache_root=tmp_path, batch=4), progress=False)
    assert again.stats_reused and again.ranges.to_dict() == a.ranges.to_dict()  # bit for bit on CPU


def test_precomputed_embeddings(sd, tmp_path):
    emb = sd.text.encode(["a red apple", "the cat"])["encoder_hidden_states"]
    f = tmp_path / "e.safetensors"
    save_file({"prompt_embeds": emb.contiguous(),
               "negative_prompt_embeds": sd.text.encode([""])["encoder_hidden_states"].contiguous()}, str(f))
    with api.open_denoiser(sd, device="cpu") as den:
        a, _ = api.draw(sd, den, api.SampleSettings(steps=3, n=2, embeddings=str(f), guidance_scale=7.5), progress=False)
        b, _ = api.draw(sd, den, api.SampleSettings(steps=3, n=2, prompts=("a red apple", "the cat"),
                                                    guidance_scale=7.5), progress=False)
    torch.testing.assert_close(a, b)
    wide = tmp_path / "wide.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 8, 32)}, str(wide))
    with pytest.raises(ValueError, match=r"prompt_embeds has shape \(1, 8, 32\); this UNet takes \(N, 8, 16\)"):
        api.conditioning(sd, api.SampleSettings(n=1, embeddings=str(wide)))
    long = tmp_path / "long.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 9, 16)}, str(long))
    with pytest.raises(ValueError, match="sequence length 8"):
        api.conditioning(sd, api.SampleSettings(n=1, embeddings=str(long)))


def test_served_prompt_images_equal_sampled_ones(sd):
    """`trt-dm serve` on a text-to-image pipeline: a prompt in the request, guidance 7.5 by default, the VAE decodes;
    the served image equals `trt-dm sample`'s for the same seed and prompt (uint8 rounding, <= 1)."""
    from support import served_equals_sampled
    out = served_equals_sampled(sd)
    assert out["labels"].status_code == 422
    bad = out["no_prompt"]  # no prompt: the request's field, no file options
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert bad.json()["detail"][0]["msg"].endswith('give "prompt" TEXT'), bad.text
    assert out["models"]["text_pipeline"]["vae"].endswith("vae")


