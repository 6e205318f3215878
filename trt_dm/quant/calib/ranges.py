"""Range recipes: amax per quantizer from the statistics of ``stats.py`` (pure functions, no forward passes).

A recipe is a metric (histogram -> amax) and a merge (how per-timestep statistics combine). Every amax is
for TensorRT's int8 quantizer: symmetric, zero point 0, s = amax / 127,
Q(x) = s * clamp(round_half_even(x / s), -128, 127) (modelopt's default narrow_range=False; TensorRT's
QuantizeLinear saturates to [-128, 127]). All-zero statistics give ``ZERO_AMAX`` (1.0: any amax represents
zeros exactly, and 1.0 keeps the fp16 scale 1/127 a normal number); empty statistics raise ValueError.

Metrics: ``max`` (exact abs-max); ``percentile:p`` (p-th percentile of |x|, within one bin width);
``mse:p`` (clip minimising the L_p quantization error, p = 2.4 as PTQ4DM's and Q-Diffusion's activation
range search); ``entropy`` (TensorRT's KL-divergence calibration, Migacz 2017). With ``fmt="fp8"`` the ranges are
for E4M3 quantizers (s = amax / 448, ``trt_dm.quant.calib.fp8``): ``mse`` searches on the E4M3 grid; ``entropy``
(defined on int8's uniform bins) is refused.

Merges (``merge_ranges``) over {t: histogram} of one quantizer:

- ``pooled``: metric(sum_t h_t). Every calibration value counts once, so timesteps weigh as often as the
  calibration set drew them: PTQ4DM (Shang et al., CVPR 2023) calibrates on its NDTC-drawn set pooled.
  With ``counts`` {t: n_t} each h_t is reweighted to n_t samples (w_t = n_t / samples_t), which emulates
  another timestep distribution from the same statistics.
- ``uniform``: metric(sum_t h_t / n_t): every timestep's statistics weigh equally whatever their size.
- ``mean-max``: mean over timesteps of metric(h_t); with metric ``max`` it is ModelOpt's ``mean-max``.
- ``min-mean`` (metric ``max`` only): min over timesteps of the mean over samples of the sample's abs-max.
- ``groups=K``: the sampler's timesteps, in sampler order (decreasing t), split into K contiguous groups
  whose sizes differ by at most one; each group gets metric(pooled histograms of its timesteps). Returns K
  ``{"t_max", "t_min", "amax"}``: one range set per engine the sampler switches between.
Timesteps whose data are all zero are left out of ``mean-max`` and ``min-mean`` (their amax says nothing).

ModelOpt's ``min-mean`` / ``mean-max`` come from NVIDIA TensorRT-Model-Optimizer's
``diffusers/quantization/calib/plugin_calib.py`` (``PercentileCalibrator``, ``collect_method``) and
``quantize.py`` (``--collect-method``; "min-max means min(max(step_0), max(step_1), ...)"). Its calibrator
keys each call by denoising step (call index mod total_step) and keeps per step the max over calibration
batches of the batch abs-max (``mean-max``) or their sum (``min-mean``); then mean-max = mean over steps of
that max, min-mean = min over steps of sum / total_step. Here steps are true timesteps and the inner mean is
over samples rather than batches (a batch's abs-max is the max of its samples', so ours is <= theirs, equal
at batch size 1). ModelOpt divides the sum by the number of steps, not of batches, which scales its
min-mean by batches / steps (0.8 for its README's 16 batches x 20 steps); we take the true mean. Its
``percentile`` option (keep the first fraction of steps) is 1.0 in its examples: all steps, as here.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from trt_dm.core.io import atomic_write
from trt_dm.core.ranges import RangeSet
from trt_dm.quant.calib.fp8 import fp8_mse_objective
from trt_dm.quant.calib.stats import CalibCacheError, CalibStats, RunningHistogram, merge

log = logging.getLogger(__name__)

ZERO_AMAX = 1.0  # returned for all-zero data (see module docstring)
METRICS = ("max", "percentile", "mse", "entropy")
MERGES = ("pooled", "uniform", "min-mean", "mean-max", "groups=K")
MSE_MIN_FRACTION = 0.01  # smallest MSE candidate clip, as a fraction of the abs-max
_MSE_COARSE = 128  # coarse MSE candidates before refining around the best at full bin-edge resolution
_MSE_REFINE = 4  # coarse candidates refined
RANGES_FORMAT = "trt_dm.calib.ranges"  # a file format name (kept when the module moved)
Ranges = dict[str, Union[float, list]]


def _check(h: RunningHistogram) -> None:
    if h.empty:
        raise ValueError("cannot compute a range from an empty histogram (no data observed)")


def _grid(num_bits: int, narrow_range: bool) -> tuple[int, int]:
    if not isinstance(num_bits, int) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an int in [2, 16], got {num_bits!r}")
    qmax = 2 ** (num_bits - 1) - 1
    return (-qmax if narrow_range else -qmax - 1), qmax


def _abs_counts(h: RunningHistogram) -> np.ndarray:
    """Counts of |x| over B/2 bins [k w, (k+1) w) (a negative value on a bin edge folds into the lower bin)."""
    half = h.bins // 2
    return h.counts[half:] + h.counts[:half][::-1]


def amax_max(h: RunningHistogram) -> float:
    """The exact abs-max."""
    _check(h)
    return h.absmax or ZERO_AMAX


def amax_percentile(h: RunningHistogram, p: float = 99.99) -> float:
    """The p-th percentile of |x|, linear inside its bin: within one bin width w of the data's quantile."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p!r}")
    _check(h)
    if h.absmax == 0:
        return ZERO_AMAX
    if p == 100:
        return h.absmax
    c = _abs_counts(h)
    cum = np.cumsum(c)
    target = p / 100.0 * cum[-1]
    k = min(int(np.searchsorted(cum, target, side="left")), len(c) - 1)  # first bin reaching the target
    below = cum[k - 1] if k else 0.0
    value = (k + (target - below) / c[k]) * h.width
    return float(min(max(value, np.finfo(np.float64).tiny), h.absmax))


