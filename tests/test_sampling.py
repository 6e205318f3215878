"""Samplers vs diffusers' DDPMScheduler / DDIMScheduler, step by step, on a tiny random UNet."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from trt_dm.core.schedule import Schedule, make_generators
from trt_dm.models.builders import tiny_unet2d
from trt_dm.runtime.base import as_denoiser
from trt_dm.runtime.torch_runner import TorchRunner
from trt_dm.sampling import sample, sample_ddim, sample_ddpm, sample_many

SEEDS = [3, 14, 15]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_unet2d(seed=0).eval()


def _shape(unet):
    return (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)


def _reference_steps(unet, scheduler, steps, ours, eta=None):
    """diffusers' scheduler.step applied to OUR x_t at every step (one step each, no accumulation of
    rounding differences); its noise comes from its own per-image generators, seeded like ours."""
    scheduler.set_timesteps(steps)
    gens = make_generators(SEEDS)
    x_T = randn_tensor((len(SEEDS), *_shape(unet)), generator=gens, dtype=torch.float32)
    nxt = []
    with torch.no_grad():
        for x, t in zip(ours, scheduler.timesteps):
            kw = {"eta": eta} if eta is not None else {}
            nxt.append(scheduler.step(unet(x, t).sample, t, x, generator=gens, **kw).prev_sample)
    return [int(t) for t in scheduler.timesteps], x_T, nxt


def _ours(unet, schedule, steps, fn, **kw):
    gens = make_generators(SEEDS)
    x = torch.stack([torch.randn(_shape(unet), generator=g) for g in gens])
    seen = []
    with TorchRunner(unet, device="cpu") as r:
        out = fn(as_denoiser(r), x, schedule, schedule.timesteps(steps), generators=gens,
                 callback=lambda d: seen.append(d["x"].clone()), disable=True, **kw)
    return seen + [out]


CONFIGS = [
    dict(),
    dict(timestep_spacing="trailing"),
    dict(timestep_spacing="linspace", clip_sample=False),
    dict(steps_offset=1, beta_schedule="squaredcos_cap_v2"),
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [7, 20])
def test_ddpm_matches_diffusers_step_by_step(unet, cfg, steps):
    ref_sched = DDPMScheduler(**cfg)
    schedule = Schedule.from_config(dict(ref_sched.config))
    ours = _ours(unet, schedule, steps, sample_ddpm)
    ts, x_T, ref_next = _reference_steps(unet, ref_sched, steps, ours)
    assert schedule.timesteps(steps) == ts
    assert len(ours) == steps + 1
    assert torch.equal(ours[0], x_T)
    for i, b in enumerate(ref_next):
        torch.testing.assert_close(ours[i + 1], b, atol=1e-5, rtol=1e-5, msg=f"step {i}")


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers_step_by_step(unet, cfg, eta):
    steps = 10
    ref_sched = DDIMScheduler(**cfg)
    schedule = Schedule.from_config(dict(ref_sched.config))
    ours = _ours(unet, schedule, steps, sample_ddim, eta=eta)
    ts, x_T, ref_next = _reference_steps(unet, ref_sched, steps, ours, eta=eta)
    assert schedule.timesteps(steps) == ts
    assert torch.equal(ours[0], x_T)
    for i, b in enumerate(ref_next):
        torch.testing.assert_close(ours[i + 1], b, atol=1e-5, rtol=1e-5, msg=f"step {i}")


def test_image_depends_on_its_seed_only(unet):
    schedule = Schedule.from_config({})
    with TorchRunner(unet, device="cpu") as r:
        d = as_denoiser(r)
        many = sample(d, schedule, [5, 6, 7], _shape(unet), sampler="ddpm", steps=5, disable=True)
        alone = sample(d, schedule, [6], _shape(unet), sampler="ddpm", steps=5, disable=True)
        batched = sample_many(d, schedule, [5, 6, 7], _shape(unet), batch_size=2, sampler="ddpm", steps=5,
                              progress=False)
    torch.testing.assert_close(many[1:2], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, many, atol=1e-5, rtol=0)
    assert not torch.allclose(many[0], many[1])


def test_callback_keys_and_true_timesteps(unet):
    schedule = Schedule.from_config({})
    seen = []
    with TorchRunner(unet, device="cpu") as r:
        sample(as_denoiser(r), schedule, [0, 1], _shape(unet), sampler="ddim", steps=4,
               callback=seen.append, disable=True)
    assert [d["t"] for d in seen] == [750, 500, 250, 0]
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    assert set(seen[0]) >= {"i", "t", "x", "eps", "denoised", "model_output"}


@pytest.mark.parametrize("bad,match", [
    (dict(beta_schedule="cosine"), "beta_schedule 'cosine'.*accepted"),
    (dict(prediction_type="noise"), "prediction_type 'noise'.*accepted"),
    (dict(timestep_spacing="even"), "timestep_spacing 'even'.*accepted"),
    (dict(thresholding=True), "thresholding"),
])
def test_schedule_rejects_unsupported_config(bad, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_config(bad)


def test_bad_arguments(unet):
    schedule = Schedule.from_config({})
    with pytest.raises(ValueError, match=r"^num_steps 0 is not a step count; accepted: 1\.\.1000$"):
        schedule.timesteps(0)
    with pytest.raises(ValueError, match=r"^num_steps 1001 is more than the 1000 timesteps the model was trained"):
        schedule.timesteps(1001)
    with pytest.raises(ValueError, match=r"^--steps 2000 is more than the 1000 timesteps 'm' was trained with; "
                                         r"accepted: 1\.\.1000$"):
        schedule.check_steps(2000, "--steps", "m")
    schedule.check_steps(1000, "--steps", "m")
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*accepted"):
        sample(lambda x, t: x, schedule, [0], (1, 4, 4), sampler="heun")
    with pytest.raises(ValueError, match="sampler .euler. is the flow-matching step; .* accepted ddim, ddpm"):
        sample(lambda x, t: x, schedule, [0], (1, 4, 4), sampler="euler")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample(lambda x, t: x, schedule, [0], (1, 4, 4), eta=-1.0)
