"""Range metrics against brute-force references on raw values; merges on hand-built per-timestep statistics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_kl

from trt_dm.core.ranges import RangeSet
from trt_dm.quant.calib import ranges as R
from trt_dm.quant.calib.stats import CalibCacheError, CalibStats, RunningHistogram


def _hist(values, bins: int = 4096, rows: int | None = None) -> RunningHistogram:
    h = RunningHistogram(bins)
    v = np.asarray(values, dtype=np.float64)
    h.update(torch.from_numpy(v.reshape(rows, -1) if rows else v))
    return h


def _lp_error(x: np.ndarray, amax: np.ndarray, p: float, narrow: bool = False) -> np.ndarray:
    """Brute force on the raw values: sum |x - Q(x)|^p with TensorRT's int8 quantizer (round half even)."""
    qmin = -127 if narrow else -128
    out = []
    for a in np.atleast_1d(amax):
        s = a / 127
        out.append(math.fsum((np.abs(x - np.clip(np.round(x / s), qmin, 127) * s) ** p).tolist()))
    return np.array(out)


RNG = np.random.default_rng(1234)
DATA = {
    "gauss": RNG.standard_normal(3000),
    "laplace": RNG.laplace(size=3000),
    "skewed+outliers": np.r_[np.abs(RNG.standard_normal(3000)) * 0.5 - 0.2, [9.0, -6.0]],
}


def test_max_is_exact():
    x = DATA["laplace"]
    assert R.amax_max(_hist(x)) == np.abs(x).max()


@pytest.mark.parametrize("name", sorted(DATA))
@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_numpy(name, p):
    x = DATA[name]
    h = _hist(x)
    ax = np.sort(np.abs(x))
    rank = int(np.clip(round(p / 100 * (len(ax) - 1)), 1, len(ax) - 2))
    gap = ax[rank + 1] - ax[rank - 1]  # numpy interpolates between neighbouring order statistics
    assert abs(R.amax_percentile(h, p) - np.percentile(ax, p)) <= h.width + gap
    assert R.amax_percentile(h, 100) == ax[-1]


@pytest.mark.parametrize("name", sorted(DATA))
@pytest.mark.parametrize("p,narrow", [(2.4, False), (2.0, True)])
def test_mse_against_exhaustive_search_on_raw_values(name, p, narrow):
    x = DATA[name]
    h = _hist(x)
    cand = R.mse_candidates(h)
    est = R.mse_objective(h, cand, p, narrow_range=narrow)
    bound = R.mse_error_bound(h, cand, p, narrow_range=narrow)
    true = _lp_error(x, cand, p, narrow)
    assert np.all(np.abs(est - true) <= bound)  # the documented bound holds for every candidate
    j = int(np.flatnonzero(cand == R.amax_mse(h, p, narrow_range=narrow, exhaustive=True))[0])
    assert j == int(np.argmin(est))
    k = int(np.argmin(true))  # exhaustive search on the raw values over the same candidates
    assert true[j] <= true[k] + bound[j] + bound[k]
    fine = np.linspace(0.01 * np.abs(x).max(), np.abs(x).max(), 1500)  # an independent finer grid
    assert true[j] <= 1.01 * _lp_error(x, fine, p, narrow).min()
    # the default (coarse-to-fine) search: near the exhaustive optimum, and the same bound chain
    d = int(np.flatnonzero(cand == R.amax_mse(h, p, narrow_range=narrow))[0])
    assert est[d] <= 1.005 * est[j]
    assert true[d] <= true[k] + bound[d] + bound[k] + 0.005 * est[j]


def test_mse_does_not_alias_when_grid_matches_bin_centres():
    # 256 bins, R = 1 (set by the value 0.5), w = 1/128; clip a = 127 w / 2 gives a grid step s = w / 2, so
    # every bin centre is a grid point: a centre-based estimate sees almost no error, the true error is not.
    x = np.r_[RNG.uniform(-0.3, 0.3, 4000), 0.5]
    h = _hist(x, bins=256)
    a = 127 * h.width / 2
    true = _lp_error(x, np.array([a]), 2.4)[0]
    centres = (h.edges()[:-1] + h.edges()[1:]) / 2
    centre_based = float((h.counts * _lp_error_each(centres, a, 2.4)).sum())
    assert centre_based < 0.05 * true
    assert 0.9 < R.mse_objective(h, [a])[0] / true < 1.1


