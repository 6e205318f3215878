"""DiT (diffusers' DiTTransformer2DModel) as a denoiser: loading from a DiTPipeline-layout directory, its signature
and class conditioning, the learned-variance half dropped, clear refusals of what is not supported."""
import json

import pytest
import torch

from trt_dm.models import builders
from trt_dm.models.loading import ModelLoadError, load_model


def test_a_dit_pipeline_loads_with_its_signature_and_null_label(tiny_dit_pipeline_dir):
    loaded = load_model(tiny_dit_pipeline_dir)
    assert loaded.kind == "DiTTransformer2DModel" and loaded.scheduler_source == "dir"
    sig = loaded.signature
    assert [s.name for s in sig.inputs] == ["sample", "timestep", "class_labels"]
    assert sig["class_labels"].num_values == 11 and list(sig.conditioning) == ["class_labels"]
    assert (loaded.null_class_label, loaded.num_classes, loaded.sample_shape) == (10, 10, (1, 8, 8))
    # the noise prediction: the first in_channels of DiT's output (the learned variance half dropped), bit for bit
    ref = builders.tiny_dit(0)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 50, 99]), torch.tensor([1, 10, 4])
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample[:, :1]
        got = loaded.unet(x, t, class_labels=y).sample
    assert got.shape == (3, 1, 8, 8) and torch.equal(got, want)
    # guidance: the null label comes from the model's own class embedding, no trt_dm.json needed
    assert loaded.guidance(3.0).null["class_labels"].tolist() == [10]
    assert loaded.conditioning_for(4, "all")["class_labels"].tolist() == [0, 1, 2, 3]


def test_a_loaded_dit_saves_as_diffusers_dit_and_loads_again(tiny_dit_pipeline_dir, tmp_path):
    """save_pretrained of the loaded denoiser (a subclass) writes diffusers' class name, not the subclass's: the
    directory loads in diffusers and here, with the same noise prediction."""
    from diffusers import DiTTransformer2DModel
    loaded = load_model(tiny_dit_pipeline_dir)
    loaded.unet.save_pretrained(tmp_path / "saved", safe_serialization=True)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"
    assert loaded.unet.config["_class_name"] == "DiTTransformer2DModel"
    assert type(DiTTransformer2DModel.from_pretrained(tmp_path / "saved")) is DiTTransformer2DModel
    again = load_model(tmp_path / "saved")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 70]), torch.tensor([2, 10])
    with torch.no_grad():
        assert torch.equal(again.unet(x, t, class_labels=y).sample, loaded.unet(x, t, class_labels=y).sample)


def test_dit_without_classes_or_with_another_norm_is_refused(tmp_path):
    for overrides, says in ((dict(norm_type="ada_norm_single", num_embeds_ada_norm=None), "supported: the class-"),
                            (dict(out_channels=3), "out_channels=3 for in_channels=1")):
        path = tmp_path / next(iter(overrides))
        builders.tiny_dit(0).save_pretrained(path, safe_serialization=True)
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **overrides}))
        with pytest.raises(ModelLoadError, match=says):
            load_model(path)


def test_dit_block_sensitivity_ranks_its_transformer_blocks(tiny_dit_pipeline_dir, tmp_path):
    """`calibrate --sensitivity blocks` on a DiT: one row per transformer block (and the final modulation layer,
    its --keep-fp pattern the layer name itself), under guidance."""
    from trt_dm import api
    from trt_dm.quant.calib.timesteps import parse
    from trt_dm.quant.calib.trajectories import CalibSpec
    loaded = load_model(tiny_dit_pipeline_dir)
    spec = CalibSpec(parse("uniform"), n=8, steps=4, labels="all", guidance_scale=2.0)
    rep = api.sensitivity(loaded, api.QuantSettings(recipe="max@groups=2", spec=spec, cache_root=tmp_path, batch=4),
                          progress=False)
    rows = {r["block"]: r for r in rep["blocks"]}
    assert set(rows) == {"transformer_blocks.0", "transformer_blocks.1", "proj_out_1"}
    assert rows["transformer_blocks.0"]["layers"] == 7 and rows["transformer_blocks.0"]["pattern"] == "transformer_blocks.0.*"
    assert rows["proj_out_1"]["pattern"] == "proj_out_1" and rep["guidance_scale"] == 2.0
    assert rep["together"][-1]["rel_mse"] == 0.0  # everything quantized kept in FP: no error left


def test_a_latent_dit_pipeline_decodes_with_its_vae(tmp_path):
    """A DiTPipeline with vae/: the DiT denoises 4-channel latents, `trt-dm sample` decodes them to RGB images with
    the pipeline's VAE (its weights in the data key: another VAE draws other images); a VAE whose latent channels
    are not the DiT's is refused at load."""
    from trt_dm import api
    path = builders.write_tiny_dit_pipeline(tmp_path / "latent", latent=True)
    loaded = load_model(path)
    assert loaded.sample_shape == (4, 8, 8) and loaded.vae is not None and loaded.text is None
    with api.open_denoiser(loaded, device="cpu") as den:
        images, _ = api.draw(loaded, den, api.SampleSettings(steps=3, n=2, labels=(1, 2), guidance_scale=2.0),
                             progress=False)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    pixel = builders.write_tiny_dit_pipeline(tmp_path / "pixel")
    assert load_model(pixel).data_key() != loaded.data_key()
    from diffusers import AutoencoderKL
    cfg = {k: v for k, v in json.loads((path / "vae" / "config.json").read_text()).items() if not k.startswith("_")}
    AutoencoderKL(**{**cfg, "latent_channels": 3}).save_pretrained(path / "vae", safe_serialization=True)
    with pytest.raises(ModelLoadError, match="the VAE's 3 latent channels are not the denoiser's 4 input channels"):
        load_model(path)


def test_a_deployed_dit_drops_into_diffusers_dit_pipeline(tmp_path):
    """diffusers' own DiTPipeline with the drop-in (a learned-variance latent DiT, DDIM) draws what it draws with the
    DiT itself; the drop-in's graph predicts the noise only, the variance half the pipeline splits off comes as
    zeros. (DiTPipeline's guidance takes label 1000 as the null label, ImageNet DiTs' only: unguided here.)"""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from trt_dm import api
    from trt_dm.models.dropin import DropInUNet
    path = builders.write_tiny_dit_pipeline(tmp_path / "latent", latent=True)
    loaded = load_model(path)
    assert loaded.config["out_channels"] == 2 * loaded.config["in_channels"]
    from diffusers import DiTTransformer2DModel
    vae = AutoencoderKL.from_pretrained(path / "vae")
    sched = DDIMScheduler.from_pretrained(path / "scheduler")
    original = DiTPipeline(transformer=DiTTransformer2DModel.from_pretrained(path / "transformer"), vae=vae,
                           scheduler=sched)
    want = original([1, 7], guidance_scale=1.0, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    with api.open_denoiser(loaded, device="cpu") as den:
        pipe = DiTPipeline(transformer=DropInUNet(loaded, den), vae=vae, scheduler=sched)
        got = pipe([1, 7], guidance_scale=1.0, num_inference_steps=4, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert abs(got - want).max() < 1e-5
