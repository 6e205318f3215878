"""Activation ranges as a type: ``RangeSet`` (amax per quantizer for one pooled group or K timestep groups, in the
ranges JSON format of ``quant/calib/ranges.py``), and the per-row timestep-group lookup and split every stage uses."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


def _amax(name: str, v: Any) -> float:
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"amax of {name!r} must be finite and > 0, got {v!r}")
    return v



@dataclass(frozen=True)
class RangeGroup:
    """One range set: amax per quantizer name, valid for timesteps t_min..t_max (None: every t)."""
    amax: Mapping[str, float]
    t_max: int | None = None
    t_min: int | None = None



@dataclass(frozen=True)
class RangeSet:
    """Activation ranges for one (pooled) or K timestep groups (``groups=K`` recipes: K engines)."""
    groups: tuple[RangeGroup, ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a RangeSet needs at least one group")
        names = [sorted(g.amax) for g in self.groups]
        if any(n != names[0] for n in names):
            raise ValueError("every timestep group of a RangeSet must range the same quantizers")
        bounded = {g.t_max is not None for g in self.groups}
        if len(bounded) != 1 or (len(self.groups) > 1 and bounded != {True}):
            raise ValueError("a RangeSet has one unbounded group (pooled) or timestep bounds on every group")

    @classmethod
    def pooled(cls, amax: Mapping[str, float]) -> RangeSet:
        return cls((RangeGroup({n: _amax(n, v) for n, v in sorted(amax.items())}),))

    @classmethod
    def from_dict(cls, ranges: Mapping[str, Any]) -> RangeSet:
        """From the ranges JSON form: {name: amax} or {name: [{t_max, t_min, amax}, ...]} (all names alike)."""
        if not ranges:
            raise ValueError("no ranges: the recipe produced no quantizer ranges")
        grouped = {isinstance(v, list) for v in ranges.values()}
        if len(grouped) != 1:
            raise ValueError("ranges mix pooled values and timestep groups")
        if grouped == {False}:
            return cls.pooled(ranges)
        first = next(iter(ranges.values()))
        bounds = [(int(g["t_max"]), int(g["t_min"])) for g in first]
        for name, v in ranges.items():
            if [(int(g["t_max"]), int(g["t_min"])) for g in v] != bounds:
                raise ValueError(f"{name!r}: timestep groups {[(g['t_max'], g['t_min']) for g in v]} differ "
                                 f"from the other quantizers' {bounds}")
        return cls(tuple(RangeGroup({n: _amax(n, v[k]["amax"]) for n, v in sorted(ranges.items())}, t_max=hi, t_min=lo)
                         for k, (hi, lo) in enumerate(bounds)))

    def to_dict(self) -> dict[str, Any]:
        """The ranges JSON form (see ``from_dict``)."""
        if not self.is_grouped:
            return dict(self.groups[0].amax)
        return {n: [{"t_max": g.t_max, "t_min": g.t_min, "amax": g.amax[n]} for g in self.groups]
                for n in self.names}

    @property
    def is_grouped(self) -> bool:
        """True for ``groups=K`` recipes (even K = 1): one engine per group, switched by timestep."""
        return self.groups[0].t_max is not None

    @property
    def names(self) -> list[str]:
        return sorted(self.groups[0].amax)

    def __len__(self) -> int:
        return len(self.groups[0].amax)

    def amax(self, k: int = 0) -> dict[str, float]:
        """{quantizer: amax} of group ``k`` (the only one for pooled ranges)."""
        return dict(self.groups[k].amax)

    def subset(self, names: Sequence[str]) -> RangeSet:
        """The ranges of ``names`` only (same groups): a model with fewer quantized layers; a name without a
        range is an error."""
        missing = sorted(set(names) - set(self.names))
        if missing:
            raise ValueError(f"no ranges for {missing[:5]} ({len(missing)} quantizers)")
        return RangeSet(tuple(dataclasses.replace(g, amax={n: g.amax[n] for n in sorted(names)}) for g in self.groups))

    def clip(self, t_max: int, t_min: int) -> RangeSet:
        """The groups for the timesteps t_min..t_max only (a segment of a config whose precision changes with t):
        those overlapping it (else the nearest one), bounds cut to it, the first and last widened to its ends so
        that every t in it finds its group inside it; one group left comes back pooled (it holds for all of
        them). Pooled ranges are returned as they are."""
        if not self.is_grouped:
            return self
        keep = [g for g in self.groups if g.t_max >= t_min and g.t_min <= t_max]
        if not keep:
            mid = torch.tensor([(t_max + t_min) // 2])
            keep = [self.groups[int(group_index(mid, self.t_ranges)[0])]]
        if len(keep) == 1:
            return RangeSet.pooled(keep[0].amax)
        return RangeSet(tuple(dataclasses.replace(g, t_max=t_max if i == 0 else min(g.t_max, t_max),
                                                  t_min=t_min if i == len(keep) - 1 else max(g.t_min, t_min))
                              for i, g in enumerate(keep)))

    def widest(self) -> dict[str, float]:
        """{quantizer: the largest amax over the groups}."""
        return {n: max(g.amax[n] for g in self.groups) for n in self.names}

    @property
    def t_ranges(self) -> list[tuple[int, int]] | None:
        """(t_max, t_min) per group, or None for pooled ranges."""
        return [(g.t_max, g.t_min) for g in self.groups] if self.is_grouped else None



def nearest_group(t: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Per row of ``t``, the index of the group [lo_k, hi_k] holding it, else of the nearest group; ties go to the
    earlier (noisier) group (argmin's first minimum). Plain tensor ops on ``t``'s device: the one-graph export
    traces this same function into the ONNX graph."""
    t = t.reshape(-1, 1).to(torch.int64)
    dist = torch.clamp(torch.maximum(lo[None, :] - t, t - hi[None, :]), min=0)
    return dist.argmin(dim=1)


def group_index(t: torch.Tensor, t_ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Per row of ``t`` (B,), on the CPU, the index of the (t_max, t_min) group holding it (``nearest_group``)."""
    hi = torch.tensor([r[0] for r in t_ranges], dtype=torch.int64)
    lo = torch.tensor([r[1] for r in t_ranges], dtype=torch.int64)
    return nearest_group(t.reshape(-1).to("cpu"), hi, lo)


def split_by_group(x: torch.Tensor, t: torch.Tensor, extra: dict, groups: torch.Tensor, call) -> torch.Tensor:
    """``call(k, x_k, t_k, **extra_k)`` for each group k present in ``groups`` (one index per row), outputs
    reassembled in row order; one group: one call on the whole batch, unsplit."""
    present = torch.unique(groups).tolist()
    if len(present) == 1:
        return call(present[0], x, t, **extra)
    out = None
    for k in present:
        rows = torch.nonzero(groups == k).flatten()
        part = call(k, x[rows.to(x.device)], t[rows.to(t.device)],
                    **{n: v[rows.to(v.device)] for n, v in extra.items()})
        if out is None:
            out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[rows.to(part.device)] = part
    return out
