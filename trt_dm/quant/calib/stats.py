"""Per-(quantizer, timestep) activation statistics, collected ONCE per (model, calibration set).

Range recipes (``ranges.py``) are pure functions of these statistics, so comparing metrics or merges
costs no forward passes (DESIGN.md, "collect once, calibrate many").

Binning (``RunningHistogram``), and what it guarantees:

- ``bins`` (B, default 4096, a multiple of 4) equal bins over [-R, R), width w = 2R/B; bin k is
  [-R + k*w, -R + (k+1)*w).
- R is always a power of two STRICTLY above the abs-max seen so far: 2**(floor(log2(absmax)) + 1), or a
  given initial R if that is larger. No value equals R, so every bin is half-open and pair merges stay
  exact. The bin index is floor(x / w) + B/2, computed in float64, exact because w is a power of two.
  When data reaches R, R doubles (repeatedly) and bin pairs (2k, 2k+1) merge into bin B/4 + k: exact, no
  resampling. Hence the final counts equal ``numpy.histogram(all values, B, (-R, R))`` whatever the batch
  order.
- Exact: abs-max, min, max, element count, per-sample abs-max sum. From the counts alone a value is
  known to within its bin: since absmax lies in [R/2, R), w <= 4*absmax/B (absmax/1024 at B = 4096), so a
  quantile is recovered to within one bin width w; ``ranges.py`` models values as uniform inside a bin
  and states the resulting bound on the L_p quantization error (``ranges.mse_error_bound``).
- Counts are float64 (exact integers up to 2**53 per bin) so weighted merges use the same type.
  Memory: 8*B bytes per (quantizer, timestep), 32 KiB at B = 4096.

Cache on disk: ``stats.safetensors`` (one float64 (N, B) ``counts`` tensor, rows in sorted (name, t)
order) and ``stats.json`` (format version, bins, names, timesteps, sample counts, per-row R / min / max /
n / samples / amax_sum, the safetensors file's sha256 and a sha256 of the manifest itself). Written to
temporary names then ``os.replace``d, manifest last; ``load`` verifies everything before returning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from trt_dm.core.io import atomic_write

log = logging.getLogger(__name__)

DEFAULT_BINS = 4096  # |x| half has 2048 bins, as TensorRT's entropy calibrator (Migacz 2017)
FORMAT = "trt_dm.calib.stats"  # a file format name (kept when the module moved)
FORMAT_VERSION = 1
TENSORS_FILE = "stats.safetensors"
MANIFEST_FILE = "stats.json"
_ENTRY_KEYS = ("name", "t", "row", "range", "min", "max", "n", "samples", "amax_sum")


class CalibCacheError(ValueError):
    """A calibration cache on disk is damaged or not in this format: delete its folder and collect again."""


def _pow2_above(a: float) -> float:
    """Smallest power of two strictly greater than a (a > 0), exactly."""
    return math.ldexp(1.0, math.frexp(a)[1])  # a = m 2^e with 0.5 <= m < 1


def _is_pow2(r: Any) -> bool:
    return isinstance(r, (int, float)) and math.isfinite(r) and r > 0 and math.frexp(r)[0] == 0.5


def _rebin(counts: np.ndarray, from_range: float, to_range: float) -> np.ndarray:
    """Counts over [-from_range, from_range] re-expressed over [-to_range, to_range] by exact pair merges."""
    if from_range == 0.0 or from_range == to_range:  # R = 0: all counts sit in the zero bin B/2, valid for any R
        return counts.copy()
    doublings = math.frexp(to_range / from_range)[1] - 1  # the ratio is an exact power of two
    pad = np.zeros(counts.size // 4)
    for _ in range(doublings):
        counts = np.concatenate([pad, counts.reshape(-1, 2).sum(axis=1), pad])
    return counts


class RunningHistogram:
    """Signed-value histogram updatable without knowing the range in advance (see the module docstring)."""

    __slots__ = ("bins", "range", "counts", "n", "min", "max", "samples", "amax_sum")

    def __init__(self, bins: int = DEFAULT_BINS, init_range: float | None = None) -> None:
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 8 or bins % 4:
            raise ValueError(f"bins must be an int >= 8 and a multiple of 4 (exact pair merging), got {bins!r}")
        if init_range is not None and not _is_pow2(init_range):
            raise ValueError(f"init_range must be a positive power of two (so that ranges merge exactly), "
                             f"got {init_range!r}")
        self.bins = bins
        self.range = float(init_range) if init_range is not None else 0.0  # R > absmax; 0 while only zeros
        self.counts = np.zeros(bins, dtype=np.float64)
        self.n = 0.0  # number of values (weighted after a weighted merge)
        self.min = math.inf
        self.max = -math.inf
        self.samples = 0.0  # rows along dim 0 observed (one per calibration sample)
        self.amax_sum = 0.0  # sum over those rows of max |x| (for ModelOpt's min-mean)

    @property
    def empty(self) -> bool:
        return self.n == 0.0

    @property
    def absmax(self) -> float:
        return 0.0 if self.empty else max(abs(self.min), abs(self.max))

    @property
    def width(self) -> float:
        """Bin width w = 2R/B (0 while only zeros were seen)."""
        return 2.0 * self.range / self.bins

    def edges(self) -> np.ndarray:
        """The B+1 bin edges, exactly (integers times a power of two)."""
        return (np.arange(self.bins + 1, dtype=np.float64) - self.bins // 2) * self.width

    def copy(self) -> RunningHistogram:
        out = RunningHistogram(self.bins)
        for k in self.__slots__:
            setattr(out, k, getattr(self, k))
        out.counts = self.counts.copy()
        return out

    def update(self, x: torch.Tensor, *, where: str = "input") -> None:
        """Add the values of ``x`` (dim 0 = samples); empty tensors are a no-op.

        Raises ValueError naming ``where`` (e.g. the quantizer and timestep) on NaN or inf values.
        """
        x = torch.as_tensor(x).detach()
        if x.numel() == 0:
            return
        x = x.to(torch.float64)  # exact for every float/int input; float64 keeps floor(x / w) exact
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise ValueError(f"{where}: {n_nan} NaN and {n_inf} inf among {x.numel()} values (shape "
                             f"{tuple(x.shape)}); calibration statistics need finite activations")
        lo, hi = float(x.min()), float(x.max())
        amax = max(abs(lo), abs(hi))
        rows = x.reshape(x.shape[0] if x.dim() else 1, -1)
        if amax > 0.0 and amax >= self.range:
            new_range = _pow2_above(amax)
            self.counts = _rebin(self.counts, self.range, new_range)
            self.range = new_range
        half = self.bins // 2
        if self.range == 0.0:  # zeros only so far: they belong to bin B/2 = [0, w) for every future R
            self.counts[half] += x.numel()
        else:
            idx = torch.floor(x * (half / self.range)).to(torch.int64) + half  # half/R = 1/w, a power of two
            idx.clamp_(0, self.bins - 1)  # a no-op (-R <= x < R), kept as a guard for bincount
            self.counts += torch.bincount(idx.reshape(-1), minlength=self.bins).cpu().numpy()
        self.n += x.numel()
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.samples += rows.shape[0]
        self.amax_sum += math.fsum(rows.abs().amax(dim=1).tolist())

    def __repr__(self) -> str:
        return (f"RunningHistogram(bins={self.bins}, range={self.range}, n={self.n}, min={self.min}, "
                f"max={self.max})")


def merge(hists: Sequence[RunningHistogram], weights: Sequence[float] | None = None) -> RunningHistogram:
    """One histogram from several: rebinned exactly to the largest R, counts summed as sum_i w_i * counts_i.

    ``weights`` (default all 1, exact) scale counts, n, samples and amax_sum; they must be finite and > 0.
    min / max are those of all inputs (unweighted). Empty inputs are skipped.
    """
    hists = list(hists)
    if not hists:
        raise ValueError("merge needs at least one histogram, got none")
    bins = sorted({h.bins for h in hists})
    if len(bins) != 1:
        raise ValueError(f"cannot merge histograms with different bin counts {bins}")
    if weights is None:
        weights = [1.0] * len(hists)
    weights = [float(w) for w in weights]
    if len(weights) != len(hists):
        raise ValueError(f"got {len(weights)} weights for {len(hists)} histograms")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"merge weights must be finite and > 0, got {bad}")
    out = RunningHistogram(bins[0])
    out.range = max([h.range for h in hists if not h.empty], default=0.0)
    for h, w in zip(hists, weights):
        if h.empty:
            continue
        out.counts += w * _rebin(h.counts, h.range, out.range)
        out.n += w * h.n
        out.samples += w * h.samples
        out.amax_sum += w * h.amax_sum
        out.min, out.max = min(out.min, h.min), max(out.max, h.max)
    return out


def _as_timestep(t: Any) -> int:
    """The statistics' key of a timestep: the true training timestep, or a flow model's float time input floored
    (as the timestep groups and the one-graph selection floor it: ``trt_dm.core.ranges.nearest_group``)."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"timestep must be one number, got tensor {t!r}")
        t = t.item()
    if isinstance(t, (float, np.floating)) and t >= 0 and math.isfinite(t):
        return int(math.floor(t))
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise ValueError(f"timestep must be an integer >= 0 (the true training timestep) or a flow model's time "
                         f"input >= 0, got {t!r}")
    return int(t)