def _lp_antiderivative(x: np.ndarray, s: np.ndarray, p: float, qmin: int, qmax: int) -> np.ndarray:
    """F(x) = int_0^x dist(u, G)^p du for the grid G = {j s : qmin <= j <= qmax}; x (1, E), s (C, 1).

    dist(u, G) = |u - Q(u)| for the clamped round-to-nearest quantizer: s-periodic inside the grid (one period
    integrates to P = 2 (s/2)^(p+1) / (p+1)), and |u| - (clip point) beyond it.
    """
    P = 2.0 * (s / 2) ** (p + 1) / (p + 1)
    ax = np.abs(x)
    top = np.where(x >= 0, qmax, -qmin) * s  # clip point on x's side of 0
    inner = np.minimum(ax, top)
    k = np.floor(inner / s)  # full periods
    r = np.clip(inner - k * s, 0.0, s)  # position in the last period (rounding-safe: F is continuous in r)
    part = np.where(r <= s / 2, r ** (p + 1), (p + 1) * P - (s - r) ** (p + 1)) / (p + 1)
    return np.sign(x) * (k * P + part + np.maximum(ax - top, 0.0) ** (p + 1) / (p + 1))


def _span(h: RunningHistogram) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) over the occupied bins only."""
    nz = np.flatnonzero(h.counts)
    lo, hi = nz[0], nz[-1] + 1
    return h.edges()[lo:hi + 1], h.counts[lo:hi]


def _prepare(h: RunningHistogram, amax, num_bits: int, narrow_range: bool):
    """Shared set-up of the MSE functions: integer grid, candidate clips as float64, occupied bins."""
    _check(h)
    qmin, qmax = _grid(num_bits, narrow_range)
    amax = np.atleast_1d(np.asarray(amax, dtype=np.float64))
    edges, counts = _span(h) if h.absmax > 0 else (None, None)
    return qmin, qmax, amax, edges, counts


def mse_objective(h: RunningHistogram, amax: Sequence[float] | np.ndarray, p: float = 2.4, num_bits: int = 8,
                  narrow_range: bool = False, fmt: str = "int8") -> np.ndarray:
    """E(a) = sum over values of |x - Q_a(x)|^p, values modelled as uniform inside their bin (exact integral).

    PTQ4DM (Shang et al., CVPR 2023) / Q-Diffusion (Li et al., ICCV 2023): the activation clip minimises the
    L_p distance ||X - Q(X)||_p^p with p = 2.4. The uniform-in-bin model cannot alias (bin centres landing
    on grid points would make the error look zero); |E(a) - E_true(a)| <= ``mse_error_bound``.
    """
    qmin, qmax, amax, edges, counts = _prepare(h, amax, num_bits, narrow_range)
    if h.absmax == 0:
        return np.zeros(len(amax))
    if fmt == "fp8":
        return fp8_mse_objective(edges, counts, h.width, amax, p)
    dens = counts / h.width  # counts per unit length
    out = np.empty(len(amax))
    step = max(1, (1 << 19) // len(edges))  # bounded memory per chunk
    for i in range(0, len(amax), step):
        F = _lp_antiderivative(edges[None, :], (amax[i:i + step] / qmax)[:, None], p, qmin, qmax)
        out[i:i + step] = (np.diff(F, axis=1) * dens).sum(axis=1)  # row-wise sums: independent of chunking
    return out


def mse_error_bound(h: RunningHistogram, amax: Sequence[float] | np.ndarray, p: float = 2.4, num_bits: int = 8,
                    narrow_range: bool = False) -> np.ndarray:
    """B(a) >= |mse_objective(a) - E_true(a)| for any data with this histogram (p >= 1).

    d(x) = dist(x, G) is 1-Lipschitz; the bin average of d^p equals d(xi)^p for some xi in the bin, so each
    value errs by at most p D_b^(p-1) w, with D_b = d(centre_b) + w/2 >= max of d over bin b:
    B(a) = sum_b count_b * p * D_b^(p-1) * w. The chosen clip a_h thus satisfies
    E_true(a_h) <= E_true(a) + B(a_h) + B(a) for every candidate a that was evaluated.
    """
    qmin, qmax, amax, edges, counts = _prepare(h, amax, num_bits, narrow_range)
    if h.absmax == 0:
        return np.zeros(len(amax))
    centres, w = (edges[:-1] + edges[1:]) / 2, h.width
    s = (amax / qmax)[:, None]
    d = np.abs(centres - np.clip(np.round(centres / s), qmin, qmax) * s) + w / 2
    return (p * d ** (p - 1) * w * counts).sum(axis=1)


def mse_candidates(h: RunningHistogram) -> np.ndarray:
    """Candidate clips: the |x| bin edges k*w in [MSE_MIN_FRACTION * absmax, absmax), then absmax."""
    _check(h)
    a, w = h.absmax, h.width
    if a == 0:
        return np.array([ZERO_AMAX])
    ks = np.arange(max(1, math.ceil(MSE_MIN_FRACTION * a / w)), math.ceil(a / w))
    return np.append(ks * w, a)


def amax_mse(h: RunningHistogram, p: float = 2.4, num_bits: int = 8, narrow_range: bool = False, *,
             exhaustive: bool = False, fmt: str = "int8") -> float:
    """Clip minimising ``mse_objective`` over ``mse_candidates`` (PTQ4DM / Q-Diffusion, p = 2.4).

    ``exhaustive`` evaluates every candidate (~1000-2000 at 4096 bins). The default evaluates every
    ceil(n/128)-th candidate, then every candidate within one stride of the 4 best of those (~6x cheaper).
    It can miss the exhaustive optimum only inside a flat, jagged valley; on small noisy samples in the
    tests the objective it reaches is within 0.5% of the exhaustive minimum. Ties: the smaller clip.
    """
    if not p >= 1:
        raise ValueError(f"mse exponent p must be >= 1, got {p!r}")
    _check(h)
    if h.absmax == 0:
        return ZERO_AMAX
    cand = mse_candidates(h)
    n = len(cand)
    stride = 1 if exhaustive else max(1, math.ceil(n / _MSE_COARSE))
    idx = np.unique(np.append(np.arange(0, n, stride), n - 1))
    err = mse_objective(h, cand[idx], p, num_bits, narrow_range, fmt)
    if stride > 1:
        best = idx[np.argsort(err, kind="stable")[:_MSE_REFINE]]
        fine = np.unique(np.concatenate([np.arange(max(0, j - stride + 1), min(n, j + stride)) for j in best]))
        fine = np.setdiff1d(fine, idx)
        idx = np.append(idx, fine)
        err = np.append(err, mse_objective(h, cand[fine], p, num_bits, narrow_range, fmt))
    return float(cand[min(zip(err.tolist(), idx.tolist()))[1]])


def entropy_divergences(h: RunningHistogram, num_bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(i, KL_i): KL(P || Q) for keeping the first i |x| bins, i = 2^(num_bits-1) .. last non-empty bin + 1.

    Migacz, "8-bit Inference with TensorRT" (GTC 2017), slides 33-38: P = bins[:i] with the outliers' count
    added to P[i-1]; Q = bins[:i] merged into 2^(num_bits-1) levels (bin j -> level floor(j * levels / i)),
    each level's count spread evenly over its non-empty bins. inf where Q misses P's support. Computed for
    all i at once from prefix sums of c, [c > 0] and c log c.
    """
    _check(h)
    _grid(num_bits, False)
    c = _abs_counts(h)
    nq = 2 ** (num_bits - 1)  # quantized levels of |x|
    used = int(np.flatnonzero(c)[-1]) + 1
    i = np.arange(nq, used + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        clogc = np.where(c > 0, c * np.log(c), 0.0)
        cum_c, cum_z, cum_l = (np.concatenate([[0.0], np.cumsum(v)]) for v in (c, (c > 0).astype(float), clogc))
        st = -((-np.arange(nq + 1)[None, :] * i[:, None]) // nq)  # ceil(m i / nq): level m = bins [st_m, st_m+1)
        S, Z, A = (np.diff(v[st], axis=1) for v in (cum_c, cum_z, cum_l))
        N, kept = cum_c[-1], cum_c[i]
        tail = N - kept
        # N * KL = sum_j c_j log(p_j / q_j), p_j = c_j / N, q_j = (S_m / Z_m) / kept on non-empty bins
        kl = np.where(S > 0, A - S * np.log(S) + S * np.log(Z), 0.0).sum(axis=1) + kept * np.log(kept / N)
        last = c[i - 1]  # bin i-1 also carries the outliers in P
        g = np.log(Z[:, -1]) - np.log(S[:, -1]) + np.log(kept / N)
        fix = (last + tail) * (np.log(last + tail) + g) - np.where(last > 0, last * (np.log(last) + g), 0.0)
        kl = kl + np.where(tail > 0, np.where(last > 0, fix, np.inf), 0.0)
        kl = np.where((kept > 0) & np.isfinite(kl), kl / N, np.inf)  # Q empty or P off Q's support: never chosen
    return i, kl


def amax_entropy(h: RunningHistogram, num_bits: int = 8) -> float:
    """TensorRT's entropy calibration (Migacz 2017; see ``entropy_divergences``) on the |x| histogram.

    B/2 = 2048 |x| bins by default, as TensorRT. threshold = i * w for the i minimising KL(P || Q), the last
    minimum as modelopt's ``_compute_amax_entropy`` (which, unlike here, also overwrites bin 0 with bin 1).
    Data spanning <= 2^(num_bits-1) bins: the abs-max.
    """
    _check(h)
    if h.absmax == 0:
        return ZERO_AMAX
    i, kl = entropy_divergences(h, num_bits)
    if len(i) <= 1:
        return h.absmax
    best = int(np.flatnonzero(kl == kl.min())[-1])
    return float(min(i[best] * h.width, h.absmax))


@dataclass(frozen=True)
class Metric:
    """A range metric: ``max``, ``percentile`` (param p in (0, 100]), ``mse`` (param: L_p exponent), ``entropy``."""

    name: str
    param: float | None = None  # None -> the default: percentile 99.99, mse 2.4 (PTQ4DM and Q-Diffusion)

    def __post_init__(self) -> None:
        defaults = {"percentile": 99.99, "mse": 2.4}
        if self.name not in METRICS:
            raise ValueError(f"unknown range metric {self.name!r}; accepted: {METRICS}")
        if self.name not in defaults:
            if self.param is not None:
                raise ValueError(f"metric {self.name!r} takes no parameter, got {self.param!r}")
            return
        p = float(defaults[self.name] if self.param is None else self.param)
        if self.name == "percentile" and not 0 < p <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {p!r}")
        if self.name == "mse" and not (p >= 1 and math.isfinite(p)):
            raise ValueError(f"mse exponent p must be finite and >= 1, got {p!r}")
        object.__setattr__(self, "param", p)

    @classmethod
    def parse(cls, text: str) -> Metric:
        """'max', 'entropy', 'percentile', 'percentile:99.9', 'mse', 'mse:2.4' -> Metric."""
        name, sep, arg = text.strip().partition(":")
        if not sep:
            return cls(name)
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"bad parameter {arg!r} in metric {text!r}; e.g. 'mse:2.4', 'percentile:99.99'") from None
        return cls(name, value)

    def __str__(self) -> str:
        return self.name if self.param is None else f"{self.name}:{self.param!r}"

    def check_format(self, fmt: str) -> None:
        if fmt == "fp8" and self.name == "entropy":
            raise ValueError("metric 'entropy' (KL divergence over int8's uniform bins) has no FP8 form; for fp8 "
                             "use max, percentile or mse")

    def __call__(self, h: RunningHistogram, num_bits: int = 8, fmt: str = "int8") -> float:
        self.check_format(fmt)
        if self.name == "max":
            return amax_max(h)
        if self.name == "percentile":
            return amax_percentile(h, self.param)
        if self.name == "mse":
            return amax_mse(h, self.param, num_bits, fmt=fmt)
        return amax_entropy(h, num_bits)


def parse_merge(how: str) -> tuple[str, int | None]:
    """'pooled' | 'uniform' | 'min-mean' | 'mean-max' | 'groups=K' -> (kind, K or None)."""
    if how in MERGES[:4]:
        return how, None
    if isinstance(how, str) and how.startswith("groups="):
        k = how[len("groups="):]
        if k.isdigit() and int(k) >= 1:
            return "groups", int(k)
    raise ValueError(f"unknown merge {how!r}; accepted: {MERGES} with K an integer >= 1")


def group_timesteps(sampler_timesteps: Sequence[int], k: int) -> list[list[int]]:
    """K contiguous groups of the sampler's timesteps in sampler order (decreasing t); sizes differ by <= 1."""
    ts = sorted({int(t) for t in sampler_timesteps}, reverse=True)
    if not 1 <= k <= len(ts):
        raise ValueError(f"groups={k} needs 1 <= K <= the number of sampler timesteps ({len(ts)})")
    return [ts[g * len(ts) // k:(g + 1) * len(ts) // k] for g in range(k)]


def _pooled(hists: Mapping[int, RunningHistogram], counts: Mapping[int, float] | None) -> RunningHistogram:
    if counts is None:
        return merge(list(hists.values()))
    items = [(h, counts[t] / h.samples) for t, h in hists.items() if counts.get(t, 0) > 0]
    if not items:
        raise ValueError(f"counts give no weight to any of the timesteps {sorted(hists)}")
    return merge([h for h, _ in items], [w for _, w in items])


def merge_ranges(hists: Mapping[int, RunningHistogram], metric: Metric | str, how: str,
                 counts: Mapping[int, float] | None = None, sampler_timesteps: Sequence[int] | None = None,
                 fmt: str = "int8") -> float | list[dict[str, Any]]:
    """amax of one quantizer from its per-timestep histograms (merges: see the module docstring).

    ``counts`` reweights ``pooled`` and ``groups`` (default: the calibration set's own distribution);
    ``sampler_timesteps`` defines the ``groups=K`` split (default: the timesteps present).
    """
    metric = metric if isinstance(metric, Metric) else Metric.parse(metric)
    measure = functools.partial(metric, fmt=fmt)
    kind, k = parse_merge(how)
    hists = dict(sorted(hists.items()))
    if not hists:
        raise ValueError("merge_ranges needs statistics for at least one timestep")
    empty = [t for t, h in hists.items() if h.empty]
    if empty:
        raise ValueError(f"empty statistics (no data observed) at timesteps {empty}")
    if counts is not None:
        missing = sorted(t for t, n in counts.items() if n > 0 and t not in hists)
        if missing:
            raise ValueError(f"counts weigh timesteps {missing} that have no statistics; have {sorted(hists)}")
    if kind == "pooled":
        return measure(_pooled(hists, counts))
    if kind == "uniform":
        return measure(merge(list(hists.values()), [1.0 / h.n for h in hists.values()]))
    live = [h for h in hists.values() if h.absmax > 0]
    if kind == "mean-max":
        return math.fsum(measure(h) for h in live) / len(live) if live else ZERO_AMAX
    if kind == "min-mean":
        if metric.name != "max":
            raise ValueError(f"merge 'min-mean' (ModelOpt) is defined for metric 'max' only, got {metric}")
        return min(h.amax_sum / h.samples for h in live) if live else ZERO_AMAX
    ts = list(hists) if sampler_timesteps is None else [int(t) for t in sampler_timesteps]
    stray = sorted(set(hists) - set(ts))
    if stray:
        raise ValueError(f"statistics at timesteps {stray} are not among the sampler's timesteps")
    out = []
    for g in group_timesteps(ts, k):
        sub = {t: hists[t] for t in sorted(g) if t in hists}
        if not sub:
            raise ValueError(f"timestep group t={g[0]}..{g[-1]} of groups={k} has no calibration data; use "
                             f"fewer groups (or a one-range recipe such as ptq4dm), more calibration samples "
                             f"(--calib-n), or a calibration set covering every group (timesteps 'uniform'/'all')")
        out.append({"t_max": g[0], "t_min": g[-1], "amax": measure(_pooled(sub, counts))})
    return out


@dataclass(frozen=True)
class Recipe:
    """How statistics become ranges: a metric and a merge over timesteps."""

    name: str
    metric: Metric
    merge: str = "pooled"

    def __post_init__(self) -> None:
        if isinstance(self.metric, str):
            object.__setattr__(self, "metric", Metric.parse(self.metric))
        if not isinstance(self.metric, Metric):
            raise TypeError(f"Recipe.metric must be a Metric or a metric string, got {self.metric!r}")
        parse_merge(self.merge)

    @property
    def spec(self) -> str:
        return f"{self.metric}@{self.merge}"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "metric": str(self.metric), "merge": self.merge, "spec": self.spec}


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("ptq4dm", Metric("mse", 2.4), "pooled"),  # PTQ4DM: L_2.4 search on the pooled (NDTC) set
    # Q-Diffusion-like: its calibration set spreads samples evenly over the steps and its activation ranges
    # start from the same L_2.4 search; we weigh timesteps equally but do no BRECQ/AdaRound reconstruction,
    # no learned step sizes and no shortcut splitting, hence only "-like".
    Recipe("qdiffusion", Metric("mse", 2.4), "uniform"),
    Recipe("max", Metric("max"), "pooled"),
    Recipe("percentile", Metric("percentile", 99.99), "pooled"),
    Recipe("entropy", Metric("entropy"), "pooled"),  # TensorRT's legacy implicit-int8 calibrator
    Recipe("minmean", Metric("max"), "min-mean"),  # ModelOpt's diffusers int8 example
    Recipe("meanmax", Metric("max"), "mean-max"),
    Recipe("ptq4dm-g4", Metric("mse", 2.4), "groups=4"),  # 4 range sets, one per quarter of the sampler's steps
)}

