"""Timestep samplers: which of a sampler's timesteps the calibration set is drawn at.

- ``ndtc``: PTQ4DM's Normally Distributed Time-step Calibration (Shang et al., CVPR 2023, sec. 4.2):
  t ~ N(mu * T, sigma * T), mu <= 1/2 skews toward the data end (small t). T is the number of
  training timesteps; each draw is clipped to [0, T-1] and snapped to the nearest timestep the sampler
  actually visits (the trajectory has x_t only there). PTQ4DM's code defaults: mu=0.5, sigma=0.35; its
  published script uses mu=0.4, sigma=0.4.
- ``uniform``: Q-Diffusion's evenly spaced steps (Li et al., ICCV 2023): draws spread evenly over the
  sampler's steps.
- ``single``: every draw at one step (PTQ4DM's failing baseline; by default the last, t closest to 0).
- ``all``: every sampler step, equally often.

A draw is returned as the TRUE training timestep t (an int in [0, T)), never as the loop index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

KINDS = ("ndtc", "uniform", "single", "all")


@dataclass(frozen=True)
class TimestepSpec:
    kind: str = "ndtc"
    mu: float = 0.5  # NDTC mean as a fraction of T (PTQ4DM code default; <= 0.5 is toward the data end)
    sigma: float = 0.35  # NDTC std as a fraction of T (PTQ4DM code default)
    step: int = -1  # `single`: index into the sampler's timesteps (-1 = last step, t nearest 0)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown timestep sampler {self.kind!r}; accepted: {KINDS}")
        if self.kind == "ndtc" and not (0.0 <= self.mu <= 1.0 and self.sigma > 0.0):
            raise ValueError(f"ndtc needs 0 <= mu <= 1 and sigma > 0, got mu={self.mu}, sigma={self.sigma}")

    def describe(self) -> str:
        if self.kind == "ndtc":
            return f"ndtc(mu={self.mu},sigma={self.sigma})"
        if self.kind == "single":
            return f"single(step={self.step})"
        return self.kind


def draw_timesteps(spec: TimestepSpec, sampler_timesteps: Sequence[int], n: int, num_train_timesteps: int,
                   seed: int = 0) -> np.ndarray:
    """``n`` timesteps (true training timesteps, each one of ``sampler_timesteps``): int64, or float64 for a flow
    model's float time inputs (sigma x T: NDTC's normal is drawn on that same axis, sigma = t / T)."""
    floats = any(isinstance(t, float) for t in sampler_timesteps)
    dtype = np.float64 if floats else np.int64
    ts = np.asarray(sampler_timesteps, dtype=dtype)
    if n < 1:
        raise ValueError(f"calibration size must be >= 1, got {n}")
    if ts.size == 0:
        raise ValueError("the sampler visits no timesteps")
    if spec.kind == "ndtc":
        rng = np.random.default_rng(seed)
        T = num_train_timesteps
        raw = np.clip(rng.normal(spec.mu * T, spec.sigma * T, size=n), 0, T - 1)
        # nearest visited timestep (ties -> the smaller t, toward the data end)
        order = np.argsort(ts)
        sorted_ts = ts[order]
        pos = np.clip(np.searchsorted(sorted_ts, raw), 1, len(sorted_ts) - 1) if len(ts) > 1 else np.zeros(n, int)
        if len(ts) == 1:
            return np.full(n, ts[0], dtype=dtype)
        lo, hi = sorted_ts[pos - 1], sorted_ts[pos]
        return np.where(raw - lo <= hi - raw, lo, hi).astype(dtype)
    if spec.kind == "uniform":
        # n draws spread evenly over the steps: step index floor(i * S / n)
        idx = (np.arange(n) * len(ts)) // n
        return ts[idx]
    if spec.kind == "single":
        if not -len(ts) <= spec.step < len(ts):
            raise ValueError(f"single step index {spec.step} out of range for {len(ts)} sampler steps")
        return np.full(n, ts[spec.step], dtype=dtype)
    # all: every step equally often (n rounded up to a multiple of the number of steps)
    reps = -(-n // len(ts))
    return np.tile(ts, reps)


def parse(text: str) -> TimestepSpec:
    """'ndtc', 'ndtc:0.4,0.4', 'uniform', 'single', 'single:-1', 'all' -> TimestepSpec."""
    kind, _, args = text.partition(":")
    try:
        if kind == "ndtc" and args:
            mu, sigma = (float(v) for v in args.split(","))
            return TimestepSpec("ndtc", mu=mu, sigma=sigma)
        if kind == "single" and args:
            return TimestepSpec("single", step=int(args))
    except ValueError as e:
        raise ValueError(f"bad timestep sampler {text!r}: {e}; accepted: ndtc[:mu,sigma], uniform, "
                         "single[:step], all") from None
    if args:
        raise ValueError(f"timestep sampler {kind!r} takes no arguments, got {text!r}")
    return TimestepSpec(kind)
