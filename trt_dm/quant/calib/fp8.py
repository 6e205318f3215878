"""The FP8 (E4M3) grid: its values, the reference quantizer, and the L_p clip search on it.

E4M3FN (OCP 8-bit floating point; ONNX ``FLOAT8E4M3FN``; TensorRT ``kFP8``): 1 sign, 4 exponent (bias 7) and 3
mantissa bits, no infinities, largest finite value 448, smallest normal 2^-6, subnormals down to 2^-9. A tensor
quantizer with range ``amax`` uses the scale s = amax / 448 (modelopt's FP8 scale, the scale of ONNX
``QuantizeLinear`` with a FLOAT8E4M3FN zero point and ``saturate=1``):

    Q_a(x) = s * round_e4m3(clamp(x / s, -448, 448))      (round to nearest, ties to even)

Unlike int8's uniform grid, the E4M3 grid has a constant *relative* step (1/8 to 1/16 of the value within each
binade), so the error of a value is about proportional to it, and a clip below the abs-max buys no resolution for
the values below it except near the subnormals. The L_p objective is nonetheless the same question as for int8:
``fp8_mse_objective`` integrates |x - Q_a(x)|^p exactly over each histogram bin (values uniform inside their
bin), using the scale invariance of the grid: dist(u, s G) = s dist(u / s, G), so the antiderivative for scale s
is s^(p+1) F_1(x / s) with F_1 that of the unit grid, computed once from the grid's intervals.

Codes are compared between frameworks as *ordinals* (``ordinals``): E4M3 bit patterns ordered along the number
line (sign and magnitude; adjacent grid values differ by 1), the FP8 counterpart of int8's integer codes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

E4M3_MAX = 448.0


@functools.cache
def e4m3_values() -> np.ndarray:
    """The non-negative finite E4M3FN values, ascending: 0, the 7 subnormals m/8 2^-6, the normals up to 448."""
    sub = [m / 8 * 2.0 ** -6 for m in range(8)]
    normal = [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if not (e == 15 and m == 7)]
    return np.array(sub + normal, dtype=np.float64)


def quantize_e4m3(x: torch.Tensor, amax: float | torch.Tensor) -> torch.Tensor:
    """Q_a(x) in float32 (the reference the fake quantizers, ONNX Runtime and TensorRT are checked against)."""
    s = torch.as_tensor(amax, dtype=torch.float32) / E4M3_MAX
    return (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s


@functools.cache
def _unit_tables(p: float) -> tuple[np.ndarray, np.ndarray]:
    """(grid, F_1 at each grid point) for the unit grid: each interval of length L adds 2 (L/2)^(p+1) / (p+1)."""
    g = e4m3_values()
    lengths = np.diff(g)
    return g, np.concatenate([[0.0], np.cumsum(2.0 * (lengths / 2) ** (p + 1) / (p + 1))])


def _unit_antiderivative(v: np.ndarray, p: float) -> np.ndarray:
    """F_1(v) = int_0^v dist(u, G)^p du for v >= 0, G the E4M3 values (saturating: beyond 448, u - 448)."""
    g, cum = _unit_tables(p)
    inside = np.minimum(v, E4M3_MAX)
    i = np.clip(np.searchsorted(g, inside, side="right") - 1, 0, len(g) - 2)
    length = g[i + 1] - g[i]
    r = np.clip(inside - g[i], 0.0, length)
    part = np.where(r <= length / 2, r ** (p + 1), 2.0 * (length / 2) ** (p + 1) - (length - r) ** (p + 1)) / (p + 1)
    return cum[i] + part + np.maximum(v - E4M3_MAX, 0.0) ** (p + 1) / (p + 1)


def fp8_mse_objective(edges: np.ndarray, counts: np.ndarray, width: float, amax: np.ndarray, p: float) -> np.ndarray:
    """E(a) = sum over values of |x - Q_a(x)|^p for each candidate clip ``amax`` (C,), values uniform inside the
    histogram bins (``edges`` (E,), ``counts`` (E - 1,), bin ``width``): the exact integral per bin."""
    dens = counts / width
    out = np.empty(len(amax))
    step = max(1, (1 << 19) // len(edges))  # bounded memory per chunk; row sums independent of chunking
    for i in range(0, len(amax), step):
        s = (np.asarray(amax[i:i + step], dtype=np.float64) / E4M3_MAX)[:, None]
        x = edges[None, :] / s
        F = np.sign(x) * _unit_antiderivative(np.abs(x), p) * s ** (p + 1)
        out[i:i + step] = (np.diff(F, axis=1) * dens).sum(axis=1)
    return out


def is_fp8(quantizer) -> bool:
    """A modelopt quantizer in E4M3 (num_bits (4, 3))."""
    return tuple(np.atleast_1d(getattr(quantizer, "num_bits", 8))) == (4, 3)


def ordinals(bits: torch.Tensor) -> torch.Tensor:
    """E4M3 bit patterns (uint8) -> int16 positions on the number line (+-0 -> 0, next value up +1, ...)."""
    b = bits.to(torch.int16)
    return torch.where(b >= 128, -(b - 128), b)


def from_ordinals(o: torch.Tensor) -> torch.Tensor:
    """``ordinals``' inverse: float32 E4M3 values."""
    o = o.to(torch.int16)
    return torch.where(o < 0, 128 - o, o).to(torch.uint8).view(torch.float8_e4m3fn).float()


def to_ordinals(x: torch.Tensor) -> torch.Tensor:
    """The ordinals of values already on the unit E4M3 grid (a quantizer's output divided by its scale)."""
    return ordinals(x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8))