# The recipe used when none is named: the best single-engine W8A8 configuration measured on the default model
# (docs/quality.md: DDIM 100 +1.3 % FD-EffNet and 39.0 dB vs FP, where the paper's `ptq4dm` is +9.0 % and 31.7 dB),
# deployed as ONE graph / engine (trt_dm.onegraph). Settings that take one range set use ONE_RANGE_RECIPE instead
# (trt_dm.api.default_recipe says which and why).
DEFAULT_RECIPE = "ptq4dm-g4"
ONE_RANGE_RECIPE = "ptq4dm"


def get_recipe(spec: str | Recipe) -> Recipe:
    """A preset name (``RECIPES``) or '<metric>@<merge>', e.g. 'mse:3@uniform', 'entropy@groups=2'."""
    if isinstance(spec, Recipe):
        return spec
    if spec in RECIPES:
        return RECIPES[spec]
    if isinstance(spec, str) and "@" in spec:
        metric, _, how = spec.partition("@")
        return Recipe(spec, Metric.parse(metric), how.strip())
    raise ValueError(f"unknown recipe {spec!r}; presets: {sorted(RECIPES)}, or '<metric>@<merge>' such as "
                     f"'mse:2.4@uniform' (metrics {METRICS}, merges {MERGES})")


def compute_ranges(stats: CalibStats, recipe: str | Recipe, *, counts: Mapping[int, float] | None = None,
                   sampler_timesteps: Sequence[int] | None = None, fmt: str | Callable = "int8") -> Ranges:
    """{quantizer name: amax (float) or, for groups=K, K dicts {t_max, t_min, amax}}; ``fmt``: a format, name -> format.

    ``sampler_timesteps`` defaults to ``stats.sampler_timesteps``, then to the timesteps observed.
    """
    recipe, fmt_of = get_recipe(recipe), (fmt if callable(fmt) else lambda _name: fmt)
    if sampler_timesteps is None:
        sampler_timesteps = stats.sampler_timesteps
    out: Ranges = {}
    for name in stats.names:
        hists = stats.for_quantizer(name)
        if all(h.absmax == 0 for h in hists.values()):
            log.warning("quantizer %r saw only zeros; amax set to ZERO_AMAX=%s", name, ZERO_AMAX)
        try:
            out[name] = merge_ranges(hists, recipe.metric, recipe.merge, counts, sampler_timesteps, fmt_of(name))
        except ValueError as e:
            raise ValueError(f"quantizer {name!r}, recipe {recipe.name} ({recipe.spec}): {e}") from e
    log.info("recipe %s (%s): ranges of %d quantizers", recipe.name, recipe.spec, len(out))
    return out


