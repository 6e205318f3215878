"""Timestep-dependent activation ranges in ONE graph: a ``groups=K`` recipe without K engines.

Activation scales are constants in a Q/DQ graph, so K range sets have meant K engines. But each quantized layer
is linear up to its bias: with r = a* / a_k (a* the widest of the layer's K ranges, a_k the range of the group
holding the row's timestep),

    fake_quant(x; a_k) = fake_quant(x * r; a*) / r      and      W (x / r) = (W x) / r,

so a layer run as  y = L_nobias(x * r) / r + bias  with ONE fixed input scale a* / 127 computes, per row, exactly
what the K-range fake-quant model computes with that row's group (up to float rounding of the multiplication:
an occasional flip at a rounding boundary, as between any two frameworks). The graph gains, per quantized layer,
a Mul before its Q/DQ and a Div + Add after the int8 convolution / GEMM, with r looked up per row from a constant
table by the group index, which the graph computes from its ``timestep`` input (the nearest group's, ties to the
noisier one, as ``trt_dm.core.artifacts.group_index``). The int8 layers and their Q/DQ are unchanged, so TensorRT
still runs them in int8; the extra elementwise ops run in FP16.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trt_dm.core.ranges import RangeSet, nearest_group


class _Groups:
    """The per-row group index of the current forward, set by the UNet's pre-hook, read by every wrapped layer."""
    index: torch.Tensor | None = None


def _row_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class RowScaled(nn.Module):
    """A quantized Conv2d / Linear whose input range is its row's timestep group's (see the module docstring)."""

    def __init__(self, layer: nn.Module, ratios: torch.Tensor, groups: _Groups) -> None:
        super().__init__()
        self.layer = layer
        self.bias = layer.bias
        layer.bias = None
        self.register_buffer("ratios", ratios.to(torch.float32))
        self._groups = groups
        self._channels_last = isinstance(layer, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.ratios[self._groups.index]  # (B,)
        y = self.layer(x * _row_view(r, x).to(x.dtype)) / _row_view(r, x).to(x.dtype)
        if self.bias is None:
            return y
        return y + (self.bias if self._channels_last else self.bias.reshape((1, -1) + (1,) * (y.dim() - 2)))


def one_graph(qunet: nn.Module, ranges: RangeSet) -> nn.Module:
    """Turn a fake-quant UNet (``trt_dm.quant.quantize_model``) into the one-graph form of ``groups=K`` ``ranges``,
    in place: every quantized layer gets the widest of its K input ranges and a per-row ratio table. Refuses
    ranges that are not grouped and quantizer layouts it cannot express (attention matmul quantizers, split
    concatenations)."""
    from trt_dm.quant.modules import activation_quantizers, apply_ranges, quantized_layers
    if not ranges.is_grouped or len(ranges.groups) < 2:
        raise ValueError("one_graph needs the ranges of a groups=K recipe (K >= 2); pooled ranges are one graph already")
    layers = quantized_layers(qunet)
    names = set(activation_quantizers(qunet))
    extra = sorted(names - set(layers))
    if extra:
        raise ValueError(f"one_graph supports layer-input quantizers only; {extra[:3]} (attention matmuls or split "
                         "concatenations) have no single-layer form")
    bad = [n for n, m in layers.items() if not isinstance(m, (nn.Conv2d, nn.Linear))]
    if bad:
        raise ValueError(f"one_graph: layers {bad[:3]} are not Conv2d / Linear")
    amax = torch.tensor([[ranges.amax(k)[n] for k in range(len(ranges.groups))] for n in layers], dtype=torch.float64)
    widest = amax.max(dim=1).values
    apply_ranges(qunet, {n: float(widest[i]) for i, n in enumerate(layers)})
    groups = _Groups()
    for i, (name, layer) in enumerate(layers.items()):
        parent_name, _, attr = name.rpartition(".")
        parent = qunet.get_submodule(parent_name) if parent_name else qunet
        setattr(parent, attr, RowScaled(layer, (widest[i] / amax[i]).float(), groups))
    hi = torch.tensor([g.t_max for g in ranges.groups], dtype=torch.int64)
    lo = torch.tensor([g.t_min for g in ranges.groups], dtype=torch.int64)

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t, device=sample.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(sample.shape[0])
        groups.index = nearest_group(t, hi.to(t.device), lo.to(t.device))
        return None

    qunet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    qunet.one_graph_t_ranges = [(int(a), int(b)) for a, b in zip(hi.tolist(), lo.tolist())]
    return qunet


def group_ratios(qunet: nn.Module) -> dict[str, Sequence[float]]:
    """{layer: its K ratios a*/a_k} of a one-graph UNet (for reports)."""
    return {n.removesuffix(".layer") if n.endswith(".layer") else n: m.ratios.tolist()
            for n, m in qunet.named_modules() if isinstance(m, RowScaled)}
