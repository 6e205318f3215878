"""SDXL-layout UNets (``addition_embed_type="text_time"``) and pipelines (two text encoders), on tiny pipelines written
offline: the added conditioning (pooled text embedding, micro-conditioning time ids) as named inputs; prompts encoded
exactly as diffusers' StableDiffusionXLPipeline encodes them; the diffusers drop-in inside that pipeline; other SDXL
widths and depths; a UNet saved without its pipeline, calibrated from a file of embeddings; one clear error for each
kind of bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")

from trt_dm import api  # noqa: E402
from trt_dm.models.loading import ModelLoadError  # noqa: E402
from trt_dm.quant.calib.trajectories import CalibSpec  # noqa: E402


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_pipeline_dir):
    return api.load(str(tiny_sdxl_pipeline_dir))


def _diffusers_pipe(path):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # trt-dm's default sampler, same config
    return pipe


def test_signature_and_prompt_encoding_are_diffusers(sdxl, tiny_sdxl_pipeline_dir):
    sig = sdxl.signature
    assert sig.names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert sig["encoder_hidden_states"].shape == ("batch", "sequence", 40)  # both encoders' widths, 16 + 24
    assert sig["text_embeds"].shape == ("batch", 12) and sig["time_ids"].shape == ("batch", 6)
    pipe = _diffusers_pipe(tiny_sdxl_pipeline_dir)
    pe, npe, pooled, npooled = pipe.encode_prompt("the cat", do_classifier_free_guidance=True)
    cond = sdxl.conditioning_for(2, prompts=["the cat"])
    assert torch.equal(cond["encoder_hidden_states"][1], pe[0]) and torch.equal(cond["text_embeds"][1], pooled[0])
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond["time_ids"], ids.expand(2, 6))  # 16 px images: (16, 16, 0, 0, 16, 16)
    null = sdxl.guidance(5.0).null  # force_zeros_for_empty_prompt: the empty negative prompt is zeros
    assert torch.equal(null["encoder_hidden_states"], npe) and torch.equal(null["text_embeds"], npooled)
    assert not null["text_embeds"].any() and torch.equal(null["time_ids"], ids)
    pe2, npe2, _, npooled2 = pipe.encode_prompt("the cat", do_classifier_free_guidance=True, negative_prompt="blurry")
    blurry = sdxl.guidance(5.0, negative_prompt="blurry").null
    assert torch.equal(blurry["encoder_hidden_states"], npe2) and torch.equal(blurry["text_embeds"], npooled2)


def test_drop_in_inside_diffusers_sdxl_pipeline_draws_trt_dm_images(sdxl, tiny_sdxl_pipeline_dir):
    """diffusers' StableDiffusionXLPipeline with ``pipe.unet = DropInUNet(...)`` (its added_cond_kwargs feed the
    text_embeds / time_ids inputs) draws what `trt-dm sample` draws for the same seeds, prompt and guidance, and what
    the pipeline draws with its own UNet."""
    from trt_dm.models.dropin import DropInUNet
    pipe = _diffusers_pipe(tiny_sdxl_pipeline_dir)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=16, width=16, output_type="pt")
    own = pipe(["a red apple"] * 2, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw).images
    s = api.SampleSettings(steps=4, n=2, seed=0, prompts=("a red apple",), guidance_scale=5.0)
    with api.open_denoiser(sdxl, device="cpu") as den:
        ours, _ = api.draw(sdxl, den, s, progress=False)
        other, _ = api.draw(sdxl, den, api.SampleSettings(steps=4, n=2, seed=0, prompts=("a blue car",),
                                                          guidance_scale=5.0), progress=False)
        pipe.unet = DropInUNet(sdxl, den)
        theirs = pipe(["a red apple"] * 2, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw).images
        with pytest.raises(ValueError, match=r"needs added_cond_kwargs with exactly text_embeds and time_ids"):
            pipe.unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 8, 40), added_cond_kwargs={"text_embeds": 1})
    torch.testing.assert_close(theirs, own, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs * 2 - 1, ours, atol=1e-5, rtol=0)  # [0, 1] -> the model range
    assert not torch.allclose(ours, other)  # the prompt reaches the image


@pytest.mark.parametrize("variant", [
    dict(sdxl={"hidden": 32, "projection": 20, "time_dim": 8}, hidden=24, heads=4,
         unet=dict(transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), block_out_channels=(16, 32),
                   norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))),
    dict(sdxl={"hidden": 16, "projection": 16, "time_dim": 2}, hidden=8, seq=6,
         unet=dict(block_out_channels=(8, 16, 16), layers_per_block=2, attention_head_dim=4,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 1, 2), sample_size=16))])
def test_other_sdxl_layouts_forward_as_diffusers(variant, tmp_path):
    """SDXL-layout UNets unlike the fixture (transformer depths per block, head dims, widths, time id embedding
    sizes, three levels): the denoiser's named-input forward equals diffusers' UNet2DConditionModel with
    added_cond_kwargs, bit for bit, and sampling from a prompt runs."""
    from diffusers import UNet2DConditionModel

    from trt_dm.models.builders import write_tiny_sd_pipeline
    path = write_tiny_sd_pipeline(tmp_path / "xl", seed=3, **variant)
    m = api.load(str(path))
    ref = UNet2DConditionModel.from_pretrained(str(path / "unet")).eval()
    feed = m.signature.example(2, seed=1, seq_len=variant.get("seq", 8), height=m.sample_shape[1], timestep=500)
    feed["time_ids"] = m.time_ids(2)
    with torch.no_grad():
        ours = m.unet(**feed).sample
        theirs = ref(feed["sample"], feed["timestep"], feed["encoder_hidden_states"],
                     added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]}).sample
    assert torch.equal(ours, theirs)
    with api.open_denoiser(m, device="cpu") as den:
        img, _ = api.draw(m, den, api.SampleSettings(steps=2, n=1, prompts=("a cat",), guidance_scale=4.0),
                          progress=False)
    f = m.text.vae_scale_factor
    assert img.shape == (1, 3, f * m.sample_shape[1], f * m.sample_shape[2]) and torch.isfinite(img).all()


def test_bare_sdxl_unet_calibrates_from_an_embeddings_file(sdxl, tiny_sdxl_pipeline_dir, tmp_path):
    """A UNet saved without its pipeline: calibration needs --calib-embeddings (the error says so); from a file of
    the pipeline's own embeddings of some prompts (its zero negative, its image size's time ids) the calibration draws
    the same trajectories, so its ranges equal the pipeline's calibrated on those prompts, bit for bit. The cache key
    is the file's content."""
    root = tmp_path / "bare"  # the UNet and its scheduler saved alone, no text encoders, tokenizers or VAE
    for part in ("unet", "scheduler"):
        shutil.copytree(tiny_sdxl_pipeline_dir / part, root / part)
    bare = api.load(str(root))
    assert bare.text is None and bare.added_cond == (12, 6)
    assert bare.time_ids(1).tolist() == [[64, 64, 0, 0, 64, 64]]  # without a VAE: SDXL's 8x
    spec = dict(n=8, steps=4, guidance_scale=5.0)
    with pytest.raises(ValueError, match=r"has no text encoder .* give --calib-embeddings FILE.safetensors with "
                                         r"prompt_embeds \(N, S, D\) and pooled_prompt_embeds \(N, P\)"):
        api.QuantSettings(spec=CalibSpec(**spec)).resolved(bare)
    prompts = ("a red apple", "the cat", "a lighthouse at dusk")
    enc, neg = sdxl.text.encode(list(prompts)), sdxl.text.encode_negative("")
    f = tmp_path / "emb.safetensors"
    ids = sdxl.time_ids(1)  # the pipeline's 16 px images, given in the file
    save_file({"prompt_embeds": enc["encoder_hidden_states"].contiguous(),
               "pooled_prompt_embeds": enc["text_embeds"].contiguous(), "add_time_ids": ids,
               "negative_prompt_embeds": neg["encoder_hidden_states"].contiguous(),
               "negative_pooled_prompt_embeds": neg["text_embeds"].contiguous(),
               "negative_add_time_ids": ids.clone()}, str(f))
    from_file = api.calibrate(bare, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(**spec, embeddings=str(f)),
                                                      cache_root=tmp_path / "cc", batch=4), progress=False)
    from_prompts = api.calibrate(sdxl, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(**spec, prompts=prompts),
                                                         cache_root=tmp_path / "cc", batch=4), progress=False)
    assert from_file.ranges.to_dict() == from_prompts.ranges.to_dict()
    calib = json.loads(json.loads((from_file.stats_dir / "stats.json").read_text())["meta"]["calib"])
    assert len(calib["embeddings"]["sha256"]) == 64 and str(f) not in json.dumps(calib)
    g = tmp_path / "other.safetensors"
    shutil.copy(f, g)
    again = api.calibrate(bare, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(**spec, embeddings=str(g)),
                                                  cache_root=tmp_path / "cc", batch=4), progress=False)
    assert again.stats_reused  # another path, the same content: the same statistics
    no_neg = tmp_path / "no_neg.safetensors"
    save_file({"prompt_embeds": enc["encoder_hidden_states"].contiguous(),
               "pooled_prompt_embeds": enc["text_embeds"].contiguous()}, str(no_neg))
    with pytest.raises(ValueError, match=r"needs negative_prompt_embeds \(1, S, D\) and negative_pooled_prompt_embeds"):
        api.calibrate(bare, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(**spec, embeddings=str(no_neg)),
                                              cache_root=tmp_path / "cc", batch=4), progress=False)