def _lp_error_each(x: np.ndarray, a: float, p: float) -> np.ndarray:
    s = a / 127
    return np.abs(x - np.clip(np.round(x / s), -128, 127) * s) ** p


def _entropy_reference(c: np.ndarray, nq: int = 128):
    """Migacz 2017, written as a plain loop with scipy's KL divergence."""
    used = int(np.flatnonzero(c)[-1]) + 1
    out = []
    for i in range(nq, used + 1):
        P = c[:i].copy()
        P[i - 1] += c[i:].sum()
        level = (np.arange(i) * nq) // i
        Q = np.zeros(i)
        for m in range(nq):
            keep = (level == m) & (c[:i] > 0)
            if keep.any():
                Q[keep] = c[:i][level == m].sum() / keep.sum()
        out.append(scipy_kl(P, Q) if Q.sum() > 0 else np.inf)
    return np.arange(nq, used + 1), np.array(out)


@pytest.mark.parametrize("name", sorted(DATA))
def test_entropy_divergences_match_loop_reference(name):
    h = _hist(DATA[name], bins=768)
    i, kl = R.entropy_divergences(h)
    i_ref, kl_ref = _entropy_reference(R._abs_counts(h))
    np.testing.assert_array_equal(i, i_ref)
    finite = np.isfinite(kl_ref)
    np.testing.assert_array_equal(np.isfinite(kl), finite)
    np.testing.assert_allclose(kl[finite], kl_ref[finite], rtol=1e-9, atol=1e-12)
    best = int(np.flatnonzero(kl_ref == kl_ref.min())[-1])
    assert R.amax_entropy(h) == min(i_ref[best] * h.width, h.absmax)


def test_entropy_clips_outliers_and_keeps_uniform():
    g = np.r_[RNG.standard_normal(20000), [40.0, -35.0, 30.0]]
    a = R.amax_entropy(_hist(g))
    assert 2.5 < a < 8.0  # outliers clipped, Gaussian bulk kept
    u = RNG.uniform(-1, 1, 20000)
    assert R.amax_entropy(_hist(u)) >= 0.97 * np.abs(u).max()


def test_zero_and_empty_statistics():
    z = _hist(np.zeros(10))
    for f in (R.amax_max, R.amax_percentile, R.amax_mse, R.amax_entropy):
        assert f(z) == R.ZERO_AMAX
        with pytest.raises(ValueError, match="empty histogram"):
            f(RunningHistogram(64))


def test_metric_parse_and_errors():
    assert R.Metric.parse("mse:2.4") == R.Metric("mse", 2.4) == R.Metric.parse("mse")
    assert R.Metric.parse("percentile:99.9") == R.Metric("percentile", 99.9)
    assert R.Metric.parse("percentile").param == 99.99
    assert R.Metric.parse("max") == R.Metric("max") and str(R.Metric("entropy")) == "entropy"
    assert str(R.Metric.parse("mse:3")) == "mse:3.0"
    assert R.Metric.parse(str(R.Metric("percentile", 99.999))).param == 99.999
    for bad, msg in [("kl", "unknown range metric 'kl'; accepted"), ("mse:x", "bad parameter 'x'"),
                     ("max:3", "takes no parameter"), ("percentile:0", r"\(0, 100\]"), ("mse:0.5", ">= 1")]:
        with pytest.raises(ValueError, match=msg):
            R.Metric.parse(bad)


def _two_timesteps():
    """t=5: 2 samples x 500 values at |x| = 1 (sample 0) and 0.5 (sample 1); t=9: 1 sample, 10 values at 4."""
    h5 = _hist(np.r_[np.full(250, 1.0), np.full(250, -1.0), np.full(500, 0.5)], bins=64, rows=2)
    h9 = _hist(np.full(10, -4.0), bins=64, rows=1)
    return {5: h5, 9: h9}


