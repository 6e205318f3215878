"""Fake-quant models of a calibration: the UNet with modelopt quantizers and the recipe's ranges (per timestep
segment for ``--keep-fp-from-t``), and denoisers over them (timestep groups switched per row)."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from trt_dm.core.ranges import RangeSet
from trt_dm.models.loading import LoadedModel
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.modules import (
    apply_ranges,
    quantize_model,
    range_names,
    range_switch,
    sharing_copy,
)
from trt_dm.runtime.base import as_denoiser, switched_denoiser
from trt_dm.runtime.torch_runner import TorchRunner, unet_denoiser


def fake_quant_unet(loaded: LoadedModel, qcfg: QuantConfig, ranges: RangeSet, *,
                    fold_weights: bool = False, weights: Path | None = None, share_weights: bool = False
                    ) -> torch.nn.Module:
    """A fake-quant copy of the UNet with ``ranges`` applied and checked. For groups=K ranges the first
    group's values are applied; ``grouped_denoiser`` switches groups by timestep.

    ``fold_weights``: store each weight already fake-quantized and disable its weight quantizer
    (ModelOpt's ``fold_weight``), so sampling does not re-quantize the weights on every call. The
    outputs are bit-identical; the model can then no longer be exported (the weight Q/DQ are gone), so
    evaluation uses it and export does not.

    ``share_weights``: the copy shares the FP model's weight tensors (``sharing_copy``) where nothing rewrites them
    (no folding, nearest rounding): for callers that only read the model (export, its checks)."""
    if qcfg.fp_from_t is not None:
        raise ValueError("a config with --keep-fp-from-t is two models (one per timestep segment): use segment_unets")
    return _finish(quantize_model(_copy(loaded.unet, qcfg, fold_weights, share_weights), qcfg), qcfg, ranges,
                   fold_weights, weights)


def _copy(unet: torch.nn.Module, qcfg: QuantConfig, fold_weights: bool, share: bool) -> torch.nn.Module:
    """The FP UNet's copy to quantize: sharing its weights when asked and nothing will rewrite them (no folding, no
    learned rounding, no W<8 weights, which export stores on the int8 grid in place, no channel balancing)."""
    safe = share and not fold_weights and qcfg.rounding == "nearest" and qcfg.weight_bits >= 8 and not qcfg.smooth
    return sharing_copy(unet) if safe else copy.deepcopy(unet)



def _finish(qunet: torch.nn.Module, qcfg: QuantConfig, ranges: RangeSet, fold_weights: bool,
            weights: Path | None) -> torch.nn.Module:
    if qcfg.smooth:  # weights: the balancing factors (calibrate's weights_path), applied before the input ranges
        if weights is None:
            raise ValueError("--smooth needs the channel balancing factors (calibrate's weights_path)")
        from trt_dm.quant.calib import smooth
        # a segment's layers kept in FP (--keep-fp-from-t: the noisy steps) stay unbalanced, as they stay unquantized
        smooth.apply(qunet, {n: s for n, s in smooth.load(weights).items() if not qcfg.excludes(n)})
    apply_ranges(qunet, ranges.amax(0))
    if qcfg.rounding != "nearest":
        if weights is None:
            raise ValueError(f"rounding {qcfg.rounding!r} needs the reconstructed weights (calibrate's weights_path)")
        from trt_dm.quant.calib.reconstruct import apply_weights, load_weights
        apply_weights(qunet, load_weights(weights))
    if fold_weights:
        import modelopt.torch.quantization as mtq
        mtq.fold_weight(qunet)
    return qunet



@dataclass
class Segment:
    """The fake-quant model of the timesteps ``t_range`` ((t_max, t_min); None: every step) and its ranges."""
    t_range: tuple[int, int] | None
    qcfg: QuantConfig
    unet: torch.nn.Module
    ranges: RangeSet



def segment_unets(loaded: LoadedModel, qcfg: QuantConfig, ranges: RangeSet, *, fold_weights: bool = False,
                  weights: Path | None = None, share_weights: bool = False) -> list[Segment]:
    """``fake_quant_unet`` per timestep segment of ``qcfg`` (``QuantConfig.segments``): one model, or with
    ``fp_from_t`` the noisy steps' (``noisy_fp`` layers unquantized, their ranges dropped) and the other steps',
    each with the range groups of its timesteps (``RangeSet.clip``)."""
    out = []
    for t_range, q in qcfg.segments(int(loaded.scheduler_config["num_train_timesteps"])):
        qunet = quantize_model(_copy(loaded.unet, q, fold_weights, share_weights), q)
        r = ranges.subset(range_names(qunet, q)).clip(*t_range) if t_range is not None else ranges
        out.append(Segment(t_range, q, _finish(qunet, q, r, fold_weights, weights), r))
    return out



def fake_quant_denoiser(loaded: LoadedModel, qcfg: QuantConfig, ranges: RangeSet, *, weights: Path | None = None,
                        stack: contextlib.ExitStack):
    """(denoiser, describe) of the fake-quant model on the CPU: its range groups switched by t
    (``grouped_denoiser``), its segments too (``fp_from_t``); runners entered on ``stack``."""
    segs = segment_unets(loaded, qcfg, ranges, fold_weights=True, weights=weights)
    fns, runner = [], None
    for s in segs:
        runner = stack.enter_context(TorchRunner(s.unet, device="cpu", dtype=torch.float32, name="fakequant"))
        fns.append(grouped_denoiser(s.unet, s.ranges) if s.ranges.is_grouped else as_denoiser(runner))
    describe = {"runner": runner.name, "groups": len(ranges.groups)}
    if len(segs) == 1:
        return fns[0], describe
    return switched_denoiser(fns, [s.t_range for s in segs]), {**describe, "t_ranges": [s.t_range for s in segs]}



def grouped_denoiser(qunet: torch.nn.Module, ranges: RangeSet):
    """Denoiser over a fake-quant UNet whose ranges are per timestep group (groups=K): each row is run with the
    range set of the group holding its timestep, the torch analogue of K engines switched by t (the runtime's
    ``switched_denoiser``, here over one module whose ranges are swapped when the group changes)."""
    bounds = ranges.t_ranges
    if bounds is None:
        raise ValueError("grouped_denoiser needs groups=K ranges; pooled ranges are one fake-quant model")
    current: list[int] = [-1]
    use = range_switch(qunet, ranges)
    call = unet_denoiser(qunet)

    def group(k: int):
        def run(x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
            if k != current[0]:
                use(k)
                current[0] = k
            return call(x, t, **extra)
        return run

    return switched_denoiser([group(k) for k in range(len(bounds))], bounds)


@dataclass(frozen=True)
class FakeQuant:
    """The fake-quant model of a calibration (its ranges, and reconstructed ``weights`` for learned rounding) as
    a source the runtime opens (``trt_dm.runtime.open.open_denoiser(torch_source=...)``)."""
    loaded: LoadedModel
    qcfg: QuantConfig
    ranges: RangeSet
    weights: Path | None = None

    def open(self, stack: contextlib.ExitStack):
        return fake_quant_denoiser(self.loaded, self.qcfg, self.ranges, weights=self.weights, stack=stack)
