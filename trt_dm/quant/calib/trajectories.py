"""Calibration sets from the full-precision model's own sampling trajectories (PTQ4DM sec. 4.1-4.2).

For each calibration sample j a timestep t_j is drawn (``timesteps.draw_timesteps``); a trajectory is
sampled from seeded noise with the FP denoiser and its x_t at t = t_j is kept, labelled with the true
timestep t_j (PTQ4DM's released code labels it with the loop index instead; we do not). Trajectories are
batched in order of their kept timestep and a batch stops as soon as its last x_t is kept, which saves
about half the UNet calls for NDTC.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trt_dm.core.guidance import Guidance, check_interval, split
from trt_dm.core.schedule import Schedule, sampler_rule
from trt_dm.quant.calib.timesteps import TimestepSpec, draw_timesteps
from trt_dm.sampling import DenoiserFn, initial_noise, sample_ddim, sample_ddpm

log = logging.getLogger(__name__)


class _Done(Exception):
    """Raised from the sampler callback once every x_t of the batch is kept."""


@dataclass(frozen=True)
class CalibSpec:
    """What the calibration set is: it (with the model fingerprint) keys the statistics cache."""

    timesteps: TimestepSpec = field(default_factory=TimestepSpec)
    n: int = 256  # calibration samples (PTQ4DM used 1024)
    sampler: str = "ddim"  # the FP sampler whose trajectories are recorded
    steps: int = 100  # its number of steps; calibration timesteps are among its timesteps
    eta: float = 0.0
    seed: int = 0  # seeds both the timestep draws and the trajectories' noise (seed * 1_000_003 + j)
    # Conditional models: the class labels of the trajectories ("all": every class in turn over the samples,
    # balanced; or "3,7": those, cycled) and the classifier-free guidance the FP sampler runs with. None / 1.0
    # for unconditional models (then they are left out of the cache key, which stays as it was).
    labels: str | None = None
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    guidance_interval: tuple[int, int] | None = None  # None: everywhere (after QuantSettings.resolved: model default)
    # Text-conditional models: the prompts of the trajectories (cycled over the samples) and the negative prompt of
    # guidance; the cache key holds their sha256, not the text.
    prompts: tuple[str, ...] | None = None
    negative_prompt: str = ""
    # A text UNet without its encoders: a safetensors file of prompt embeddings (``text.load_embeddings``) instead of
    # prompts; the cache key holds the file's sha256, not its path.
    embeddings: str | None = None

    def __post_init__(self) -> None:
        sampler_rule(self.sampler)  # an unknown sampler is refused, naming the accepted ones
        if self.n < 1 or self.steps < 1:
            raise ValueError(f"calibration size and steps (--calib-n, --calib-steps) must be >= 1, got n={self.n}, "
                             f"steps={self.steps}")
        if isinstance(self.prompts, list):
            object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", check_interval(self.guidance_interval))
        if self.prompts is not None and not self.prompts:
            raise ValueError("calibration prompts: the list is empty")
        if self.embeddings is not None:
            if self.prompts is not None:
                raise ValueError("calibration: give prompts (--calib-prompts) or embeddings (--calib-embeddings), "
                                 "not both")
            if not Path(self.embeddings).is_file():
                raise FileNotFoundError(f"--calib-embeddings {self.embeddings}: no such file")
            object.__setattr__(self, "embeddings", str(self.embeddings))

    @property
    def label_list(self) -> list[int] | str | None:
        """``labels`` as the models' ``conditioning_for`` takes them."""
        if self.labels is None or self.labels == "all":
            return self.labels
        return [int(v) for v in self.labels.split(",")]

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, default in (("labels", None), ("guidance_scale", 1.0), ("guidance_rescale", 0.0),
                             ("guidance_interval", None), ("prompts", None),
                             ("negative_prompt", ""), ("embeddings", None)):
            if d[key] == default:
                del d[key]
        if self.prompts is not None:
            from trt_dm.models.text import prompts_key
            d["prompts"] = {"n": len(self.prompts), "sha256": prompts_key(self.prompts, self.negative_prompt)}
            d.pop("negative_prompt", None)  # in the sha256
        if self.embeddings is not None:
            d["embeddings"] = {"sha256": hashlib.sha256(Path(self.embeddings).read_bytes()).hexdigest()}
        d["timesteps"] = {"kind": self.timesteps.kind, "mu": self.timesteps.mu, "sigma": self.timesteps.sigma,
                          "step": self.timesteps.step, "describe": self.timesteps.describe()}
        return d


