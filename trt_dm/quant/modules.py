"""NVIDIA fake-quant modules (modelopt TensorQuantizer) in the UNet: insertion, statistics hooks, ranges.

Layout (TensorRT explicit quantization): int8 (or FP8 E4M3, ``QuantConfig.format``) weights per output channel
(axis 0), activations per tensor in the same format on the inputs of every Conv2d and Linear not excluded by name. Weight ranges need no data: the exact
per-channel abs-max (modelopt's "max" algorithm) or, with ``weight_calib="mse"``, modelopt's search for the
per-channel clip with the least squared weight error (matters at 4 bits); activation ranges
come from the timestep-stratified statistics (``trt_dm.calib``) and are applied with ``apply_ranges``.

Pitfall handled here: an enabled modelopt quantizer without amax silently quantizes with a dynamic
per-batch range in torch. ``check_calibrated`` refuses any enabled quantizer whose range is missing,
non-finite or not positive.
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from trt_dm.quant.config import DEFAULT_EXCLUDE, WEIGHT_MSE_SEARCH, QuantConfig

log = logging.getLogger(__name__)


class UncalibratedQuantizerError(RuntimeError):
    """An enabled quantizer has no usable range: it would quantize with a dynamic per-batch range."""


SPLIT_SUFFIXES = ("#h", "#skip")  # range names of the two halves of a split layer's input


def concat_splits(unet: nn.Module) -> dict[str, int]:
    """Layers that read concat(h, skip) in the up path -> the channel where the skip half starts.

    For resnet i of an up block, h has the block input's channels (i = 0) or resnet i-1's output
    channels; conv1 (after GroupNorm/SiLU, same channel order) and conv_shortcut read the concatenation.
    """
    splits: dict[str, int] = {}
    for b, block in enumerate(getattr(unet, "up_blocks", [])):
        resnets = getattr(block, "resnets", [])
        if not resnets:
            continue
        # the block input has the channels of the previous up block's output (or the mid block's)
        if b > 0:
            prev = unet.up_blocks[b - 1].resnets[-1].out_channels
        elif getattr(unet, "mid_block", None) is not None:
            prev = unet.mid_block.resnets[-1].out_channels
        else:
            prev = unet.config.block_out_channels[-1]
        for i, r in enumerate(resnets):
            hidden = prev if i == 0 else resnets[i - 1].out_channels
            if r.in_channels > hidden:
                for conv in ("conv1", "conv_shortcut"):
                    if getattr(r, conv, None) is not None:
                        splits[f"up_blocks.{b}.resnets.{i}.{conv}"] = hidden
    return splits


def range_names(unet: nn.Module, qcfg: "QuantConfig") -> list[str]:
    """Names that statistics and ranges are keyed by: layer names, split layers as two halves."""
    return _expand(activation_quantizers(unet), concat_splits(unet) if qcfg.shortcut_split else {})


def _expand(names, splits: Mapping[str, int]) -> list[str]:
    """Range names of activation quantizers: a split layer's name becomes its two halves' names."""
    return sorted(x for n in names for x in ([n + s for s in SPLIT_SUFFIXES] if n in splits else [n]))


def _modelopt():
    from trt_dm.core.stages import import_detached
    import_detached("modelopt.torch.quantization")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer
    return mtq, TensorQuantizer


def _matching_nothing(patterns, names) -> str | None:
    """The first fnmatch pattern of ``patterns`` that matches none of ``names``, or None."""
    return next((p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)), None)


def sharing_copy(unet: nn.Module) -> nn.Module:
    """A copy of ``unet``'s modules that shares its parameter and buffer tensors (no second copy of the weights):
    for a fake-quant model that only reads them (statistics, export, the layer comparison). Quantizers inserted into
    the copy are its own; anything that rewrites weights in place (``mtq.fold_weight``, learned rounding's weights)
    needs a full ``copy.deepcopy``. A 2.6 B parameter UNet holds 10.3 GB of float32 weights once instead of twice."""
    import copy
    memo = {id(t): t for t in (*unet.parameters(), *unet.buffers())}
    return copy.deepcopy(unet, memo)


def quantize_model(unet: nn.Module, qcfg: QuantConfig = QuantConfig()) -> nn.Module:
    """Insert modelopt quantizers into ``unet`` in place (Conv2d/Linear inputs and weights) and set the
    weight ranges. Activation quantizers are left without range until ``apply_ranges``."""
    mtq, _ = _modelopt()
    bits = (4, 3) if qcfg.format == "fp8" else None  # modelopt's E4M3: 4 exponent, 3 mantissa bits
    quant_cfg = [{"quantizer_name": "*", "enable": False},
                 {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": bits or qcfg.weight_bits, "axis": 0}},
                 {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": bits or qcfg.act_bits, "axis": None}}]
    # later entries override earlier ones: the layers kept at 8-bit weights in a W4A8 / W7A8 model
    quant_cfg += [{"quantizer_name": f"{p}.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}}
                  for p in qcfg.w8_layers]
    quant_cfg += [{"quantizer_name": f"{p}.{q}_quantizer", "cfg": {"num_bits": (4, 3), "axis": 0 if q == "weight" else None}}
                  for p in qcfg.fp8_layers for q in ("weight", "input")]  # a format mix: its FP8 layers
    if qcfg.quantize_attention:
        quant_cfg += [{"quantizer_name": f"*{m}_bmm_quantizer", "cfg": {"num_bits": bits or qcfg.act_bits, "axis": None}}
                      for m in "qkv"]
    # with no forward loop, both algorithms calibrate the weights only ("mse" starts from "max")
    cfg = {"quant_cfg": quant_cfg, "algorithm": "max" if qcfg.weight_calib == "max" else dict(WEIGHT_MSE_SEARCH)}
    unet.eval()
    # modelopt prints "Inserted N quantizers"; its weight search also draws a progress bar on stderr
    quiet_search = contextlib.redirect_stderr(io.StringIO()) if qcfg.weight_calib == "mse" else contextlib.nullcontext()
    with contextlib.redirect_stdout(io.StringIO()), quiet_search:
        quantized = mtq.quantize(unet, cfg, forward_loop=None)
    for name, mod in quantized.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and wq.amax is not None and (wq.amax == 0).any():
            # an all-zero output channel quantizes to 0 with any scale; 1.0 keeps the scale valid in ONNX
            log.info("%s: %d all-zero weight channels get amax 1.0", name, int((wq.amax == 0).sum()))
            wq.amax = torch.where(wq.amax == 0, torch.ones_like(wq.amax), wq.amax)
    for name, mod in quantized.named_modules():
        # Conv2d / Linear only: modelopt also wraps LayerNorm (a text UNet's transformer blocks), whose quantized
        # input TensorRT's explicit-quantization rules do not place (no Q/DQ before a normalization)
        if hasattr(mod, "input_quantizer") and not isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.input_quantizer.disable()
            if hasattr(mod, "weight_quantizer"):
                mod.weight_quantizer.disable()
    excluded, matched = [], []  # layers kept in high precision; attention modules with matmul quantizers off
    for name, mod in quantized.named_modules():
        if qcfg.excludes(name):
            if hasattr(mod, "input_quantizer"):
                mod.input_quantizer.disable()
                mod.weight_quantizer.disable()
                excluded.append(name)
            for attr in ATTENTION_QUANTIZERS:
                if hasattr(mod, attr):
                    getattr(mod, attr).disable()
                    matched.append(name)
    # a pattern of the user's that keeps nothing in high precision is a typo, not a choice
    p = _matching_nothing([p for p in qcfg.exclude if p not in DEFAULT_EXCLUDE], excluded + matched)
    if p is not None:
        raise ValueError(f"exclude / keep-fp pattern {p!r} matches no quantizable layer (fnmatch on module names "
                         "of convolutions and linear layers, e.g. 'down_blocks.0.*' or 'down_blocks.0.resnets.0.conv1')")
    layers = quantized_layers(quantized)
    log.info("quantized %d layers, excluded %d: %s", len(layers), len(excluded), excluded)
    if qcfg.w8_layers:
        p = _matching_nothing(qcfg.w8_layers, layers)  # a pattern that keeps nothing at 8 bits is a typo
        if p is not None:
            raise ValueError(f"w8_layers pattern {p!r} matches no quantized layer (fnmatch on module names, "
                             f"e.g. {next(iter(layers), 'down_blocks.0.resnets.0.conv1')!r} or 'down_blocks.0.*')")
        wide = [n for n, m in layers.items() if m.weight_quantizer.num_bits == 8]
        expect = [n for n in layers if qcfg.weight_bits_of(n) == 8]
        if wide != expect:  # modelopt's pattern matching decides; check it did what the patterns say
            raise RuntimeError(f"8-bit weight layers {wide} differ from those w8_layers names {expect}")
        log.info("W%dA8 with %d layers' weights at 8 bits: %s", qcfg.weight_bits, len(wide), wide)
    return quantized


def quantized_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Layers whose input quantizer is enabled, by module name (the names ranges are keyed by)."""
    return {n: m for n, m in unet.named_modules()
            if hasattr(m, "input_quantizer") and m.input_quantizer.is_enabled}


ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")


def activation_quantizers(unet: nn.Module) -> dict[str, nn.Module]:
    """Enabled activation quantizers by range name: a layer's input quantizer under the layer's name,
    an attention matmul input as "<attention>.q_bmm" / ".k_bmm" / ".v_bmm"."""
    out = {n: m.input_quantizer for n, m in quantized_layers(unet).items()}
    for n, m in unet.named_modules():
        for attr in ATTENTION_QUANTIZERS:
            q = getattr(m, attr, None)
            if q is not None and q.is_enabled:
                out[f"{n}.{attr.removesuffix('_quantizer')}"] = q
    return out


def all_quantizers(unet: nn.Module) -> dict[str, nn.Module]:
    _, TensorQuantizer = _modelopt()
    return {n: m for n, m in unet.named_modules() if isinstance(m, TensorQuantizer)}


@contextlib.contextmanager
def observing(unet: nn.Module, observe: Callable[[str, torch.Tensor], None],
              splits: Mapping[str, int] | None = None, divide: Mapping[str, torch.Tensor] | None = None
              ) -> Iterator[None]:
    """Run the UNet in full precision while ``observe(name, input)`` sees every quantized layer's
    input as its quantizer would (times the quantizer's ``pre_quant_scale`` of channel balancing, and divided by
    ``divide[name]`` per channel: the balanced input of a model not balanced yet), a layer in ``splits`` as two
    calls, "<name>#h" and "<name>#skip", one per channel half.
    Quantizers are disabled inside the block and restored after it, even on error."""
    splits, divide = splits or {}, divide or {}
    quantizers = all_quantizers(unet)
    enabled = {n for n, q in quantizers.items() if q.is_enabled}
    acts = activation_quantizers(unet)

    def hook_for(name: str, q):
        def hook(_module, args):
            x = args[0]
            if getattr(q, "pre_quant_scale", None) is not None:
                x = x * q.pre_quant_scale
            if name in divide:
                x = x / divide[name].to(x.dtype)
            if name in splits:
                k = splits[name]
                observe(name + SPLIT_SUFFIXES[0], x[:, :k])
                observe(name + SPLIT_SUFFIXES[1], x[:, k:])
            else:
                observe(name, x)
            return None  # a pre-hook's return value would replace the input
        return hook

    handles = [q.register_forward_pre_hook(hook_for(name, q)) for name, q in acts.items()]
    for q in quantizers.values():
        q.disable()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for n in enabled:
            quantizers[n].enable()


def apply_ranges(unet: nn.Module, ranges: Mapping[str, float]) -> None:
    """Set every quantized layer's activation amax from ``ranges`` (name -> amax; a split layer as
    "<name>#h" + "<name>#skip", applied as a per-channel amax over its input). The names must match
    exactly: a missing or unknown name is an error, never silently skipped."""
    acts = activation_quantizers(unet)
    split_layers = {n[:-len(SPLIT_SUFFIXES[0])] for n in ranges if n.endswith(SPLIT_SUFFIXES[0])}
    splits = {n: k for n, k in concat_splits(unet).items() if n in split_layers}
    expected = set(_expand(acts, splits))
    missing = sorted(expected - set(ranges))
    unknown = sorted(set(ranges) - expected)
    if missing or unknown:
        raise ValueError(f"ranges do not match the quantized layers: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unknown {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)})")
    for key in sorted(expected):
        amax = float(ranges[key])
        if not (amax > 0 and amax < float("inf")):
            raise ValueError(f"range of {key!r} must be finite and > 0, got {amax}")
    modules = dict(unet.named_modules())
    for name, q in acts.items():
        if name in splits:
            k, c = splits[name], modules[name].in_channels
            amax = torch.empty(1, c, 1, 1)
            amax[:, :k] = float(ranges[name + SPLIT_SUFFIXES[0]])
            amax[:, k:] = float(ranges[name + SPLIT_SUFFIXES[1]])
            q.axis = 1  # per-channel over the input channels: two distinct values
            q.amax = amax
        else:
            q.amax = torch.tensor(float(ranges[name]), dtype=torch.float32)
    check_calibrated(unet)


def range_switch(unet: nn.Module, ranges) -> Callable[[int], None]:
    """A function that puts range set k of ``ranges`` (a grouped ``RangeSet``) into ``unet``'s activation quantizers:
    each set is checked and converted once by ``apply_ranges``, a switch then only copies the stored amax values (it
    runs per sampler call or reconstruction step, where matching names every time costs ~15 ms on the default
    model). The model holds the last set until the first switch."""
    acts = list(activation_quantizers(unet).values())
    saved = []
    for k in range(len(ranges.groups)):
        apply_ranges(unet, ranges.amax(k))
        saved.append([q.amax.detach().clone() for q in acts])

    def use(k: int) -> None:
        for q, amax in zip(acts, saved[k]):
            q.amax = amax
    return use


def weights_on_int8_grid(unet: nn.Module) -> int:
    """Store every weight whose quantizer has fewer than 8 bits (W4A8, W7A8) on the int8 grid, so an ordinary
    int8 engine runs it: the weight becomes its fake-quantized value k * s (s = amax / (2^(b-1) - 1) per output
    channel, k the b-bit integer, in [-8, 7] for b = 4) and its quantizer an 8-bit one with the same step s
    (amax_8 = 127 s). The int8 codes of the exported weights are then the b-bit integers themselves and the
    model's outputs are unchanged (up to float rounding of s). Returns the number of layers converted; ``weight_code_ranges``
    checks the exported graph."""
    n = 0
    for _name, m in unet.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if q is None or not getattr(q, "is_enabled", False) or not isinstance(q.num_bits, int) or q.num_bits >= 8:
            continue
        if q.amax is None:
            raise UncalibratedQuantizerError(f"{_name}.weight_quantizer has no amax: calibrate before converting")
        with torch.no_grad():
            step = q.amax.detach().float() / q.maxbound
            m.weight.data = q(m.weight).detach()
            q.num_bits = 8
            q.amax = step * q.maxbound
        n += 1
    return n


def check_calibrated(unet: nn.Module) -> int:
    """Raise ``UncalibratedQuantizerError`` naming every enabled quantizer without a finite, positive
    amax; returns the number of enabled quantizers checked."""
    bad = []
    n = 0
    for name, q in all_quantizers(unet).items():
        if not q.is_enabled:
            continue
        n += 1
        amax = q.amax
        if amax is None:
            bad.append(f"{name} (no amax)")
        elif not torch.isfinite(amax).all():
            bad.append(f"{name} (non-finite amax)")
        elif not (amax > 0).all():
            bad.append(f"{name} (amax <= 0 in {(amax <= 0).sum().item()} of {amax.numel()} channels)")
    if bad:
        raise UncalibratedQuantizerError(
            f"{len(bad)} of {n} enabled quantizers have no usable range (they would quantize with a dynamic "
            f"per-batch range): {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    return n