class CalibStats:
    """Statistics of one calibration pass: (quantizer name, timestep t) -> RunningHistogram.

    ``counts`` holds the calibration set's samples per timestep (``add_samples``, called once per batch by
    the collection loop; metadata, recipes do not need it). ``sampler_timesteps`` (optional) are the
    sampler's timesteps, used by the ``groups=K`` merge; ``meta`` is any JSON-serialisable provenance.
    """

    def __init__(self, bins: int = DEFAULT_BINS, *, sampler_timesteps: Sequence[int] | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        RunningHistogram(bins)  # validates bins
        self.bins = bins
        self.hists: dict[tuple[str, int], RunningHistogram] = {}
        self.counts: dict[int, int] = {}
        self.sampler_timesteps = (None if sampler_timesteps is None
                                  else tuple(_as_timestep(t) for t in sampler_timesteps))
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def names(self) -> list[str]:
        return sorted({name for name, _ in self.hists})

    @property
    def timesteps(self) -> list[int]:
        return sorted({t for _, t in self.hists})

    def for_quantizer(self, name: str) -> dict[int, RunningHistogram]:
        """{t: histogram} of one quantizer, in increasing t."""
        out = {t: h for (n, t), h in sorted(self.hists.items()) if n == name}
        if not out:
            raise KeyError(f"no statistics for quantizer {name!r}; known: {self.names}")
        return out

    def observe(self, name: str, t: Any, tensor: torch.Tensor) -> None:
        """Add one quantizer input ``tensor`` (dim 0 = samples), all at timestep ``t``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"quantizer name must be a non-empty string, got {name!r}")
        t = _as_timestep(t)
        if torch.as_tensor(tensor).numel() == 0:
            return
        h = self.hists.get((name, t))
        if h is None:
            h = self.hists[(name, t)] = RunningHistogram(self.bins)
        h.update(tensor, where=f"quantizer {name!r} at t={t}")

    def observe_batch(self, name: str, t_per_sample: torch.Tensor, tensor: torch.Tensor) -> None:
        """Add a batch whose samples have their own timesteps: ``t_per_sample`` (B,) ints (a flow model's float time
        inputs are floored, ``_as_timestep``), ``tensor`` (B, ...)."""
        ts = torch.as_tensor(t_per_sample).detach().cpu()
        tensor = torch.as_tensor(tensor)
        if ts.dim() != 1:
            raise ValueError(f"t_per_sample must be a 1-D tensor, got dtype {ts.dtype} shape {tuple(ts.shape)}")
        if ts.is_floating_point():
            if not bool(torch.isfinite(ts).all()) or bool((ts < 0).any()):
                raise ValueError(f"t_per_sample: time inputs must be finite and >= 0, got {ts.tolist()}")
            ts = torch.floor(ts).to(torch.int64)
        if tensor.dim() == 0 or tensor.shape[0] != ts.shape[0]:
            raise ValueError(f"quantizer {name!r}: tensor shape {tuple(tensor.shape)} does not start with the "
                             f"batch size {ts.shape[0]} of t_per_sample")
        uniq = torch.unique(ts)  # sorted
        if len(uniq) == 1:
            self.observe(name, uniq[0], tensor)
            return
        for t in uniq:
            rows = torch.nonzero(ts == t).flatten().to(tensor.device)
            self.observe(name, t, tensor.index_select(0, rows))

    def add_samples(self, t_per_sample: torch.Tensor | Sequence[int]) -> None:
        """Count calibration samples per timestep (once per batch, not per quantizer)."""
        for t in torch.as_tensor(t_per_sample).reshape(-1).tolist():
            t = _as_timestep(t)
            self.counts[t] = self.counts.get(t, 0) + 1

    # ---- cache ------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write stats.safetensors then stats.json atomically; same statistics -> byte-identical files."""
        if not self.hists:
            raise ValueError("no statistics to save: nothing was observed")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.hists)
        # one metadata key: safetensors writes metadata from a hash map, several keys come in random order
        blob = _st_save({"counts": np.stack([self.hists[k].counts for k in keys])},
                        metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
        entries = [{"name": n, "t": t, "row": i, "range": h.range, "min": h.min, "max": h.max, "n": h.n,
                    "samples": h.samples, "amax_sum": h.amax_sum}
                   for i, ((n, t), h) in enumerate((k, self.hists[k]) for k in keys)]
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "bins": self.bins,
                    "tensors_file": TENSORS_FILE, "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob),
                    "names": self.names, "timesteps": self.timesteps,
                    "counts": [[t, self.counts[t]] for t in sorted(self.counts)],
                    "sampler_timesteps": None if self.sampler_timesteps is None else list(self.sampler_timesteps),
                    "meta": self.meta, "entries": entries}
        try:
            manifest["manifest_sha256"] = _manifest_hash(manifest)
            text = json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise ValueError(f"statistics manifest is not JSON-serialisable (check `meta`): {e}") from e
        atomic_write(d / TENSORS_FILE, blob)
        atomic_write(d / MANIFEST_FILE, text.encode())  # last: a crash before this leaves a detectable mismatch
        log.info("saved statistics of %d quantizers x %d timesteps to %s", len(self.names), len(self.timesteps), d)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CalibStats:
        """Read and verify a cache written by ``save``; raises CalibCacheError on any damage."""
        d = Path(directory)
        mpath, tpath = d / MANIFEST_FILE, d / TENSORS_FILE
        if not mpath.exists() and not tpath.exists():
            raise FileNotFoundError(f"no calibration statistics in {d} (expected {MANIFEST_FILE} and {TENSORS_FILE})")

        def damaged(path: Path, why: str) -> CalibCacheError:
            return CalibCacheError(f"calibration cache file {path} is damaged ({why}); delete the folder {d} "
                                   f"and collect the statistics again")

        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise damaged(mpath, "missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise damaged(mpath, f"not valid JSON: {e}") from None
        try:
            if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
                                 f"expected {FORMAT!r} version {FORMAT_VERSION}")
            if manifest.pop("manifest_sha256") != _manifest_hash(manifest):
                raise ValueError("manifest content does not match its manifest_sha256")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise damaged(mpath, str(e)) from None
        try:
            blob = tpath.read_bytes()
        except FileNotFoundError:
            raise damaged(tpath, "missing") from None
        if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
            raise damaged(tpath, f"sha256 differs from the manifest's; size {len(blob)} bytes, "
                                 f"expected {manifest.get('size')}")
        try:
            return cls._from_manifest(manifest, _st_load(blob)["counts"])
        except Exception as e:  # any inconsistency: never hand back half-checked statistics
            raise damaged(mpath, f"inconsistent content: {type(e).__name__}: {e}") from None

    @classmethod
    def _from_manifest(cls, m: dict, counts: np.ndarray) -> CalibStats:
        bins, entries = m["bins"], m["entries"]
        if counts.dtype != np.float64 or counts.shape != (len(entries), bins):
            raise ValueError(f"counts tensor {counts.dtype} {counts.shape}, expected float64 ({len(entries)}, {bins})")
        if not (np.isfinite(counts).all() and (counts >= 0).all()):
            raise ValueError("counts must be finite and >= 0")
        out = cls(bins, sampler_timesteps=m["sampler_timesteps"], meta=m["meta"])
        out.counts = {_as_timestep(t): int(c) for t, c in m["counts"]}
        for i, e in enumerate(entries):
            if sorted(e) != sorted(_ENTRY_KEYS) or e["row"] != i:
                raise ValueError(f"entry {i} has keys {sorted(e)} / row {e.get('row')}, expected {sorted(_ENTRY_KEYS)}")
            h = RunningHistogram(bins)
            h.range, h.counts = float(e["range"]), counts[i].copy()
            h.n, h.min, h.max = float(e["n"]), float(e["min"]), float(e["max"])
            h.samples, h.amax_sum = float(e["samples"]), float(e["amax_sum"])
            if not ((h.range == 0.0 == h.absmax) or (_is_pow2(h.range) and h.absmax < h.range)) \
                    or not h.min <= h.max:
                raise ValueError(f"entry {i}: range {h.range} min {h.min} max {h.max}")
            if abs(float(h.counts.sum()) - h.n) > 1e-9 * h.n or h.n <= 0:
                raise ValueError(f"entry {i}: counts sum {h.counts.sum()} != n {h.n}")
            key = (str(e["name"]), _as_timestep(e["t"]))
            if key in out.hists:
                raise ValueError(f"duplicate entry {key}")
            out.hists[key] = h
        if out.names != m["names"] or out.timesteps != m["timesteps"]:
            raise ValueError("names/timesteps lists do not match the entries")
        return out


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    canon = json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}, sort_keys=True,
                       allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
