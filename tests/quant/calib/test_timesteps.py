import numpy as np
import pytest

from trt_dm.quant.calib.timesteps import TimestepSpec, draw_timesteps, parse

T = 1000
EVERY = list(range(T - 1, -1, -1))          # a 1000-step sampler visits every t
DDIM50 = list(range(980, -1, -20))          # leading spacing, 50 steps


def test_ndtc_matches_normal_moments_when_unclipped():
    n = 20000
    t = draw_timesteps(TimestepSpec("ndtc", mu=0.5, sigma=0.1), EVERY, n, T, seed=1)
    # N(500, 100^2): 6-sigma bounds on the sample mean and std
    assert abs(t.mean() - 500) < 6 * 100 / np.sqrt(n)
    assert abs(t.std() - 100) < 6 * 100 / np.sqrt(2 * n)
    # fraction within one sigma ~ 68.27% (binomial 6-sigma bound)
    frac = np.mean(np.abs(t - 500) <= 100)
    assert abs(frac - 0.6827) < 6 * np.sqrt(0.68 * 0.32 / n)


def test_ndtc_skews_toward_data_end_and_snaps_to_visited_steps():
    t = draw_timesteps(TimestepSpec("ndtc", mu=0.4, sigma=0.4), DDIM50, 5000, T, seed=0)
    assert set(t.tolist()) <= set(DDIM50)
    assert np.mean(t < 500) > 0.55  # mu = 0.4 T: more mass at the data end
    # clipping at 0 piles mass at the smallest visited step (P(N(400,400) < 10) ~ 16.5%)
    assert 0.12 < np.mean(t == 0) < 0.21


def test_ndtc_snaps_to_the_nearest_step():
    spec = TimestepSpec("ndtc", mu=0.5, sigma=0.3)
    t = draw_timesteps(spec, DDIM50, 2000, T, seed=3)
    raw = np.clip(np.random.default_rng(3).normal(500, 300, 2000), 0, T - 1)
    nearest = np.array(DDIM50)[np.argmin(np.abs(np.array(DDIM50)[None, :] - raw[:, None]), axis=1)]
    # argmin picks the first of a tie (the larger t in DDIM50's order); ties are measure-zero here
    assert (t == nearest).all()


def test_ndtc_is_seeded():
    spec = TimestepSpec("ndtc")
    a, b = draw_timesteps(spec, DDIM50, 100, T, seed=5), draw_timesteps(spec, DDIM50, 100, T, seed=5)
    assert (a == b).all()
    assert not (a == draw_timesteps(spec, DDIM50, 100, T, seed=6)).all()


def test_uniform_single_all():
    u = draw_timesteps(TimestepSpec("uniform"), DDIM50, 130, T)
    counts = np.unique(u, return_counts=True)[1]
    assert len(counts) == 50 and counts.max() - counts.min() <= 1
    s = draw_timesteps(TimestepSpec("single"), DDIM50, 7, T)
    assert (s == 0).all()
    s = draw_timesteps(TimestepSpec("single", step=0), DDIM50, 7, T)
    assert (s == 980).all()
    a = draw_timesteps(TimestepSpec("all"), DDIM50, 100, T)
    assert sorted(np.unique(a, return_counts=True)[1].tolist()) == [2] * 50


def test_parse_and_errors():
    assert parse("ndtc:0.4,0.4") == TimestepSpec("ndtc", mu=0.4, sigma=0.4)
    assert parse("single:-2").step == -2
    with pytest.raises(ValueError, match="unknown timestep sampler 'normal'.*accepted"):
        parse("normal")
    with pytest.raises(ValueError, match="bad timestep sampler 'ndtc:x'"):
        parse("ndtc:x")
    with pytest.raises(ValueError, match="sigma > 0"):
        TimestepSpec("ndtc", sigma=0)
    with pytest.raises(ValueError, match="out of range"):
        draw_timesteps(TimestepSpec("single", step=60), DDIM50, 3, T)
