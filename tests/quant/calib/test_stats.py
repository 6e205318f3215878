"""RunningHistogram / merge / CalibStats: exactness against numpy.histogram, cache round trips and damage."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trt_dm.quant.calib import stats as S
from trt_dm.quant.calib.stats import CalibCacheError, CalibStats, RunningHistogram, merge


def _numpy_hist(values: np.ndarray, h: RunningHistogram) -> np.ndarray:
    return np.histogram(values, bins=h.bins, range=(-h.range, h.range))[0].astype(np.float64)


def _pow2_ceil_ref(a: float) -> float:
    return 2.0 ** (math.floor(math.log2(a)) + 1)  # strictly above


def test_counts_after_growth_equal_numpy_histogram_and_are_order_independent():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 50)) * scale for scale in (0.01, 0.3, 5.0, 0.2, 40.0)]
    everything = np.concatenate([b.ravel() for b in batches])
    fwd, rev = RunningHistogram(256), RunningHistogram(256)
    for b in batches:
        fwd.update(torch.from_numpy(b))
    for b in batches[::-1]:
        rev.update(torch.from_numpy(b))
    absmax = float(np.abs(everything).max())
    assert fwd.range == _pow2_ceil_ref(absmax)
    np.testing.assert_array_equal(fwd.counts, _numpy_hist(everything, fwd))
    np.testing.assert_array_equal(fwd.counts, rev.counts)
    assert (fwd.min, fwd.max, fwd.absmax, fwd.n) == (everything.min(), everything.max(), absmax, everything.size)
    np.testing.assert_array_equal(fwd.edges(), np.linspace(-fwd.range, fwd.range, 257))


def test_values_on_edges_follow_numpy_convention():
    h = RunningHistogram(16, init_range=2.0)
    w = h.width
    x = np.array([-2.0, 1.5, 0.0, -0.0, -1e-300, 1e-300, -w, w, 3 * w, -3 * w, 2.0 - 1e-12, -2.0 + 1e-12])
    h.update(torch.from_numpy(x))
    np.testing.assert_array_equal(h.counts, _numpy_hist(x, h))
    h.update(torch.tensor([2.0]))  # a value equal to R doubles R: the bins stay half-open
    assert h.range == 4.0
    np.testing.assert_array_equal(h.counts, _numpy_hist(np.r_[x, 2.0], h))


def test_float16_and_int_inputs_and_empty_noop():
    h = RunningHistogram(64)
    h.update(torch.tensor([0.5, -0.25], dtype=torch.float16))
    h.update(torch.tensor([[1, -3]]))
    h.update(torch.empty(0, 3))
    assert (h.n, h.min, h.max, h.range) == (4, -3.0, 1.0, 4.0)  # 0.5 first gave R = 1, then 3 gave 4
    np.testing.assert_array_equal(h.counts, _numpy_hist(np.array([0.5, -0.25, 1, -3]), h))


def test_zeros_only_then_data():
    h = RunningHistogram(32)
    h.update(torch.zeros(3, 5))
    assert (h.absmax, h.range, h.counts[16], h.counts.sum()) == (0.0, 0.0, 15.0, 15.0)
    h.update(torch.tensor([0.3, -0.7]))
    assert h.range == 1.0
    np.testing.assert_array_equal(h.counts, _numpy_hist(np.r_[np.zeros(15), 0.3, -0.7], h))


def test_bad_construction_arguments():
    for bins in (6, 10, 4097, 4096.0, True):
        with pytest.raises(ValueError, match="multiple of 4"):
            RunningHistogram(bins)
    with pytest.raises(ValueError, match="power of two"):
        RunningHistogram(64, init_range=3.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_quantizer_and_timestep(bad):
    stats = CalibStats(64)
    x = torch.ones(2, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"'up\.0\.conv\.input_quantizer' at t=7.*(NaN|inf)"):
        stats.observe("up.0.conv.input_quantizer", 7, x)


def test_merge_is_exact_and_weighted():
    rng = np.random.default_rng(1)
    a, b, c = rng.standard_normal(300) * 0.1, rng.standard_normal(200) * 3.0, rng.standard_normal(10) * 20
    hs = []
    for v in (a, b, c):
        h = RunningHistogram(128)
        h.update(torch.from_numpy(v))
        hs.append(h)
    m = merge(hs)
    direct = RunningHistogram(128)
    direct.update(torch.from_numpy(np.r_[a, b, c]))
    np.testing.assert_array_equal(m.counts, direct.counts)
    assert (m.range, m.min, m.max, m.n) == (direct.range, direct.min, direct.max, direct.n)
    mw = merge(hs, [0.5, 2.0, 1.0])
    expect = 0.5 * _numpy_hist(a, m) + 2.0 * _numpy_hist(b, m) + _numpy_hist(c, m)
    np.testing.assert_array_equal(mw.counts, expect)
    assert mw.n == 0.5 * 300 + 2.0 * 200 + 10
    np.testing.assert_array_equal(hs[0].counts, _numpy_hist(a, hs[0]))  # inputs untouched
    with pytest.raises(ValueError, match="> 0"):
        merge(hs, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="different bin counts"):
        merge([hs[0], RunningHistogram(64)])


def test_per_sample_amax_and_observe_batch_split():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((6, 3, 4)))
    t = torch.tensor([9, 3, 9, 3, 3, 0])
    stats, ref = CalibStats(64), CalibStats(64)
    stats.observe_batch("q", t, x)
    stats.add_samples(t)
    for tv in (0, 3, 9):
        ref.observe("q", tv, x[t == tv])
    assert stats.timesteps == [0, 3, 9] and stats.counts == {9: 2, 3: 3, 0: 1}
    for tv in (0, 3, 9):
        h, r = stats.hists[("q", tv)], ref.hists[("q", tv)]
        np.testing.assert_array_equal(h.counts, r.counts)
        rows = x[t == tv].reshape(int((t == tv).sum()), -1).abs().amax(1)
        assert h.samples == len(rows) and h.amax_sum == math.fsum(rows.tolist())
    with pytest.raises(ValueError, match="batch size 5"):
        stats.observe_batch("q", torch.arange(5), x)
    with pytest.raises(ValueError, match="integer >= 0 .* or a flow model's time input >= 0"):
        stats.observe("q", -1.5, x)
    with pytest.raises(ValueError, match="finite and >= 0"):
        stats.observe_batch("q", torch.tensor([1.0, float("nan"), 2, 3, 4, 5]), x)
    flow = CalibStats(64)  # a flow model's float time inputs: keyed by their floor, as the groups select them
    flow.observe_batch("q", t.float() + torch.tensor([0.25, 0.5, 0.75, 0.1, 0.9, 0.4]), x)
    flow.add_samples(t.float() + 0.5)
    assert flow.timesteps == [0, 3, 9] and flow.counts == stats.counts
    for tv in (0, 3, 9):
        np.testing.assert_array_equal(flow.hists[("q", tv)].counts, stats.hists[("q", tv)].counts)


def _example_stats(seed: int = 0) -> CalibStats:
    rng = np.random.default_rng(seed)
    stats = CalibStats(256, sampler_timesteps=[90, 60, 30, 0], meta={"model": "tiny", "calib": {"n": 6}})
    t = torch.tensor([90, 90, 30, 30, 0, 0])
    for name, scale in (("down.conv", 1.0), ("mid.attn.to_q", 7.0)):
        stats.observe_batch(name, t, torch.from_numpy(rng.standard_normal((6, 2, 5)) * scale).float())
    stats.observe("zero.q", 30, torch.zeros(2, 3))
    stats.add_samples(t)
    return stats


def test_save_load_round_trip_and_byte_identical(tmp_path):
    stats = _example_stats()
    stats.save(tmp_path / "a")
    loaded = CalibStats.load(tmp_path / "a")
    assert loaded.hists.keys() == stats.hists.keys()
    for k, h in stats.hists.items():
        g = loaded.hists[k]
        np.testing.assert_array_equal(g.counts, h.counts)
        assert [getattr(g, a) for a in ("range", "n", "min", "max", "samples", "amax_sum")] == \
               [getattr(h, a) for a in ("range", "n", "min", "max", "samples", "amax_sum")]
    assert (loaded.counts, loaded.sampler_timesteps, loaded.meta) == (stats.counts, stats.sampler_timesteps, stats.meta)
    loaded.save(tmp_path / "b")
    _example_stats().save(tmp_path / "c")  # a rerun from scratch
    for f in (S.TENSORS_FILE, S.MANIFEST_FILE):
        blob = (tmp_path / "a" / f).read_bytes()
        assert blob == (tmp_path / "b" / f).read_bytes() == (tmp_path / "c" / f).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([S.TENSORS_FILE, S.MANIFEST_FILE])


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip_tensor", "bad_json", "edit_manifest", "missing_key",
                                    "missing_manifest", "missing_tensors", "wrong_version"])
def test_damaged_cache_raises_clear_error(tmp_path, damage):
    d = tmp_path / "cache"
    _example_stats().save(d)
    tp, mp = d / S.TENSORS_FILE, d / S.MANIFEST_FILE
    if damage == "truncate":
        tp.write_bytes(tp.read_bytes()[:-100])
    elif damage == "flip_tensor":
        _flip(tp, tp.stat().st_size - 7)
    elif damage == "bad_json":
        mp.write_text(mp.read_text()[:-40])
    elif damage == "edit_manifest":  # still valid JSON, different content
        m = json.loads(mp.read_text())
        m["entries"][0]["max"] *= 2
        mp.write_text(json.dumps(m))
    elif damage == "missing_key":
        m = json.loads(mp.read_text())
        del m["entries"][1]["min"]
        m.pop("manifest_sha256")
        m["manifest_sha256"] = S._manifest_hash(m)  # a consistent-looking but incomplete manifest
        mp.write_text(json.dumps(m))
    elif damage == "missing_manifest":
        mp.unlink()
    elif damage == "missing_tensors":
        tp.unlink()
    elif damage == "wrong_version":
        mp.write_text(mp.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(CalibCacheError, match=r"stats\.(json|safetensors) is damaged .*delete the folder") as e:
        CalibStats.load(d)
    assert isinstance(e.value, ValueError) and str(d) in str(e.value)


def test_load_missing_folder_and_save_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no calibration statistics"):
        CalibStats.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="nothing was observed"):
        CalibStats(64).save(tmp_path / "empty")
    stats = _example_stats()
    stats.meta["bad"] = object()
    with pytest.raises(ValueError, match="JSON-serialisable"):
        stats.save(tmp_path / "bad")
    assert not (tmp_path / "bad" / S.MANIFEST_FILE).exists()
