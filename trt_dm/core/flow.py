"""Rectified-flow sampling (Stable Diffusion 3, Flux): the noise levels of diffusers' ``FlowMatchEulerDiscreteScheduler``
and its Euler step, stateless and per image like ``trt_dm.core.schedule``'s DDPM / DDIM steps.

A flow-matching model predicts the velocity v = noise - x0 of the straight path x_sigma = (1 - sigma) x0 + sigma noise;
the Euler step from sigma to sigma_next is x + (sigma_next - sigma) v. The model takes the time as
``sigma * num_train_timesteps`` (a float). The levels: ``num_steps`` points spaced evenly in time between the
schedule's largest and smallest training sigma, shifted towards the noisy end, by ``shift`` (SD3: s sigma /
(1 + (s - 1) sigma)) or, with ``use_dynamic_shifting`` (Flux), by mu from the image's token count
(exp(mu) / (exp(mu) + (1 / sigma - 1))), then a final 0. As diffusers does, the training sigmas are shifted once at
construction and the sampling levels again (this is what SD3 / Flux pipelines sample with; tested step by step
against diffusers). Options that change the levels otherwise (Karras / exponential / beta sigmas, ``shift_terminal``,
``invert_sigmas``, stochastic sampling) are refused by name.

``FlowSchedule`` has the interface of ``trt_dm.core.schedule.Schedule`` that the loops, calibration and the server
read (``timesteps``, ``prev_timesteps``, ``check_steps``, ``fingerprint``, ``split_output``, ``add_noise``), so a
flow-matching model goes through them unchanged; its timesteps are floats (the model's time input). The step
between two listed levels is DDIM's deterministic step on the flow's path (x_t = (1 - sigma) x0 + sigma noise,
so alpha = 1 - sigma and the noise scale = sigma): with x0 = x - sigma v and noise = x + (1 - sigma) v it is
exactly the Euler step above. So ``--sampler ddim`` and ``--sampler euler`` (diffusers' name) are the same step on a
flow model; DDPM's ancestral step and DDIM's eta > 0 are refused (the pipelines sample deterministically).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLOW_SAMPLERS = ("ddim", "euler")
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal", "invert_sigmas",
                "stochastic_sampling")


@dataclass(frozen=True)
class FlowSchedule:
    """The noise levels of a flow-matching model (a ``FlowMatchEulerDiscreteScheduler`` config, as data)."""
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    mu: float | None = None  # a dynamic-shifting schedule's shift, fixed per image size (``for_tokens``)
    # where the unshifted levels come from: "scheduler" (evenly spaced training sigmas: SD3's pipelines) or
    # "linspace" (1 .. 1/n, what FluxPipeline passes as ``sigmas``)
    levels_from: str = "scheduler"
    config: dict = field(default_factory=dict, compare=False, repr=False)
    prediction_type = "flow"  # the model predicts the velocity noise - x0
    samplers = FLOW_SAMPLERS
    time_dtype = torch.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowSchedule:
        """From a diffusers scheduler config; ValueError naming an option that changes the levels otherwise."""
        bad = [k for k in _UNSUPPORTED if config.get(k)]
        if bad:
            raise ValueError(f"flow-matching scheduler option {bad[0]}={config[bad[0]]!r} is not supported; supported: "
                             f"shift, use_dynamic_shifting (base_shift, max_shift, base/max_image_seq_len, "
                             f"time_shift_type)")
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type {kind!r}: accepted 'exponential' or 'linear'")
        return cls(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   shift=float(config.get("shift", 1.0)),
                   use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
                   base_shift=float(config.get("base_shift") or 0.5), max_shift=float(config.get("max_shift") or 1.15),
                   base_image_seq_len=int(config.get("base_image_seq_len", 256)),
                   max_image_seq_len=int(config.get("max_image_seq_len", 4096)), time_shift_type=kind,
                   config=dict(config))

    def for_tokens(self, image_seq_len: int) -> FlowSchedule:
        """This schedule for images of ``image_seq_len`` tokens: a dynamic-shifting one gets its mu (``mu``)."""
        return replace(self, mu=self.mu_for(image_seq_len)) if self.use_dynamic_shifting else self

    def mu_for(self, image_seq_len: int) -> float:
        """Flux's resolution-dependent shift: linear in the image's token count between (base, max) lengths."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + self.base_shift - m * self.base_image_seq_len

    def _shifted(self, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
        mu = self.mu if mu is None else mu
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("this schedule shifts by resolution (use_dynamic_shifting): give mu "
                                 "(FlowSchedule.mu_for, or for_tokens)")
            if self.time_shift_type == "exponential":
                return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
            return mu / (mu + (1 / sigmas - 1))
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def sigmas(self, num_steps: int, mu: float | None = None) -> torch.Tensor:
        """float32 (num_steps + 1,): the levels the sampler visits, noisiest first, then 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        if self.levels_from == "linspace":  # FluxPipeline: sigmas = linspace(1, 1/n, n), as float32
            levels = self._shifted(np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32), mu)
        else:
            train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
            if not self.use_dynamic_shifting:
                train = self.shift * train / (1 + (self.shift - 1) * train)
            lo, hi = train[-1].item(), train[0].item()
            ts = np.linspace(hi * T, lo * T, num_steps)
            levels = self._shifted(ts / T, mu)
        return torch.cat([torch.from_numpy(np.asarray(levels)).to(torch.float32), torch.zeros(1)])

    def time_inputs(self, num_steps: int, mu: float | None = None) -> torch.Tensor:
        """float32 (num_steps,): the model's time input at each step, sigma x num_train_timesteps."""
        return self.sigmas(num_steps, mu)[:-1] * self.num_train_timesteps

    # ---- the interface of ``schedule.Schedule`` ---------------------------------------------------------------

    def timesteps(self, num_steps: int) -> list[float]:
        """The model's time inputs visited by an ``num_steps``-step sampler, noisiest first (float32 values)."""
        self.check_steps(num_steps)
        return [float(t) for t in self.time_inputs(num_steps)]

    def check_steps(self, num_steps: int, what: str = "num_steps", model: str | None = None) -> None:
        """``ValueError`` unless ``num_steps`` >= 1 (the levels are continuous: any count)."""
        if num_steps < 1:
            raise ValueError(f"{what} {num_steps} is not a step count; accepted: >= 1")

    def prev_timesteps(self, sampler: str, timesteps: Sequence[float]) -> list[float]:
        """The level each listed one steps to: the next listed one, then 0 (the data)."""
        self.check_sampler(sampler)
        return [float(t) for t in timesteps][1:] + [0.0]

    def check_sampler(self, sampler: str, eta: float = 0.0) -> None:
        """ValueError unless ``sampler`` steps a flow (ddim = euler here; see the module docstring), with eta = 0."""
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} does not step a flow-matching model; accepted: "
                             f"{', '.join(FLOW_SAMPLERS)} (the same Euler step)")
        if eta:
            raise ValueError(f"eta {eta:g}: a flow-matching model samples deterministically here; accepted: eta 0")

    def fingerprint(self) -> str:
        """sha256 of what makes two flow schedules sample differently (the levels' options)."""
        keys = [self.num_train_timesteps, self.shift, self.use_dynamic_shifting, self.base_shift, self.max_shift,
                self.base_image_seq_len, self.max_image_seq_len, self.time_shift_type, self.mu]
        if self.levels_from != "scheduler":  # (fingerprints of SD3-style schedules stay as they were)
            keys.append(self.levels_from)
        return hashlib.sha256(json.dumps(["flow", *keys]).encode()).hexdigest()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The level sigma of each time input (B,), float64."""
        return torch.as_tensor(t).reshape(-1).cpu().to(torch.float64) / self.num_train_timesteps

    def split_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor | float):
        """Velocity at time inputs t -> (x0 prediction, noise prediction): x - sigma v, x + (1 - sigma) v."""
        s = _rows(self.sigma(t), x)
        return x - s * out, x + (1 - s) * out

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x at time inputs t (B,): (1 - sigma) x0 + sigma noise."""
        s = _rows(self.sigma(t), x0)
        return (1 - s) * x0 + s * noise

    def probe_timesteps(self, batch: int) -> torch.Tensor:
        """``batch`` time inputs spread from the noisiest level to the cleanest (float32)."""
        return torch.linspace(self.num_train_timesteps * (1 - 1e-3), 1.0, batch, dtype=torch.float32)


def _rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def flow_step(schedule: FlowSchedule, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              prev_t: torch.Tensor):
    """(x at prev_t, x0 prediction, noise prediction) for time inputs t -> prev_t per row (``flow_euler_step``)."""
    x0, eps = schedule.split_output(model_output, x, t)
    prev = flow_euler_step(model_output, x, schedule.sigma(t), schedule.sigma(prev_t))
    return prev, x0, eps


def flow_euler_step(model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                    sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow per row: x + (sigma_next - sigma) v, each row with its own levels ((B,) tensors;
    rows of one batch may be at different steps), computed in float32 and cast to ``model_output``'s dtype."""
    sigma, sigma_next = torch.as_tensor(sigma).reshape(-1), torch.as_tensor(sigma_next).reshape(-1)
    if sigma.shape[0] not in (1, x.shape[0]) or sigma_next.shape != sigma.shape:
        raise ValueError(f"sigma and sigma_next must be one value or one per row of x ({x.shape[0]}), got "
                         f"{tuple(sigma.shape)} and {tuple(sigma_next.shape)}")
    dt = (sigma_next - sigma).to(torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    return (x.to(torch.float32) + dt * model_output.to(torch.float32)).to(model_output.dtype)