def test_merges_on_hand_built_statistics():
    hs = _two_timesteps()
    mx, pct75 = R.Metric("max"), R.Metric("percentile", 75)
    assert R.merge_ranges(hs, mx, "pooled") == 4.0
    assert R.merge_ranges(hs, mx, "mean-max") == (1.0 + 4.0) / 2
    assert R.merge_ranges(hs, mx, "min-mean") == min((1.0 + 0.5) / 2, 4.0)
    # pooled: 1010 values, 10 at 4 -> the 75th percentile sits among the 1.0s; uniform: half the mass at 4
    assert 1.0 <= R.merge_ranges(hs, pct75, "pooled") <= 1.0 + hs[5].width * 2
    assert 4.0 - hs[9].width * 2 <= R.merge_ranges(hs, pct75, "uniform") <= 4.0
    # counts reweight pooled: t=5 as 1 sample (weight 1/2), t=9 as 100 samples (weight 100)
    w = R.merge_ranges(hs, pct75, "pooled", counts={5: 1, 9: 100})
    assert w == pct75(R.merge([hs[5], hs[9]], [0.5, 100.0]))
    assert R.merge_ranges(hs, pct75, "pooled", counts={5: 2, 9: 1}) == R.merge_ranges(hs, pct75, "pooled")
    with pytest.raises(ValueError, match=r"timesteps \[7\] that have no statistics"):
        R.merge_ranges(hs, mx, "pooled", counts={5: 1, 7: 1})
    with pytest.raises(ValueError, match="metric 'max' only"):
        R.merge_ranges(hs, "mse", "min-mean")
    with pytest.raises(ValueError, match=r"unknown merge 'median'; accepted: \('pooled'"):
        R.merge_ranges(hs, mx, "median")
    zero = {**hs, 7: _hist(np.zeros(4), bins=64)}  # all-zero timesteps are left out of mean/min merges
    assert R.merge_ranges(zero, mx, "mean-max") == 2.5 and R.merge_ranges(zero, mx, "min-mean") == 0.75


def test_groups_boundaries_and_ranges():
    assert R.group_timesteps(range(10), 3) == [[9, 8, 7], [6, 5, 4], [3, 2, 1, 0]]
    assert R.group_timesteps([0, 50, 99], 3) == [[99], [50], [0]]
    hs = {9: _hist([3.0, -1.0], bins=64), 8: _hist([0.5], bins=64), 2: _hist([-0.25, 0.1], bins=64)}
    got = R.merge_ranges(hs, "max", "groups=2", sampler_timesteps=range(10))
    assert got == [{"t_max": 9, "t_min": 5, "amax": 3.0}, {"t_max": 4, "t_min": 0, "amax": 0.25}]
    assert R.merge_ranges(hs, "max", "groups=3") == [{"t_max": 9, "t_min": 9, "amax": 3.0},
                                                    {"t_max": 8, "t_min": 8, "amax": 0.5},
                                                    {"t_max": 2, "t_min": 2, "amax": 0.25}]
    with pytest.raises(ValueError, match=r"group t=6\.\.4 of groups=3 has no calibration data"):
        R.merge_ranges(hs, "max", "groups=3", sampler_timesteps=range(10))
    with pytest.raises(ValueError, match="1 <= K <= the number of sampler timesteps"):
        R.merge_ranges(hs, "max", "groups=4")
    for bad in ("groups=0", "groups=x", "groups="):
        with pytest.raises(ValueError, match="unknown merge"):
            R.parse_merge(bad)


def _stats(seed: int) -> CalibStats:
    rng = np.random.default_rng(seed)
    st = CalibStats(1024, sampler_timesteps=[80, 60, 40, 20, 0])
    t = torch.tensor([80, 80, 60, 40, 20, 0])
    for name, scale in (("a.q", 1.0), ("b.q", 5.0)):
        x = rng.standard_normal((6, 40)) * scale * (1 + t.numpy()[:, None] / 40.0)  # wider at large t
        st.observe_batch(name, t, torch.from_numpy(x))
    st.observe_batch("z.q", t, torch.zeros(6, 3))
    st.add_samples(t)
    return st


