"""The flow-matching levels and Euler step against diffusers' FlowMatchEulerDiscreteScheduler, step by step."""
import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trt_dm.core.flow import FlowSchedule, flow_euler_step

CONFIGS = [
    dict(num_train_timesteps=1000, shift=3.0),  # Stable Diffusion 3 / 3.5
    dict(num_train_timesteps=1000, shift=1.0),
    dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
         base_image_seq_len=256, max_image_seq_len=4096),  # Flux
    dict(num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type="linear"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_levels_and_steps_equal_diffusers(config, steps):
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = FlowSchedule.from_config(dict(ref.config))
    mu = ours.mu_for(1024) if config.get("use_dynamic_shifting") else None
    ref.set_timesteps(steps, mu=mu)
    torch.testing.assert_close(ours.sigmas(steps, mu), ref.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(ours.time_inputs(steps, mu), ref.timesteps, atol=0, rtol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    mine = x.clone()
    sig = ours.sigmas(steps, mu)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(3, 4, 8, 8, generator=g)
        x = ref.step(v, t, x).prev_sample
        mine = flow_euler_step(v, mine, sig[i].repeat(3), sig[i + 1].repeat(3))
        torch.testing.assert_close(mine, x, atol=0, rtol=0)


def test_rows_at_different_levels_step_as_if_alone():
    s = FlowSchedule(shift=3.0)
    sig = s.sigmas(10)
    x, v = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    both = flow_euler_step(v, x, torch.stack([sig[0], sig[5]]), torch.stack([sig[1], sig[6]]))
    torch.testing.assert_close(both[1:], flow_euler_step(v[1:], x[1:], sig[5:6], sig[6:7]), atol=0, rtol=0)


def test_unsupported_options_and_missing_mu_are_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported"):
        FlowSchedule.from_config({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="give mu"):
        FlowSchedule(use_dynamic_shifting=True).sigmas(4)
    with pytest.raises(ValueError, match="one per row"):
        flow_euler_step(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_pipeline_levels_equal_diffusers(steps):
    """FluxPipeline passes sigmas = linspace(1, 1/n, n) and mu from the token count: levels_from="linspace"."""
    import numpy as np
    config = CONFIGS[2]
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = dataclasses.replace(FlowSchedule.from_config(dict(ref.config)), levels_from="linspace").for_tokens(1024)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=ours.mu)
    torch.testing.assert_close(ours.sigmas(steps), ref.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(ours.time_inputs(steps), ref.timesteps, atol=0, rtol=0)
    assert ours.fingerprint() != dataclasses.replace(ours, levels_from="scheduler").fingerprint()
