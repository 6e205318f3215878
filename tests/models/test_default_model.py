"""The embedded default model: what the model card promises (architecture, size, schedule), and that it
samples Fashion-MNIST-like images rather than noise."""
import torch

from trt_dm.core.schedule import Schedule
from trt_dm.models.loading import load_model
from trt_dm.runtime.base import as_denoiser
from trt_dm.runtime.torch_runner import TorchRunner
from trt_dm.sampling import sample


def test_default_model_matches_its_card(default_model_dir):
    loaded = load_model("default")
    unet = loaded.unet
    assert loaded.kind == "UNet2DModel" and loaded.scheduler_source == "dir"
    assert sum(p.numel() for p in unet.parameters()) >= 1_000_000
    assert unet.config.sample_size == 32 and unet.config.in_channels == 1
    assert any("Attn" in t for t in unet.config.down_block_types)
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    weights = default_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 20 * 2**20


def test_default_model_samples_look_like_data_not_noise(default_model_dir):
    loaded = load_model("default")
    with TorchRunner(loaded.unet, device="cpu") as r:
        x = sample(as_denoiser(r), Schedule.from_config(loaded.scheduler_config), range(8), (1, 32, 32),
                   sampler="ddim", steps=20, disable=True)
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0 + 1e-5
    # Fashion-MNIST: the 2-pixel padding border is background (-1); noise would average ~0 there
    border = torch.cat([x[..., :2, :].flatten(1), x[..., -2:, :].flatten(1)], dim=1)
    assert border.mean() < -0.9
    # and the images are not all background: objects cover a real share of the centre
    assert (x[..., 8:24, 8:24] > 0).float().mean() > 0.2


def test_class_conditional_default_model_draws_the_requested_classes():
    """`--model default-cond` (tools/train_default.py --classes 10): its card's null label and guidance interval, and
    guided samples that the project's classifier recognises as the requested classes."""
    import pytest

    from trt_dm import api
    from trt_dm.eval.classify import class_accuracy
    from trt_dm.models.loading import DEFAULT_MODEL_DIR
    if not (DEFAULT_MODEL_DIR.parent / "default-cond" / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        pytest.skip("models/default-cond is not trained yet (tools/train_default.py --classes 10)")
    loaded = api.load("default-cond")
    assert loaded.null_class_label == 10 and loaded.num_classes == 10 and loaded.unet.config.num_class_embeds == 11
    assert loaded.guidance_interval == (0, 300)
    # guidance 3 at t <= 300 (the model's default): N=1000, DDIM 50: class accuracy 89.8 %, 85.5 % unguided
    settings = api.SampleSettings(steps=20, n=20, labels="all", guidance_scale=3.0)
    with api.open_denoiser(loaded, device="cpu") as den:
        images, _ = api.draw(loaded, den, settings, progress=False)
    labels = loaded.conditioning_for(20, "all")["class_labels"]
    assert class_accuracy(images, labels) >= 0.75  # 2 images of each class; real test images score 0.91


def test_transformer_default_model_matches_its_card_and_draws_the_requested_classes():
    """`--model default-dit` (tools/train_default.py --arch dit): a DiT of >= 2 M parameters in <= 20 MB of
    safetensors, its card's null label and guidance interval, and samples the project's classifier recognises."""
    from trt_dm import api
    from trt_dm.eval.classify import class_accuracy
    from trt_dm.models.loading import DEFAULT_MODEL_DIR
    loaded = api.load("default-dit")
    assert loaded.kind == "DiTTransformer2DModel" and loaded.scheduler_source == "dir"
    assert sum(p.numel() for p in loaded.unet.parameters()) >= 2_000_000
    assert (DEFAULT_MODEL_DIR.parent / "default-dit" / "transformer" / "diffusion_pytorch_model.safetensors"
            ).stat().st_size <= 20 * 2**20
    assert loaded.null_class_label == 10 and loaded.num_classes == 10 and loaded.guidance_interval == (0, 300)
    # N=1000, DDIM 50, unguided: class accuracy 82.3 % (the card's guidance curve)
    settings = api.SampleSettings(steps=20, n=20, labels="all")
    with api.open_denoiser(loaded, device="cpu") as den:
        images, _ = api.draw(loaded, den, settings, progress=False)
    assert class_accuracy(images, loaded.conditioning_for(20, "all")["class_labels"]) >= 0.6