def test_compute_ranges_presets_deterministic_and_after_reload(tmp_path):
    a, b = _stats(0), _stats(0)
    a.save(tmp_path / "s")
    c = CalibStats.load(tmp_path / "s")
    for name in ("ptq4dm", "qdiffusion", "max", "percentile", "entropy", "minmean", "meanmax", "ptq4dm-g4",
                 "mse:3@uniform"):
        ra = R.compute_ranges(a, name)
        assert ra == R.compute_ranges(b, name) == R.compute_ranges(c, name)  # bit-identical reruns
        assert sorted(ra) == ["a.q", "b.q", "z.q"]
        if name == "ptq4dm-g4":
            assert [(g["t_max"], g["t_min"]) for g in ra["a.q"]] == [(80, 80), (60, 60), (40, 40), (20, 0)]
            assert [g["amax"] for g in ra["z.q"]] == [R.ZERO_AMAX] * 4
            assert ra["a.q"][0]["amax"] == R.amax_mse(a.hists[("a.q", 80)])
        else:
            assert ra["z.q"] == R.ZERO_AMAX and 0 < ra["a.q"] < ra["b.q"]
    assert R.compute_ranges(a, "max")["b.q"] == max(h.absmax for h in a.for_quantizer("b.q").values())
    assert R.get_recipe("mse:3@uniform") == R.Recipe("mse:3@uniform", R.Metric("mse", 3.0), "uniform")
    with pytest.raises(ValueError, match="unknown recipe 'fast'; presets"):
        R.get_recipe("fast")
    with pytest.raises(ValueError, match=r"quantizer .a.q., recipe max@groups=10 .*t=90..90 .*no calibration data"):
        R.compute_ranges(a, "max@groups=10", sampler_timesteps=range(0, 100, 10))


def test_save_and_load_ranges(tmp_path):
    st = _stats(1)
    recipe = R.get_recipe("ptq4dm-g4")
    ranges = R.compute_ranges(st, recipe)
    prov = {"recipe": recipe.to_dict(), "stats": "calib_cache/x"}
    p1, p2 = R.save_ranges(tmp_path / "r1.json", ranges, prov), R.save_ranges(tmp_path / "r2.json", ranges, prov)
    assert p1.read_bytes() == p2.read_bytes()
    loaded, prov1 = R.load_ranges(p1)
    assert prov1 == prov and loaded.is_grouped and len(loaded.groups) == 4 and loaded.to_dict() == ranges
    assert loaded.amax(2) == {n: v[2]["amax"] for n, v in ranges.items()}
    pooled = {"solo": 0.1 + 0.2, "other": 3.0}  # a float that needs all 17 digits
    rs, _ = R.load_ranges(R.save_ranges(tmp_path / "r4.json", RangeSet.pooled(pooled), prov))
    assert not rs.is_grouped and rs.t_ranges is None and rs.amax() == pooled and rs.widest() == pooled
    mixed = dict(ranges, solo=1.0)  # one quantizer pooled, the others grouped: refused, not guessed
    R.save_ranges(tmp_path / "r5.json", mixed, prov)
    with pytest.raises(CalibCacheError, match="mix pooled values and timestep groups"):
        R.load_ranges(tmp_path / "r5.json")
    with pytest.raises(ValueError, match="'bad' must be finite and > 0"):
        R.save_ranges(tmp_path / "r3.json", {"bad": 0.0}, prov)
    p1.write_text(p1.read_text()[:-30])
    with pytest.raises(CalibCacheError, match="r1.json is damaged"):
        R.load_ranges(p1)
    doc = json.loads(p2.read_text())
    doc["ranges"]["solo"] = -1
    p2.write_text(json.dumps(doc))
    with pytest.raises(CalibCacheError, match="r2.json is damaged"):
        R.load_ranges(p2)
