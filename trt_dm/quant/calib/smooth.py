"""Channel balancing (SmoothQuant; PTQ4DiT's channel balancing) for the quantized Linear and Conv2d layers.

A transformer's linear layers read activations in which a few channels are far larger than the rest; one
per-tensor int8 range must cover them, so the other channels get few codes. For y = W x, any positive s gives
y = (W diag(s)) (x / s): dividing input channel j by s_j = max|x_j|^a / max|W_:,j|^(1 - a) (a: the migration
strength, ``QuantConfig.smooth``) flattens the activation's channels and moves their spread into the weight's
columns, which the per-output-channel weight ranges absorb partly. Computed once from the FP model's
calibration set (every timestep, both CFG halves: one s per layer serves every timestep group) and stored
beside the statistics; the statistics are then of x / s. In the fake-quant model the weight is multiplied by
s and the layer's input quantizer gets ``pre_quant_scale`` = 1 / s (modelopt applies it before quantizing, on
or off), which exports as a Mul before the layer's Q/DQ. A convolution (groups 1) is balanced the same way per
input channel (axis 1 of its input, its weight's axis 1), s_j from max |W_:,j,:,:|.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

S_LIMIT = 1e4  # factors are clamped to [1/S_LIMIT, S_LIMIT]: a dead channel (max 0) keeps s = 1


def _balanceable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1


def _channel_axis(m: nn.Module) -> int:
    """The axis of the layer's input that holds its input channels: last for Linear, 1 for Conv2d (NCHW)."""
    return -1 if isinstance(m, nn.Linear) else 1


def input_view(layer: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """Per-channel values ``v`` (C,) shaped to broadcast over ``layer``'s input: (C,) for Linear, (1, C, 1, 1) for
    Conv2d."""
    return v if isinstance(layer, nn.Linear) else v.reshape(1, -1, 1, 1)


def smoothed_layers(qunet: nn.Module, patterns: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The quantized Linear and Conv2d (groups 1) layers to balance: all, or those an fnmatch pattern names (a
    pattern naming none of them is an error, naming the layers it could)."""
    from trt_dm.quant.modules import quantized_layers
    layers = {n: m for n, m in quantized_layers(qunet).items() if _balanceable(m)}
    patterns = tuple(patterns)
    if not patterns:
        return layers
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in layers):
            raise ValueError(f"--smooth-layers pattern {p!r} matches no quantized linear or convolution layer "
                             f"(fnmatch on module names, e.g. {next(iter(layers), 'transformer_blocks.0.attn1.to_q')!r})")
    return {n: m for n, m in layers.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def channel_absmax(qunet: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable) -> dict[str, torch.Tensor]:
    """max |x_j| over every row, token or pixel of each layer's input, per input channel, from the FP model (all
    quantizers off) run on ``batches`` of (x, t, conditioning)."""
    from trt_dm.quant.modules import observing
    amax: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        if name in layers:
            a = x.detach().abs().movedim(_channel_axis(layers[name]), -1)
            m = a.reshape(-1, a.shape[-1]).amax(dim=0).float()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)

    with torch.no_grad(), observing(qunet, observe):
        for x, t, c in batches:
            qunet(x, t, **c)
    missing = sorted(set(layers) - set(amax))
    if missing:
        raise RuntimeError(f"channel balancing: layers {missing[:3]} saw no input on the calibration set")
    return amax


def factors(layers: Mapping[str, nn.Module], act_amax: Mapping[str, torch.Tensor], alpha: float
            ) -> dict[str, torch.Tensor]:
    """s per layer: max|x_j|^alpha / max|W_:,j|^(1 - alpha), 1 where either is 0, clamped to S_LIMIT."""
    out = {}
    for name, layer in layers.items():
        a = act_amax[name].double()
        w = layer.weight.detach().abs().transpose(0, 1).reshape(layer.weight.shape[1], -1).amax(dim=1).double()
        s = torch.where((a > 0) & (w > 0), a.pow(alpha) / w.pow(1 - alpha), torch.ones_like(a))
        out[name] = s.clamp(1 / S_LIMIT, S_LIMIT).float()
    return out


def save(path: Path, scales: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """The factors as safetensors, written to a temporary name and renamed."""
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp), metadata=dict(meta))
    tmp.replace(path)


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def apply(qunet: nn.Module, scales: Mapping[str, torch.Tensor]) -> None:
    """Balance a fake-quant model in place (its weights must be its own, not shared with the FP model): each named
    layer's weight input channels times s, its weight ranges recomputed (abs-max per output channel), its input
    quantizer's pre_quant_scale 1 / s (shaped to broadcast over its input's channel axis). The layers must be
    quantized Linear / Conv2d layers of matching width."""
    modules = dict(qunet.named_modules())
    for name, s in scales.items():
        m = modules.get(name)
        if m is None or not _balanceable(m) or not hasattr(m, "input_quantizer") or not m.input_quantizer.is_enabled:
            raise ValueError(f"channel balancing: {name!r} is not a quantized linear or convolution layer of this model")
        if s.shape != (m.weight.shape[1],):
            raise ValueError(f"channel balancing: {name!r} has {m.weight.shape[1]} input channels, factors "
                             f"{tuple(s.shape)}")
        shape = (1, -1) + (1,) * (m.weight.dim() - 2)  # the weight's input-channel axis
        with torch.no_grad():
            m.weight.mul_(s.to(m.weight.dtype).reshape(shape))
            wq = m.weight_quantizer
            amax = m.weight.detach().abs().reshape(m.weight.shape[0], -1).amax(dim=1).float()
            amax = torch.where(amax == 0, torch.ones_like(amax), amax)
            wq.amax = amax.reshape(wq.amax.shape)
        m.input_quantizer.pre_quant_scale = input_view(m, (1.0 / s).to(m.weight.dtype))