def test_bad_sdxl_input_one_clear_error_each(sdxl, tiny_sdxl_pipeline_dir, tiny_sd_pipeline_dir, tmp_path):
    def broken(name, damage, src=tiny_sdxl_pipeline_dir):
        d = tmp_path / name
        shutil.copytree(src, d)
        damage(d)
        return d

    def edit_unet(**changes):
        def damage(d):
            cfg = json.loads((d / "unet" / "config.json").read_text())
            (d / "unet" / "config.json").write_text(json.dumps({**cfg, **changes}))
        return damage
    other = broken("image_embeds", edit_unet(addition_embed_type="text_image"))
    with pytest.raises(ModelLoadError, match=r"addition_embed_type='text_image' .* supported: None or 'text_time'"):
        api.load(str(other))
    small = broken("small", edit_unet(projection_class_embeddings_input_dim=24))
    with pytest.raises(ModelLoadError, match=r"projection_class_embeddings_input_dim=24 and addition_time_embed_dim=4"):
        api.load(str(small))
    refiner = broken("refiner", lambda d: shutil.rmtree(d / "text_encoder"))
    with pytest.raises(ValueError, match="refiner layout"):  # TextPipelineError
        api.load(str(refiner))
    one_encoder = broken("one_encoder", lambda d: shutil.rmtree(d / "text_encoder_2"))
    with pytest.raises(ModelLoadError, match="needs SDXL's second text encoder"):
        api.load(str(one_encoder))

    from trt_dm.models.builders import write_tiny_sd_pipeline  # the UNet's pooled width (16) is not the encoder's
    wide = write_tiny_sd_pipeline(tmp_path / "wide", sdxl={"hidden": 24, "projection": 12, "time_dim": 4},
                                  unet=dict(projection_class_embeddings_input_dim=40))
    with pytest.raises(ModelLoadError, match="projection_dim 12 is not the UNet's pooled text_embeds width 16"):
        api.load(str(wide))
    def add_second(d):
        for part in ("text_encoder_2", "tokenizer_2"):
            shutil.copytree(tiny_sdxl_pipeline_dir / part, d / part)
    sd_with_2 = broken("sd_with_2", add_second, src=tiny_sd_pipeline_dir)
    with pytest.raises(ModelLoadError, match="text_encoder_2/ comes with a UNet that takes no pooled text embedding"):
        api.load(str(sd_with_2))
    # embeddings files: an SDXL UNet without pooled embeddings; an SD UNet given SDXL's
    f = tmp_path / "nopool.safetensors"
    save_file({"prompt_embeds": torch.zeros(2, 8, 40)}, str(f))
    with pytest.raises(ValueError, match=r"needs pooled_prompt_embeds \(the pooled text embedding, \(N, 12\)\)"):
        api.conditioning(sdxl, api.SampleSettings(n=1, embeddings=str(f)))
    f2 = tmp_path / "badids.safetensors"
    save_file({"prompt_embeds": torch.zeros(2, 8, 40), "pooled_prompt_embeds": torch.zeros(2, 12),
               "add_time_ids": torch.zeros(3, 6)}, str(f2))
    with pytest.raises(ValueError, match=r"add_time_ids has shape \(3, 6\); this UNet takes \(N\|1, 6\) with N = 2"):
        api.conditioning(sdxl, api.SampleSettings(n=1, embeddings=str(f2)))
    sd = api.load(str(tiny_sd_pipeline_dir))
    f3 = tmp_path / "xl.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 8, 16), "pooled_prompt_embeds": torch.zeros(1, 12)}, str(f3))
    with pytest.raises(ValueError, match=r"\['pooled_prompt_embeds'\] are SDXL inputs"):
        api.conditioning(sd, api.SampleSettings(n=1, embeddings=str(f3)))