def _clean_amax(name: str, v: Any) -> float:
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"amax of {name!r} must be finite and > 0, got {v!r}")
    return v


def _clean(ranges: Mapping[str, Any]) -> Ranges:
    out: Ranges = {}
    for name, v in sorted(ranges.items()):
        if isinstance(v, list):
            out[name] = [{"t_max": int(g["t_max"]), "t_min": int(g["t_min"]), "amax": _clean_amax(name, g["amax"])}
                         for g in v]
        else:
            out[name] = _clean_amax(name, v)
    return out


def save_ranges(path: str | os.PathLike, ranges: Mapping[str, Any] | RangeSet, provenance: Mapping[str, Any]) -> Path:
    """Write {format, format_version, provenance, ranges} as JSON, atomically (floats round-trip exactly)."""
    if isinstance(ranges, RangeSet):
        ranges = ranges.to_dict()
    doc = {"format": RANGES_FORMAT, "format_version": 1, "provenance": dict(provenance), "ranges": _clean(ranges)}
    text = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())
    return path


def load_ranges(path: str | os.PathLike) -> tuple[RangeSet, dict[str, Any]]:
    """(ranges, provenance) from ``save_ranges``; CalibCacheError if the file is damaged."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != RANGES_FORMAT or doc.get("format_version") != 1:
            raise ValueError(f"format {doc.get('format')!r} version {doc.get('format_version')!r}")
        return RangeSet.from_dict(_clean(doc["ranges"])), dict(doc["provenance"])
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise CalibCacheError(f"ranges file {path} is damaged ({type(e).__name__}: {e}); delete it and run the "
                              f"recipe again") from None
