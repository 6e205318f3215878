import numpy as np
import torch

from trt_dm.core.schedule import Schedule
from trt_dm.models.builders import tiny_unet2d
from trt_dm.quant.calib.timesteps import TimestepSpec
from trt_dm.quant.calib.trajectories import CalibSpec, collect
from trt_dm.runtime.base import as_denoiser
from trt_dm.runtime.torch_runner import TorchRunner
from trt_dm.sampling import sample


def _setup():
    unet = tiny_unet2d(seed=0).eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return unet, shape, Schedule.from_config({})


def test_kept_x_t_carries_its_true_timestep():
    unet, shape, schedule = _setup()
    spec = CalibSpec(TimestepSpec("ndtc", mu=0.4, sigma=0.4), n=6, steps=10, seed=2)
    with TorchRunner(unet, device="cpu") as r:
        d = as_denoiser(r)
        cs = collect(d, schedule, shape, spec, batch_size=1, progress=False)
        assert set(cs.t.tolist()) <= set(schedule.timesteps(10))
        assert not set(cs.t.tolist()) <= set(range(10))  # labels are timesteps, not loop indices
        # Independent check: re-run each trajectory in full and find x at the labelled timestep.
        assert (np.diff(cs.t.numpy()) <= 0).all()
        for k in range(len(cs.t)):
            seen = {}
            seeds = _seeds(spec)
            sample(d, schedule, [seeds[k]], shape, steps=10,
                   callback=lambda dd: seen.__setitem__(dd["t"], dd["x"][0].clone()), disable=True)
            torch.testing.assert_close(cs.x[k], seen[int(cs.t[k])], atol=0, rtol=0)
            # and it is NOT the x at the loop index's position read as a timestep
            i = schedule.timesteps(10).index(int(cs.t[k]))
            if schedule.timesteps(10)[i] != i and i in seen:
                assert not torch.allclose(cs.x[k], seen[i])


def _seeds(spec):
    from trt_dm.quant.calib.timesteps import draw_timesteps
    sched = Schedule.from_config({})
    draws = draw_timesteps(spec.timesteps, sched.timesteps(spec.steps), spec.n, 1000, seed=spec.seed)
    order = np.argsort(-draws, kind="stable")
    return [spec.seed * 1_000_003 + int(j) for j in order]


def test_collect_is_bit_identical_and_stops_early():
    unet, shape, schedule = _setup()
    spec = CalibSpec(TimestepSpec("single", step=0), n=6, steps=20, seed=0)
    with TorchRunner(unet, device="cpu") as r:
        a = collect(as_denoiser(r), schedule, shape, spec, batch_size=3, progress=False)
        b = collect(as_denoiser(r), schedule, shape, spec, batch_size=3, progress=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
    assert a.unet_calls == 2  # first step only, one call per batch of 3
    all_spec = CalibSpec(TimestepSpec("all"), n=20, steps=20, seed=0)
    with TorchRunner(unet, device="cpu") as r:
        c = collect(as_denoiser(r), schedule, shape, all_spec, batch_size=10, progress=False)
    assert sorted(set(c.t.tolist())) == sorted(schedule.timesteps(20))