def test_time_ids_from_the_file_reach_the_unet(sdxl, tmp_path):
    """add_time_ids in an embeddings file replace the image-size default (per prompt or one row for all)."""
    enc = sdxl.text.encode(["a cat", "a dog"])
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 8, 512, 768]])
    f = tmp_path / "ids.safetensors"
    save_file({"prompt_embeds": enc["encoder_hidden_states"].contiguous(),
               "pooled_prompt_embeds": enc["text_embeds"].contiguous(), "add_time_ids": ids}, str(f))
    cond, _ = api.conditioning(sdxl, api.SampleSettings(n=4, embeddings=str(f)))
    assert torch.equal(cond["time_ids"], ids[[0, 1, 0, 1]])
    assert torch.equal(cond["text_embeds"], enc["text_embeds"][[0, 1, 0, 1]])


def test_served_sdxl_images_equal_sampled_ones(sdxl):
    """`trt-dm serve` on the SDXL pipeline: the served image equals `trt-dm sample`'s for the same seed and prompt."""
    from support import served_equals_sampled
    info = served_equals_sampled(sdxl)["models"]["text_pipeline"]
    assert info["text_encoder_2"].endswith("text_encoder_2") and info["force_zeros_for_empty_prompt"]


def test_release_frees_encoders_after_calibration_and_weights_before_the_builds(tiny_sdxl_pipeline_dir, tmp_path):
    """``deploy(release=True)`` (what `trt-dm engine` runs): the text encoders and VAE go after the calibration, the
    UNet's weights after the last export (the baseline's included); the builds still make both plans."""
    pytest.importorskip("tensorrt_rtx")
    from trt_dm.targets.trt_builder import BuildOptions
    m = api.load(str(tiny_sdxl_pipeline_dir))
    quant = api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=4, steps=4, guidance_scale=5.0),
                              cache_root=tmp_path / "cc", batch=4)
    made = api.deploy(m, quant, target="tensorrt", out_dir=tmp_path, build=True, baseline=True, precision="fp32",
                      build_options=BuildOptions(min_batch=1, opt_batch=1, max_batch=1, opt_level=0,
                                                 rtx_targets=("SM89",)),
                      flavour="tensorrt_rtx", progress=lambda s: None, show_progress=False, release=True)
    assert made.not_built is None and len(made.sidecars) == 2
    assert all(p.is_meta for p in m.unet.parameters()) and m.text.released and m.text.text_encoder_2 is None
    with pytest.raises(RuntimeError, match="released after calibration"):
        m.text.encode(["a cat"])
    assert made.sidecars[0].text_pipeline["text_encoder_2_sha256"] == m.text.fingerprints["text_encoder_2"]