@dataclass
class CalibSet:
    x: torch.Tensor  # (n, C, H, W) float32: the kept x_t
    t: torch.Tensor  # (n,) int64: their true timesteps (float32 time inputs for a flow-matching model)
    spec: CalibSpec
    unet_calls: int = 0  # UNet batch calls spent collecting it
    cond: dict = field(default_factory=dict)  # {input: (n, ...)}: each x_t's conditioning (class labels)

    def batches(self, batch_size: int):
        """(x, t, conditioning) batches in a fixed order (grouped by timestep, for per-timestep statistics)."""
        for i in range(0, len(self.t), batch_size):
            yield self.x[i:i + batch_size], self.t[i:i + batch_size], {k: v[i:i + batch_size] for k, v in self.cond.items()}


    def unet_batches(self, batch_size: int, guidance: Guidance | None = None):
        """``batches`` as the sampler's UNet calls see them: with active guidance, each batch's conditional rows
        then the null rows of those guided at their timestep (2 x batch_size rows without a guidance interval)."""
        for x, t, c in self.batches(batch_size):
            yield split(x, t, c, guidance)[:3] if guidance is not None and guidance.active else (x, t, c)


def collect(denoiser: DenoiserFn, schedule: Schedule, shape: Sequence[int], spec: CalibSpec, *,
            batch_size: int = 64, conditioning: dict | None = None, progress: bool = True) -> CalibSet:
    """Run the FP sampler and keep x_t at the drawn timesteps; the result is sorted by t (descending).
    ``conditioning``: {input: (n, ...)}, the conditioning of calibration sample j in row j (the denoiser given
    applies any guidance)."""
    schedule.check_sampler(spec.sampler, spec.eta)  # euler: a flow model's step, which sample_ddim takes there
    sampler_ts = schedule.timesteps(spec.steps)
    draws = draw_timesteps(spec.timesteps, sampler_ts, spec.n, schedule.num_train_timesteps, seed=spec.seed)
    n = len(draws)
    order = np.argsort(-draws, kind="stable")  # largest t first: each batch stops early at its min t
    seeds = [spec.seed * 1_000_003 + int(j) for j in order]
    keep_t = draws[order]
    cond = {k: v[torch.as_tensor(order)] for k, v in (conditioning or {}).items()}
    xs = torch.empty((n, *shape), dtype=torch.float32)
    calls = 0
    bar = tqdm(total=n, desc=f"calibration set ({spec.timesteps.describe()})", unit="x_t", disable=not progress)
    for start in range(0, n, batch_size):
        b_seeds, b_t = seeds[start:start + batch_size], keep_t[start:start + batch_size]
        kept = np.zeros(len(b_seeds), dtype=bool)
        x, gens = initial_noise(b_seeds, shape)

        def cb(d, b_t=b_t, kept=kept, start=start):
            nonlocal calls
            calls += 1
            hit = np.nonzero(b_t == d["t"])[0]
            for i in hit:
                xs[start + i] = d["x"][i].detach().float().cpu()
                kept[i] = True
            if kept.all():
                raise _Done

        extra = {k: v[start:start + batch_size] for k, v in cond.items()} or None
        kwargs = dict(generators=gens, extra_args=extra, callback=cb, disable=True)
        try:
            if spec.sampler == "ddpm":
                sample_ddpm(denoiser, x, schedule, sampler_ts, **kwargs)
            else:
                sample_ddim(denoiser, x, schedule, sampler_ts, eta=spec.eta, **kwargs)
        except _Done:
            pass
        if not kept.all():  # cannot happen: every draw is one of sampler_ts
            raise RuntimeError(f"timesteps {sorted(set(b_t[~kept].tolist()))} were never visited")
        bar.update(len(b_seeds))
    bar.close()
    log.info("calibration set: %d x_t at %d distinct timesteps, %d UNet calls", n, len(set(draws.tolist())), calls)
    return CalibSet(x=xs, t=torch.as_tensor(keep_t, dtype=schedule.time_dtype), spec=spec, unet_calls=calls, cond=cond)
