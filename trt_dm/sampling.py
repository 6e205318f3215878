"""Sampling loops over a denoiser callable: DDPM (ancestral) and DDIM, as short drivers over the per-image
steps of ``trt_dm.core.schedule``.

A *denoiser* is any callable ``denoiser(x, t, **extra_args) -> model_output`` where ``x`` is the noisy
batch (B, C, H, W) and ``t`` an int64 tensor (B,) of training timesteps; the output is interpreted by
the schedule's ``prediction_type`` (epsilon, v_prediction or sample). Runners (``trt_dm.runners``) turn
torch, ONNX Runtime and TensorRT UNets into such callables, so the samplers cannot tell them apart.

The loops here step a whole batch through one list of timesteps; the steps themselves work per image, so a
server can batch images at different timesteps. Noise is drawn per image from one ``torch.Generator`` per
image, so an image depends on its seed only, never on the batch it was drawn in.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .core.schedule import (BETA_SCHEDULES, PREDICTION_TYPES, SAMPLERS, SPACINGS, Schedule, StepOutput,  # noqa: F401
                            ddim_step, ddpm_step, make_generators, randn_per_sample)

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """A diffusers UNet module (FP or fake-quant) as a denoiser, computed as the module is (device, dtype)."""

    @torch.no_grad()
    def denoiser(x: torch.Tensor, t: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return unet(x, t, **extra).sample.float()

    return denoiser


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device="cpu", dtype=torch.float32):
    """x_T for each seed, plus the generators (advanced past x_T) that later steps draw from."""
    gens = make_generators(seeds)
    return randn_per_sample(gens, shape, device, dtype), gens


def _loop(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, timesteps: Sequence[int], sampler: str,
          step: Callable[..., StepOutput], draw_noise: Callable[[int], bool], generators, extra_args, callback,
          disable) -> torch.Tensor:
    ts = list(timesteps)
    prev = schedule.prev_timesteps(sampler, ts)
    for i, t in enumerate(tqdm(ts, desc=sampler, disable=disable, leave=False)):
        tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        out = denoiser(x, tt, **(extra_args or {})).to(x.dtype)
        noise = randn_per_sample(generators, x.shape[1:], x.device, x.dtype) if draw_noise(t) else None
        res = step(schedule, out, x, tt.cpu(), torch.full((x.shape[0],), prev[i], dtype=torch.int64), noise)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "model_output": out, "eps": res.eps, "denoised": res.denoised})
        x = res.prev_sample
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, timesteps: Sequence[int], *,
                generators: Sequence[torch.Generator], extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling (``ddpm_step`` at every listed timestep; ``timesteps`` from
    ``schedule.timesteps(n)`` may skip steps). The callback receives {"i", "t", "x" (the input x_t),
    "model_output", "eps", "denoised"}."""
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} generators, batch {x.shape[0]}")
    return _loop(denoiser, x, schedule, timesteps, "ddpm", ddpm_step, lambda t: t > 0, generators, extra_args,
                 callback, disable)


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, timesteps: Sequence[int], *,
                eta: float = 0.0, generators: Sequence[torch.Generator] | None = None,
                extra_args: dict | None = None, callback: Callback | None = None,
                disable: bool | None = None) -> torch.Tensor:
    """DDIM sampling (``ddim_step``; as in diffusers the previous timestep is t - T // num_steps). eta = 0 is
    deterministic; eta > 0 needs generators."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and (generators is None or len(generators) != x.shape[0]):
        raise ValueError("eta > 0 needs one generator per image (generators=make_generators(seeds))")

    def step(schedule, out, x, t, prev_t, noise):
        return ddim_step(schedule, out, x, t, prev_t, eta=eta, noise=noise)

    return _loop(denoiser, x, schedule, timesteps, "ddim", step, lambda t: eta > 0, generators, extra_args,
                 callback, disable)


SAMPLERS = ("ddim", "ddpm")


def sample(denoiser: Denoiser, schedule: Schedule, seeds: Sequence[int], shape: Sequence[int], *,
           sampler: str = "ddim", steps: int = 50, eta: float = 0.0, extra_args: dict | None = None,
           callback: Callback | None = None, disable: bool | None = None, device="cpu",
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw one image per seed with the named sampler; returns x0 in the model's range (B, *shape)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {SAMPLERS}")
    ts = schedule.timesteps(steps)
    x, gens = initial_noise(seeds, shape, device, dtype)
    if sampler == "ddpm":
        return sample_ddpm(denoiser, x, schedule, ts, generators=gens, extra_args=extra_args,
                           callback=callback, disable=disable)
    return sample_ddim(denoiser, x, schedule, ts, eta=eta, generators=gens, extra_args=extra_args,
                       callback=callback, disable=disable)


def sample_many(denoiser: Denoiser, schedule: Schedule, seeds: Sequence[int], shape: Sequence[int], *,
                batch_size: int = 64, progress: bool = True, callback: Callback | None = None,
                conditioning: Mapping[str, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """``sample`` over many seeds in batches, with one progress bar over images; returns CPU float32.

    ``conditioning``: {input name: (N, ...) tensor}, one row per seed, passed to the denoiser batch by batch.
    The callback additionally receives "batch" (the batch index) and "seeds" (that batch's seeds).
    """
    bad = {k: tuple(v.shape) for k, v in (conditioning or {}).items() if v.shape[0] != len(seeds)}
    if bad:
        raise ValueError(f"conditioning rows {bad} do not match the {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    fixed_extra = kwargs.pop("extra_args", None)
    outs = []
    with tqdm(total=len(seeds), desc=f"{kwargs.get('sampler', 'ddim')} {kwargs.get('steps', 50)} steps",
              unit="img", disable=not progress) as bar:
        for b, start in enumerate(range(0, len(seeds), batch_size)):
            chunk = seeds[start:start + batch_size]
            cb = None
            if callback is not None:
                cb = lambda d, b=b, chunk=chunk: callback({**d, "batch": b, "seeds": chunk})  # noqa: E731
            extra = {k: v[start:start + batch_size] for k, v in (conditioning or {}).items()} or fixed_extra
            outs.append(sample(denoiser, schedule, chunk, shape, callback=cb, disable=True, extra_args=extra,
                               **kwargs).float().cpu())
            bar.update(len(chunk))
    return torch.cat(outs) if outs else torch.empty(0, *shape)
