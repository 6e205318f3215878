"""The noise schedule and the per-image sampler steps: the arithmetic every sampling loop and server drives.

A step is stateless and works per image: the rows of one batch may be at different timesteps (a server
batches images of different requests), and the noise an ancestral step adds is passed in, drawn by the
caller from each image's own generator (as diffusers' ``variance_noise``), so an image depends on its seed
only, never on the batch it shares. The arithmetic follows diffusers' ``DDPMScheduler`` / ``DDIMScheduler``
(timestep spacing "leading"/"trailing"/"linspace", ``steps_offset``, ``clip_sample``, ``set_alpha_to_one``)
and is tested step by step against them. Coefficients are computed per row in float64 and cast to the
sample's dtype once, which is what a Python-float coefficient times a float32 tensor did when the loops
stepped one timestep at a time: results are bit-identical to that.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from trt_dm.core.errors import InputError
from trt_dm.core.flow import FLOW_SCHEDULER, FlowSchedule, flow_step  # noqa: F401 (re-exported)

SAMPLERS = ("ddim", "ddpm", "euler")  # euler: the flow-matching step (``trt_dm.core.flow``), = ddim on a flow
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row values (B,) (or one value) shaped to broadcast over x (B, ...), in x's dtype and device."""
    v = v.to(x.device, x.dtype)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v


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
    samplers = ("ddim", "ddpm")
    time_dtype = torch.int64

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: dict) -> "Schedule | FlowSchedule":
        """Build from a diffusers scheduler config dict (DDPMScheduler/DDIMScheduler keys); a
        ``FlowMatchEulerDiscreteScheduler`` config gives a ``FlowSchedule`` (same interface, float timesteps)."""
        cfg = dict(config)
        if cfg.get("_class_name") == FLOW_SCHEDULER:
            return FlowSchedule.from_config(cfg)
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
        variance = cfg.get("variance_type") or "fixed_small"  # None (DPM-Solver's configs): diffusers' DDPM = small
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unsupported variance_type {variance!r}; accepted: ('fixed_small', 'fixed_large')")
        return cls(alphas_cumprod=torch.cumprod(1.0 - betas, dim=0), prediction_type=pred,
                   clip_sample=bool(cfg.get("clip_sample", True)),
                   clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
                   timestep_spacing=spacing, steps_offset=int(cfg.get("steps_offset", 0)),
                   set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)), variance_type=variance,
                   config=cfg)

    def check_steps(self, num_steps: int, what: str = "num_steps", model: str | None = None) -> None:
        """``InputError`` (a ValueError) unless ``1 <= num_steps <=`` the training timesteps; ``what`` names the
        setting (a CLI flag; its field is the flag's name, "--calib-steps" -> calib_steps) and ``model`` the model."""
        T = self.num_train_timesteps
        name = what.lstrip("-").replace("-", "_")  # "--calib-steps" -> the setting calib_steps
        flag = what if what.startswith("--") else None
        if num_steps < 1:
            why = f"{num_steps} is not a step count; accepted: 1..{T}"
            raise InputError(f"{what} {why}", field=name, flag=flag, request_message=f'"{name}" {why}')
        if num_steps > T:
            whose = f" {model!r}" if model else " the model"
            why = f"{num_steps} is more than the {T} timesteps{whose} was trained with; accepted: 1..{T}"
            raise InputError(f"{what} {why}", field=name, flag=flag, request_message=f'"{name}" {why}')

    def timesteps(self, num_steps: int) -> list[int]:
        """The training timesteps visited by an ``num_steps``-step sampler, first (noisiest) to last."""
        self.check_steps(num_steps)
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
        return [int(t) for t in ts]

    def check_sampler(self, sampler: str, eta: float = 0.0) -> None:
        """ValueError unless ``sampler`` steps this (DDPM-family) schedule: ddim or ddpm."""
        sampler_rule(sampler)
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} is the flow-matching step; this model's schedule is DDPM-family: "
                             f"accepted {', '.join(self.samplers)}")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t at integer timesteps t (B,): sqrt(alpha-bar) x0 + sqrt(1 - alpha-bar) noise."""
        a = _rows(self.alphas_cumprod[torch.as_tensor(t).cpu()], x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def probe_timesteps(self, batch: int) -> torch.Tensor:
        """``batch`` timesteps spread from T - 1 to 0 (int64)."""
        return torch.linspace(self.num_train_timesteps - 1, 0, batch).round().long()

    def fingerprint(self) -> str:
        """sha256 of everything that makes two schedules sample differently (alpha-bar bytes and the options
        the steps read); diffusers' bookkeeping keys (class name, version) do not enter it."""
        h = hashlib.sha256(self.alphas_cumprod.contiguous().view(torch.uint8).numpy().tobytes())
        h.update(json.dumps([self.prediction_type, self.clip_sample, self.clip_sample_range, self.timestep_spacing,
                             self.steps_offset, self.set_alpha_to_one, self.variance_type]).encode())
        return h.hexdigest()

    def prev_timesteps(self, sampler: str, timesteps: Sequence[int]) -> list[int]:
        """The timestep each listed one steps to (-1: the end, x0), by the sampler's rule (``SamplerRule``)."""
        self.check_sampler(sampler)
        return sampler_rule(sampler).prev_timesteps(self, [int(t) for t in timesteps])

    def alpha_bar(self, t: torch.Tensor, final: float = 1.0) -> torch.Tensor:
        """alpha-bar per row of ``t`` (B,) in float64, ``final`` where t < 0 (the step past t = 0)."""
        t = torch.as_tensor(t).reshape(-1).cpu()
        a = self.alphas_cumprod[t.clamp(min=0)].to(torch.float64)
        return torch.where(t >= 0, a, torch.full_like(a, float(final)))

    def split_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output at timesteps t (one per row, or one int) -> (x0 prediction, epsilon prediction),
        before any clipping."""
        a = _rows(self.alphas_cumprod[torch.as_tensor(t).cpu()], x)
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


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x at the previous timestep (or x0 after the last step)
    denoised: torch.Tensor     # the x0 prediction, before clipping
    eps: torch.Tensor          # the epsilon prediction


def _clip(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    r = schedule.clip_sample_range
    return x0.clamp(-r, r) if schedule.clip_sample else x0


def _check_rows(x: torch.Tensor, *ts: torch.Tensor) -> None:
    for t in ts:
        if t.dim() != 1 or t.shape[0] != x.shape[0] or t.is_floating_point():
            raise ValueError(f"timesteps must be an integer tensor (B,) with B = {x.shape[0]} rows of x, got "
                             f"{t.dtype} {tuple(t.shape)}")


def ddpm_step(schedule: Schedule, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              prev_t: torch.Tensor, noise: torch.Tensor | None = None) -> StepOutput:
    """One ancestral DDPM step per row, x_t -> x_{prev_t} (Ho et al. 2020, Algorithm 2; posterior eqs. 6-7).

    ``t``, ``prev_t``: (B,) int64; prev_t = -1 after the last step. prev_t need not be t - 1 (skipped steps:
    alpha_t = alpha-bar_t / alpha-bar_prev, as diffusers' DDPMScheduler). ``noise`` (B, ...) is z for the rows
    with t > 0 (rows with t = 0 add none; their noise rows are ignored); required when any t > 0.
    """
    t, prev_t = torch.as_tensor(t).cpu(), torch.as_tensor(prev_t).cpu()
    _check_rows(x, t, prev_t)
    x0, eps = schedule.split_output(model_output, x, t)
    clipped = _clip(x0, schedule)
    # 1-3. alpha-bar_t, alpha-bar_{t_prev}, and the one-step alpha_t / beta_t between them (float64, per row)
    a_t = schedule.alpha_bar(t)
    a_prev = schedule.alpha_bar(prev_t, final=1.0)
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    # 4. posterior mean mu-tilde_t(x_t, x0) (Ho et al. eq. 7)
    mean = _rows(a_prev ** 0.5 * beta_t / (1 - a_t), x) * clipped + _rows(alpha_t ** 0.5 * (1 - a_prev) / (1 - a_t), x) * x
    # 5. add sigma_t z, sigma_t^2 = beta-tilde_t (fixed_small) or beta_t (fixed_large); no noise at t = 0
    noisy = t > 0
    if bool(noisy.any()):
        if noise is None or noise.shape != x.shape:
            raise ValueError(f"ddpm_step needs noise of shape {tuple(x.shape)} for rows with t > 0, got "
                             f"{None if noise is None else tuple(noise.shape)}")
        var = (1 - a_prev) / (1 - a_t) * beta_t if schedule.variance_type == "fixed_small" else beta_t
        var = var.clamp(min=1e-20)
        added = mean + _rows(var ** 0.5, x) * noise.to(x.device, x.dtype)
        mean = added if bool(noisy.all()) else torch.where(_rows(noisy, x).bool(), added, mean)
    return StepOutput(mean, x0, eps)


def ddim_step(schedule: Schedule, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              prev_t: torch.Tensor, *, eta: float = 0.0, noise: torch.Tensor | None = None) -> StepOutput:
    """One DDIM step per row, x_t -> x_{prev_t} (Song et al. 2021, eq. 12; sigma_t(eta) from eq. 16).

    ``prev_t`` = -1 steps to x0 with alpha-bar 1 (``set_alpha_to_one``) or alpha-bar_0. eta = 0 is
    deterministic; eta > 0 needs ``noise`` (B, ...).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    t, prev_t = torch.as_tensor(t).cpu(), torch.as_tensor(prev_t).cpu()
    _check_rows(x, t, prev_t)
    x0, eps = schedule.split_output(model_output, x, t)
    clipped = _clip(x0, schedule)
    final = 1.0 if schedule.set_alpha_to_one else schedule.alphas_cumprod[0].item()
    a_t = schedule.alpha_bar(t)
    a_prev = schedule.alpha_bar(prev_t, final=final)
    # sigma_t(eta)^2 = eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)   (eq. 16)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    # x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z   (eq. 12)
    prev = _rows(a_prev ** 0.5, x) * clipped + _rows((1 - a_prev - sigma ** 2) ** 0.5, x) * eps
    if eta > 0:
        if noise is None or noise.shape != x.shape:
            raise ValueError(f"ddim_step with eta > 0 needs noise of shape {tuple(x.shape)}")
        prev = prev + _rows(sigma, x) * noise.to(x.device, x.dtype)
    return StepOutput(prev, x0, eps)


# ---- the samplers' rules, in one place -------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerRule:
    """What a sampler is, per step: where each listed timestep steps to, whether the step at t draws noise, and
    the step itself. The offline loops (``trt_dm.sampling``), calibration trajectories and the serving scheduler
    all step through these."""
    name: str
    # the timestep each listed one steps to (-1: x0)
    prev_timesteps: Callable[[Schedule, list[int]], list[int]]
    # (t, eta) -> does the step at t add noise (drawn from the image's generator)
    draws_noise: Callable[[int, float], bool]
    # (schedule, model_output, x, t, prev_t, noise, eta) -> StepOutput
    step: Callable[..., StepOutput]

    def run(self, schedule, model_output, x, t, prev_t, noise, eta) -> StepOutput:
        """The step on ``schedule``: on a ``FlowSchedule`` every accepted sampler is its Euler step (``flow_step``)."""
        if isinstance(schedule, FlowSchedule):
            return StepOutput(*flow_step(schedule, model_output, x, t, prev_t))
        return self.step(schedule, model_output, x, t, prev_t, noise, eta)


def _ddim_prev(schedule: Schedule, ts: list[int]) -> list[int]:
    # as diffusers' DDIMScheduler: t - T // num_steps, not always the next listed timestep
    stride = schedule.num_train_timesteps // len(ts)
    return [max(t - stride, -1) for t in ts]


SAMPLER_RULES: dict[str, SamplerRule] = {
    "ddim": SamplerRule("ddim", _ddim_prev, lambda t, eta: eta > 0,
                        lambda sch, out, x, t, prev, noise, eta: ddim_step(sch, out, x, t, prev, eta=eta, noise=noise)),
    # DDPM steps to the next listed timestep and adds noise at every t > 0
    "ddpm": SamplerRule("ddpm", lambda schedule, ts: ts[1:] + [-1], lambda t, eta: t > 0,
                        lambda sch, out, x, t, prev, noise, eta: ddpm_step(sch, out, x, t, prev, noise)),
    # the flow-matching Euler step (FlowSchedule only; its prev_timesteps are the schedule's own)
    "euler": SamplerRule("euler", lambda schedule, ts: ts[1:] + [0.0], lambda t, eta: False,
                         lambda sch, out, x, t, prev, noise, eta: StepOutput(*flow_step(sch, out, x, t, prev))),
}
assert tuple(SAMPLER_RULES) == SAMPLERS


def sampler_rule(name: str) -> SamplerRule:
    """The rule of sampler ``name``; ValueError naming the accepted samplers for another name."""
    if name not in SAMPLER_RULES:
        raise ValueError(f"unknown sampler {name!r}; accepted: {SAMPLERS}")
    return SAMPLER_RULES[name]
