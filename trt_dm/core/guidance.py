"""Conditioning as data, and classifier-free guidance.

Conditioning is a dict of the UNet's conditioning inputs (``class_labels`` (B,), later ``encoder_hidden_states``
(B, S, D)), one row per image, passed by the samplers to the denoiser as extra inputs. Nothing else in the
pipeline special-cases it: runners, graphs and engines see inputs of the signature.

Classifier-free guidance (Ho & Salimans 2021, eq. 6): eps = eps_u + w (eps_c - eps_u). ``cfg_denoiser`` wraps a
denoiser so that the conditional and the unconditional halves go through ONE call of 2B rows, conditional rows
first (how engines and servers batch); w = 1 is one plain call of B. The unconditional inputs come from
``null``: one row per conditioning input (the null class label, the empty prompt's embedding), repeated for
every image. Optional guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
are Flawed", eqs. 15-16): the guided prediction is rescaled toward the conditional one's standard deviation.
Optional guidance interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models"): w applies only at timesteps lo <= t <= hi; elsewhere the conditional
prediction is used as it is, and the unconditional row is not computed at all (fewer UNet rows per image).
Every operation is per row, so image i depends on its own seed, conditioning and timestep only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from trt_dm.core.errors import InputError

Conditioning = Mapping[str, torch.Tensor]  # name -> (B, ...) tensor, one row per image


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings: ``scale`` w (1 = none), ``rescale`` phi in [0, 1], the null
    (unconditional) inputs, one row each, and ``interval`` (lo, hi): the timesteps where w applies (None: all)."""
    scale: float = 1.0
    rescale: float = 0.0
    null: Mapping[str, torch.Tensor] = field(default_factory=dict)
    interval: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_scale(self.scale)
        if self.interval is not None:
            object.__setattr__(self, "interval", check_interval(self.interval))
        if not (math.isfinite(self.rescale) and 0.0 <= self.rescale <= 1.0):
            raise InputError(f"--guidance-rescale must be in [0, 1], got {self.rescale}", field="guidance_rescale",
                             flag="--guidance-rescale",
                             request_message=f'"guidance_rescale" must be in [0, 1], got {self.rescale}')
        if self.scale != 1.0 and not self.null:
            raise ValueError("classifier-free guidance needs the model's unconditional (null) inputs")

    @property
    def active(self) -> bool:
        return self.scale != 1.0

    @property
    def calls_per_image(self) -> int:
        """UNet batch rows per image at most: 2 with guidance (conditional + unconditional), else 1."""
        return 2 if self.active else 1

    def applies(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows at timesteps ``t`` whose prediction is guided (need an unconditional row)."""
        t = torch.as_tensor(t).reshape(-1)
        if not self.active:
            return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        lo, hi = self.interval
        return (t >= lo) & (t <= hi)

    def describe(self) -> str:
        if not self.active:
            return "none"
        s = f"w={self.scale:g}" + (f", rescale {self.rescale:g}" if self.rescale else "")
        return s + (f", at t in [{self.interval[0]}, {self.interval[1]}]" if self.interval is not None else "")


def check_scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 1.0:
        raise InputError(f"--guidance-scale must be a finite number >= 1 (1 = no guidance), got {scale!r}",
                         field="guidance_scale", flag="--guidance-scale",
                         request_message=f'"guidance_scale" must be a finite number >= 1 (1 = no guidance), got '
                                         f'{scale!r}')
    return float(scale)


def check_interval(interval, last: int | None = None) -> tuple[int, int]:
    """(lo, hi) integer timesteps with 0 <= lo <= hi (<= ``last``, the schedule's last timestep, when given)."""
    ok = (isinstance(interval, (tuple, list)) and len(interval) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in interval))
    if ok:
        lo, hi = interval
        ok = 0 <= lo <= hi and (last is None or hi <= last)
    if not ok:
        upper = f" <= {last}" if last is not None else ""
        what = f"two integer timesteps LO HI with 0 <= LO <= HI{upper} (guidance applies at LO <= t <= HI)"
        raise InputError(f"--guidance-interval must be {what}, got {interval!r}", field="guidance_interval",
                         flag="--guidance-interval",
                         request_message=f'"guidance_interval" must be [LO, HI]: {what}, got {interval!r}')
    return int(interval[0]), int(interval[1])


def split(x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: Guidance
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The UNet call of a guided step: every image's conditional row, then the null rows of the images guided at
    their timestep (all of them without an interval: [x; x], [t; t], [cond; null]), and the guided rows' indices."""
    b = x.shape[0]
    t = t.expand(b) if t.dim() == 0 else t
    guided = torch.nonzero(guidance.applies(t)).reshape(-1)
    if guided.numel() == 0:
        return x, t, dict(cond), guided
    if guided.numel() == b:
        xx, tt, cc = pack(x, t, cond, guidance.null)
        return xx, tt, cc, guided
    xx, tt, cc = pack(x[guided], t[guided], {k: v[guided.to(v.device)] for k, v in cond.items()}, guidance.null)
    k = guided.numel()
    return (torch.cat([x, xx[k:]]), torch.cat([t, tt[k:]]),
            {name: torch.cat([cond[name], v[k:]]) for name, v in cc.items()}, guided)


def merge(out: torch.Tensor, guided: torch.Tensor, guidance: Guidance) -> torch.Tensor:
    """The prediction of each image from a ``split`` call's output: guided rows combined with their null rows,
    the others their conditional prediction."""
    b = out.shape[0] - guided.numel()
    if guided.numel() == 0:
        return out
    if guided.numel() == b:
        return combine(out, guidance.scale, guidance.rescale)
    eps = out[:b].clone()
    eps[guided] = combine(torch.cat([out[guided], out[b:]]), guidance.scale, guidance.rescale)
    return eps


def pack(x: torch.Tensor, t: torch.Tensor, cond: Conditioning, null: Mapping[str, torch.Tensor]
         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The 2B-row call of guidance: [x; x], [t; t], [cond; null repeated], conditional rows first."""
    b = x.shape[0]
    missing = sorted(set(cond) ^ set(null))
    if missing:
        raise ValueError(f"guidance: conditional inputs {sorted(cond)} and null inputs {sorted(null)} differ")
    unc = {k: v.to(cond[k].device, cond[k].dtype).expand(b, *v.shape[1:]) for k, v in null.items()}
    return torch.cat([x, x]), torch.cat([t, t]), {k: torch.cat([cond[k], unc[k]]) for k in cond}


def combine(out: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Guided prediction from a packed 2B output (conditional rows first): eps_u + w (eps_c - eps_u), then
    the optional rescale to the conditional prediction's per-image standard deviation."""
    b = out.shape[0] // 2
    c, u = out[:b], out[b:]
    g = u + scale * (c - u)
    if rescale > 0:
        dims = tuple(range(1, out.dim()))
        g = rescale * g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)) + (1 - rescale) * g
    return g


def cfg_denoiser(denoiser: Callable[..., torch.Tensor], guidance: Guidance) -> Callable[..., torch.Tensor]:
    """``denoiser`` with classifier-free guidance: one UNet call of 2B per step (B with scale 1)."""
    if not guidance.active:
        return denoiser

    def guided(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        xx, tt, cc, rows = split(x, t, cond, guidance)
        return merge(denoiser(xx, tt, **cc), rows, guidance)

    guided.guidance = guidance  # type: ignore[attr-defined]
    return guided


def rows(cond: Conditioning | None, index: Sequence[int] | slice | torch.Tensor) -> dict[str, torch.Tensor]:
    """The conditioning of some images (a slice or index list into every tensor)."""
    if not cond:
        return {}
    if isinstance(index, slice):
        return {k: v[index] for k, v in cond.items()}
    idx = torch.as_tensor(index, dtype=torch.int64)
    return {k: v[idx.to(v.device)] for k, v in cond.items()}


def class_labels_for(n: int, labels: Sequence[int]) -> torch.Tensor:
    """``labels`` cycled over ``n`` images (image i gets labels[i % len(labels)])."""
    if not labels:
        raise ValueError("no class labels given")
    return torch.tensor([int(labels[i % len(labels)]) for i in range(n)], dtype=torch.int64)
