"""The E4M3 grid against torch's float8_e4m3fn, and the FP8 L_p objective against a dense numeric integral."""
import numpy as np
import pytest
import torch

from trt_dm.quant.calib.fp8 import E4M3_MAX, e4m3_values, fp8_mse_objective, quantize_e4m3
from trt_dm.quant.calib.ranges import Metric, merge_ranges, mse_objective
from trt_dm.quant.calib.stats import RunningHistogram


def _hist(x: torch.Tensor, bins: int = 512) -> RunningHistogram:
    h = RunningHistogram(bins)
    h.update(x)
    return h


def test_e4m3_values_are_torchs_float8_values():
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = every[torch.isfinite(every) & (every >= 0)]
    assert np.array_equal(np.unique(finite.numpy().astype(np.float64)), e4m3_values())
    assert e4m3_values()[-1] == E4M3_MAX and len(e4m3_values()) == 127 and e4m3_values()[1] == 2.0 ** -9


def test_quantizer_lands_on_the_scaled_grid_and_saturates():
    amax = 3.0
    x = torch.linspace(-5, 5, 2001)
    q = quantize_e4m3(x, amax)
    grid = torch.from_numpy(e4m3_values()).float() * (amax / E4M3_MAX)
    assert torch.isin(q.abs(), grid).all() and q.abs().max() == pytest.approx(amax)
    near = (x.abs()[:, None] - grid[None, :]).abs().min(dim=1).values  # round to the nearest grid value
    inside = x.abs() <= amax
    torch.testing.assert_close((q - x).abs()[inside], near[inside], atol=1e-6, rtol=0)


def test_objective_equals_a_dense_integral_over_each_bin():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g), 8 * torch.randn(50, generator=g)])
    h = _hist(x, bins=256)
    nz = np.flatnonzero(h.counts)
    edges, counts = h.edges()[nz[0]:nz[-1] + 2], h.counts[nz[0]:nz[-1] + 1]
    amax = np.array([0.5, 2.0, 6.0, h.absmax])
    got = fp8_mse_objective(edges, counts, h.width, amax, 2.4)
    k = 4000  # values spread uniformly inside each bin, as the objective models them
    u = (edges[:-1, None] + (np.arange(k) + 0.5)[None, :] / k * h.width).reshape(-1)
    w = np.repeat(counts / k, k)
    for a, e in zip(amax, got):
        err = (quantize_e4m3(torch.from_numpy(u), float(a)).double().numpy() - u)
        assert e == pytest.approx(float((np.abs(err) ** 2.4 * w).sum()), rel=2e-3)
    assert np.allclose(mse_objective(h, amax, 2.4, fmt="fp8"), got)


def test_fp8_ranges_from_the_same_statistics():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(50000, generator=g), torch.tensor([60.0])])  # one outlier
    h = _hist(x, bins=2048)
    a_fp8 = Metric("mse", 2.4)(h, fmt="fp8")
    a_int8 = Metric("mse", 2.4)(h)
    assert 0 < a_int8 < a_fp8 <= h.absmax  # FP8 keeps relative precision below the clip: it clips less
    obj = mse_objective(h, [a_fp8, h.absmax, a_int8], 2.4, fmt="fp8")
    assert obj[0] <= obj[1] and obj[0] <= obj[2]
    assert Metric("max")(h, fmt="fp8") == h.absmax
    assert merge_ranges({10: h, 20: h}, "mse", "pooled", fmt="fp8") == pytest.approx(
        Metric("mse", 2.4)(_hist(torch.cat([x, x]), bins=2048), fmt="fp8"), rel=0.02)
    with pytest.raises(ValueError, match="entropy.*no FP8 form"):
        Metric("entropy")(h, fmt="fp8")
