"""Samplers over a denoiser callable: DDPM (ancestral) and DDIM.

A *denoiser* is any callable ``denoiser(x, t, **extra_args) -> model_output`` where ``x`` is the noisy
batch (B, C, H, W) and ``t`` an int64 tensor (B,) of training timesteps; the output is interpreted by
the schedule's ``prediction_type`` (epsilon, v_prediction or sample). Runners (``trt_dm.runners``) turn
torch, ONNX Runtime and TensorRT UNets into such callables, so the samplers cannot tell them apart.

The arithmetic follows diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (timestep spacing
"leading"/"trailing"/"linspace", ``steps_offset``, ``clip_sample``, ``set_alpha_to_one``) and is tested
step by step against them. Noise is drawn per sample from one ``torch.Generator`` per image, so an image
depends on its seed only, never on the batch it was drawn in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class Schedule:
    """The noise schedule of a diffusion model (a diffusers scheduler config, as data)."""

    alphas_cumprod: torch.Tensor  # float32 (T,), alpha-bar_t of DDPM (Ho et al. 2020, eq. 4)
    prediction_type: str = "epsilon"
    clip_sample: bool = True  # clamp the predicted x0 to +-clip_sample_range (diffusers' default: on)
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"  # diffusers' default for DDPM/DDIM
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM: alpha-bar of the step after t=0 is 1 (not alpha-bar_0)
    variance_type: str = "fixed_small"  # DDPM posterior variance beta-tilde_t (Ho et al. eq. 7)
    config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        """Build from a diffusers scheduler config dict (DDPMScheduler/DDIMScheduler keys)."""
        cfg = dict(config)
        T = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
        else:
            kind = cfg.get("beta_schedule", "linear")
            b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
            if kind == "linear":
                betas = torch.linspace(b0, b1, T, dtype=torch.float32)
            elif kind == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
                betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float32) ** 2
            elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
                f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
                betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
                                     dtype=torch.float32)
            else:
                raise ValueError(f"unsupported beta_schedule {kind!r}; accepted: {BETA_SCHEDULES}")
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if cfg.get(key):
                raise ValueError(f"scheduler option {key}=True is not supported by trt_dm's samplers")
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {pred!r}; accepted: {PREDICTION_TYPES}")
        spacing = cfg.get("timestep_spacing", "leading")
        if spacing not in SPACINGS:
            raise ValueError(f"unsupported timestep_spacing {spacing!r}; accepted: {SPACINGS}")
        variance = cfg.get("variance_type", "fixed_small")
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unsupported variance_type {variance!r}; accepted: ('fixed_small', 'fixed_large')")
        return cls(alphas_cumprod=torch.cumprod(1.0 - betas, dim=0), prediction_type=pred,
                   clip_sample=bool(cfg.get("clip_sample", True)),
                   clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
                   timestep_spacing=spacing, steps_offset=int(cfg.get("steps_offset", 0)),
                   set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)), variance_type=variance,
                   config=cfg)

    def timesteps(self, num_steps: int) -> list[int]:
        """The training timesteps visited by an ``num_steps``-step sampler, first (noisiest) to last."""
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
        return [int(t) for t in ts]

    def alpha_bar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t]

    def split_output(self, out: torch.Tensor, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output at timestep t -> (x0 prediction, epsilon prediction), before any clipping."""
        a = self.alphas_cumprod[t].to(x.device, x.dtype)
        b = 1 - a
        if self.prediction_type == "epsilon":
            return (x - b.sqrt() * out) / a.sqrt(), out
        if self.prediction_type == "v_prediction":  # Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1-a) x0
            return a.sqrt() * x - b.sqrt() * out, a.sqrt() * out + b.sqrt() * x
        return out, (x - a.sqrt() * out) / b.sqrt()


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: image i's noise depends on seeds[i] only."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int],
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise of shape (len(generators), *shape), drawn on CPU (identical on every device)."""
    noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=device, dtype=dtype)


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device="cpu", dtype=torch.float32):
    """x_T for each seed, plus the generators (advanced past x_T) that later steps draw from."""
    gens = make_generators(seeds)
    return randn_per_sample(gens, shape, device, dtype), gens


def _call(denoiser: Denoiser, x: torch.Tensor, t: int, extra_args: dict | None) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
    return denoiser(x, tt, **(extra_args or {}))


def _clip(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    r = schedule.clip_sample_range
    return x0.clamp(-r, r) if schedule.clip_sample else x0


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, timesteps: Sequence[int], *,
                generators: Sequence[torch.Generator], extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2; posterior eqs. 6-7), diffusers' arithmetic.

    ``timesteps`` (from ``schedule.timesteps(n)``) may skip steps: each step goes from t to the next
    listed timestep, with alpha_t = alpha-bar_t / alpha-bar_prev as diffusers' DDPMScheduler does.
    The callback receives {"i", "t", "x" (the input x_t), "model_output", "eps", "denoised"}.
    """
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} generators, batch {x.shape[0]}")
    ts = list(timesteps)
    for i, t in enumerate(tqdm(ts, desc="ddpm", disable=disable, leave=False)):
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        out = _call(denoiser, x, t, extra_args)
        out = out.to(x.dtype)
        x0, eps = schedule.split_output(out, x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "model_output": out, "eps": eps, "denoised": x0})
        x0 = _clip(x0, schedule)
        # 1-3. alpha-bar_t, alpha-bar_{t_prev}, and the one-step alpha_t / beta_t between them
        a_t = schedule.alphas_cumprod[t].item()
        a_prev = schedule.alphas_cumprod[prev_t].item() if prev_t >= 0 else 1.0
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        # 4. posterior mean mu-tilde_t(x_t, x0) (Ho et al. eq. 7)
        mean = (a_prev ** 0.5 * beta_t / (1 - a_t)) * x0 + (alpha_t ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        # 5. add sigma_t z, sigma_t^2 = beta-tilde_t (fixed_small) or beta_t (fixed_large); no noise at t=0
        if t > 0:
            var = (1 - a_prev) / (1 - a_t) * beta_t if schedule.variance_type == "fixed_small" else beta_t
            var = max(var, 1e-20)
            mean = mean + var ** 0.5 * randn_per_sample(generators, x.shape[1:], x.device, x.dtype)
        x = mean
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, timesteps: Sequence[int], *,
                eta: float = 0.0, generators: Sequence[torch.Generator] | None = None,
                extra_args: dict | None = None, callback: Callback | None = None,
                disable: bool | None = None) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12; sigma_t(eta) from eq. 16), diffusers' arithmetic.

    As in diffusers' DDIMScheduler, the previous timestep is t - T // num_steps (not necessarily the
    next listed one for "trailing"/"linspace" spacings). eta=0 is deterministic; eta>0 needs generators.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and (generators is None or len(generators) != x.shape[0]):
        raise ValueError("eta > 0 needs one generator per image (generators=make_generators(seeds))")
    ts = list(timesteps)
    stride = schedule.num_train_timesteps // len(ts)
    final = 1.0 if schedule.set_alpha_to_one else schedule.alphas_cumprod[0].item()
    for i, t in enumerate(tqdm(ts, desc="ddim", disable=disable, leave=False)):
        out = _call(denoiser, x, t, extra_args).to(x.dtype)
        x0, eps = schedule.split_output(out, x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "model_output": out, "eps": eps, "denoised": x0})
        x0 = _clip(x0, schedule)
        # alpha-bar_t and alpha-bar_{t-stride}
        prev_t = t - stride
        a_t = schedule.alphas_cumprod[t].item()
        a_prev = schedule.alphas_cumprod[prev_t].item() if prev_t >= 0 else final
        # sigma_t(eta)^2 = eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)   (eq. 16)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        # x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z   (eq. 12)
        x = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if eta > 0:
            x = x + sigma * randn_per_sample(generators, x.shape[1:], x.device, x.dtype)
    return x


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
                **kwargs) -> torch.Tensor:
    """``sample`` over many seeds in batches, with one progress bar over images; returns CPU float32.

    The callback additionally receives "batch" (the batch index) and "seeds" (that batch's seeds).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    outs = []
    with tqdm(total=len(seeds), desc=f"{kwargs.get('sampler', 'ddim')} {kwargs.get('steps', 50)} steps",
              unit="img", disable=not progress) as bar:
        for b, start in enumerate(range(0, len(seeds), batch_size)):
            chunk = seeds[start:start + batch_size]
            cb = None
            if callback is not None:
                cb = lambda d, b=b, chunk=chunk: callback({**d, "batch": b, "seeds": chunk})  # noqa: E731
            outs.append(sample(denoiser, schedule, chunk, shape, callback=cb, disable=True, **kwargs).float().cpu())
            bar.update(len(chunk))
    return torch.cat(outs) if outs else torch.empty(0, *shape)
