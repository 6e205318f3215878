"""Per-image sampler steps: a batch whose rows sit at different timesteps equals the rows stepped alone, and
each row equals diffusers' scheduler step for that row."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from trt_dm.core.schedule import Schedule, ddim_step, ddpm_step

CFG = dict(prediction_type="epsilon", clip_sample=True)


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randn(n, 1, 4, 4, generator=g), torch.randn(n, 1, 4, 4, generator=g)


@pytest.mark.parametrize("cfg", [CFG, dict(prediction_type="v_prediction", clip_sample=False, variance_type="fixed_large")])
def test_ddpm_mixed_timesteps_equal_rows_alone_and_diffusers(cfg):
    sched = Schedule.from_config(cfg)
    x, out, noise = _batch()
    t = torch.tensor([999, 500, 20, 0, 980])
    prev = torch.tensor([979, 480, 0, -1, 960])  # skipped steps of a 50-step sampler; the t = 0 row ends
    batch = ddpm_step(sched, out, x, t, prev, noise)
    for i in range(len(t)):
        alone = ddpm_step(sched, out[i:i + 1], x[i:i + 1], t[i:i + 1], prev[i:i + 1], noise[i:i + 1])
        assert torch.equal(batch.prev_sample[i:i + 1], alone.prev_sample)  # bit for bit
        assert torch.equal(batch.denoised[i:i + 1], alone.denoised)
    # diffusers, one row at a time: its scheduler set to the step that goes t -> prev
    for i in range(len(t)):
        ref = DDPMScheduler(**cfg)
        ref.set_timesteps(timesteps=[int(t[i])] + ([int(prev[i])] if prev[i] >= 0 else []))
        g = torch.Generator().manual_seed(0)
        z = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        r = ref.step(out[i:i + 1], int(t[i]), x[i:i + 1], generator=g).prev_sample
        mine = ddpm_step(sched, out[i:i + 1], x[i:i + 1], t[i:i + 1], prev[i:i + 1], z).prev_sample
        torch.testing.assert_close(mine, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_mixed_timesteps_equal_rows_alone_and_diffusers(eta):
    sched = Schedule.from_config(CFG)
    x, out, noise = _batch(4, seed=1)
    t = torch.tensor([900, 100, 0, 500])
    prev = torch.tensor([800, 0, -1, 400])  # 10 steps: t - T // 10
    batch = ddim_step(sched, out, x, t, prev, eta=eta, noise=noise)
    for i in range(len(t)):
        alone = ddim_step(sched, out[i:i + 1], x[i:i + 1], t[i:i + 1], prev[i:i + 1], eta=eta, noise=noise[i:i + 1])
        assert torch.equal(batch.prev_sample[i:i + 1], alone.prev_sample)
    ref = DDIMScheduler(**CFG)
    ref.set_timesteps(10)  # its previous timestep is t - 100, as ours
    for i in range(len(t)):
        r = ref.step(out[i:i + 1], int(t[i]), x[i:i + 1], eta=eta, variance_noise=noise[i:i + 1]).prev_sample
        torch.testing.assert_close(batch.prev_sample[i:i + 1], r, atol=1e-5, rtol=1e-5)


def test_prev_timesteps_and_errors():
    sched = Schedule.from_config({})
    ts = sched.timesteps(4)
    assert ts == [750, 500, 250, 0]
    assert sched.prev_timesteps("ddpm", ts) == [500, 250, 0, -1]
    assert sched.prev_timesteps("ddim", ts) == [500, 250, 0, -1]
    assert Schedule.from_config({"timestep_spacing": "trailing"}).prev_timesteps("ddim", [999, 666, 332]) == [666, 333, -1]
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="needs noise"):
        ddpm_step(sched, x, x, torch.tensor([5, 0]), torch.tensor([4, -1]))
    with pytest.raises(ValueError, match="integer tensor"):
        ddpm_step(sched, x, x, torch.tensor([5.0, 0.0]), torch.tensor([4, -1]))
    # only rows with t > 0 take noise: a t = 0 row ignores its noise row
    a = ddpm_step(sched, x, x, torch.tensor([5, 0]), torch.tensor([4, -1]), torch.ones(2, 1, 2, 2))
    b = ddpm_step(sched, x, x, torch.tensor([5, 0]), torch.tensor([4, -1]), torch.full((2, 1, 2, 2), 9.0))
    assert torch.equal(a.prev_sample[1], b.prev_sample[1]) and not torch.equal(a.prev_sample[0], b.prev_sample[0])
