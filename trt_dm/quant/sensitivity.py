"""Which layers and blocks to keep in high precision: per-layer sensitivity (one layer quantized at a time) and
per-block leave-one-out sensitivity of the prediction the sampler uses, with each block's share of the MACs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trt_dm.core.guidance import Guidance, cfg_denoiser
from trt_dm.core.ranges import RangeSet, group_index
from trt_dm.models.loading import LoadedModel
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.calibrate import calibrate, fp_calibration_set
from trt_dm.quant.config import CALIB_CACHE_ROOT, QuantConfig
from trt_dm.quant.fakequant import fake_quant_unet
from trt_dm.quant.modules import (
    apply_ranges,
    quantized_layers,
)
from trt_dm.runtime.torch_runner import unet_denoiser


def layer_sensitivity(loaded: LoadedModel, spec: CalibSpec, recipe: str, *, cache_root: Path = CALIB_CACHE_ROOT,
                      weight_bits: int = 8, n: int = 64, batch_size: int = 64, progress: bool = True) -> list[dict]:
    """Per-layer sensitivity: quantize ONE layer at a time (input + weights, ranges from ``recipe`` with
    no layer excluded), everything else FP, and measure the noise-prediction error on ``n`` calibration
    samples: relative MSE = mean (eps_q - eps_fp)^2 / mean eps_fp^2. Sorted, most sensitive first."""
    qcfg = QuantConfig(weight_bits=weight_bits, exclude=())
    res = calibrate(loaded, spec, qcfg, recipe, cache_root=cache_root, batch_size=batch_size, progress=progress)
    qunet = fake_quant_unet(loaded, qcfg, res.ranges)
    layers = quantized_layers(qunet)
    small = dataclasses.replace(spec, n=min(n, spec.n), seed=spec.seed + 1)  # held-out trajectories
    calib, _ = fp_calibration_set(loaded, small, batch_size=batch_size, progress=False)
    with torch.no_grad():
        ref = torch.cat([loaded.unet(x, t, **c).sample for x, t, c in calib.batches(batch_size)])
    for m in layers.values():
        m.input_quantizer.disable()
        m.weight_quantizer.disable()
    rows = []
    from tqdm.auto import tqdm
    with torch.no_grad():
        for name, m in tqdm(layers.items(), desc="sensitivity", unit="layer", disable=not progress):
            m.input_quantizer.enable()
            m.weight_quantizer.enable()
            out = torch.cat([qunet(x, t, **c).sample for x, t, c in calib.batches(batch_size)])
            m.input_quantizer.disable()
            m.weight_quantizer.disable()
            rel = float((out - ref).double().square().mean() / ref.double().square().mean())
            rows.append({"layer": name, "rel_mse": rel, "type": type(m).__name__.removeprefix("Quant")})
    rows.sort(key=lambda r: -r["rel_mse"])
    return rows



def block_of(layer: str) -> str:
    """The block a layer belongs to: ``down_blocks.i.resnets.j`` / ``.attentions.j`` / ``.downsamplers.0`` (and
    ``up_blocks`` alike), ``mid_block.resnets.j``, a DiT's ``transformer_blocks.i``; other layers (``conv_in``,
    ``time_embedding``, ``proj_out_1``) by their first part."""
    parts = layer.split(".")
    if parts[0] == "transformer_blocks" and len(parts) > 2:  # a DiT's block: transformer_blocks.i
        return ".".join(parts[:2])
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4:
        return ".".join(parts[:4])
    if parts[0] == "mid_block" and len(parts) > 3:
        return ".".join(parts[:3])
    return parts[0]



def layer_macs(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, int]:
    """Multiply-accumulates of every convolution and linear layer of ``unet`` for one row (``x`` of batch 1)."""
    macs: dict[str, int] = {}

    def hook(name):
        def f(m, _inp, out):
            if isinstance(m, torch.nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
                macs[name] = out.numel() * k
            else:
                macs[name] = out.numel() * m.in_features
        return f

    hooks = [m.register_forward_hook(hook(n)) for n, m in unet.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            unet(x, t, **cond)
    finally:
        for h in hooks:
            h.remove()
    return macs



class LeaveOut:
    """The quantized model's prediction error with some quantizers turned off, on a held-out calibration set: the
    prediction the sampler uses (guided under CFG), each row with its timestep group's ranges."""

    def __init__(self, loaded: LoadedModel, qunet: torch.nn.Module, ranges: RangeSet, calib, guidance: Guidance,
                 qcfg: QuantConfig, batch_size: int) -> None:
        self.qunet, self.ranges, self.calib, self.guidance, self.batch_size = qunet, ranges, calib, guidance, batch_size
        self.groups = (group_index(calib.t, ranges.t_ranges) if ranges.is_grouped
                       else torch.zeros(len(calib.t), dtype=torch.int64))
        # learned rounding stores its weights already on the grid: a layer kept in FP gets its FP weights back
        self.fp_weights: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # id(weight quantizer) -> (layer, FP)
        if qcfg.rounding != "nearest":
            fp_layers = dict(loaded.unet.named_modules())
            self.fp_weights = {id(m.weight_quantizer): (m, fp_layers[name].weight.detach())
                               for name, m in qunet.named_modules() if hasattr(m, "weight_quantizer")}
        self.ref = self.predict(loaded.unet)
        self.end = calib.t < loaded.schedule().num_train_timesteps // 10

    def predict(self, unet: torch.nn.Module, k: int | None = None) -> torch.Tensor:
        """``unet``'s (guided) prediction on every calibration row, or on the rows of timestep group ``k``."""
        calib = self.calib
        den = cfg_denoiser(unet_denoiser(unet), self.guidance)
        rows = torch.arange(len(calib.t)) if k is None else torch.nonzero(self.groups == k).flatten()
        with torch.no_grad():
            return torch.cat([den(calib.x[r], calib.t[r], **{c: v[r] for c, v in calib.cond.items()})
                              for r in rows.split(self.batch_size)])

    def quantized_prediction(self, disabled: list) -> torch.Tensor:
        """The quantized model's prediction with the ``disabled`` quantizers off (their layers' FP weights back)."""
        out = torch.empty_like(self.calib.x)
        swapped = [self.fp_weights[id(q)] for q in disabled if id(q) in self.fp_weights]
        rounded = [layer.weight.data for layer, _ in swapped]
        for layer, w in swapped:
            layer.weight.data = w
        try:
            for k in torch.unique(self.groups).tolist():
                apply_ranges(self.qunet, self.ranges.amax(k))  # with every quantizer enabled: it checks the names
                for q in disabled:
                    q.disable()
                try:
                    out[self.groups == k] = self.predict(self.qunet, k)
                finally:
                    for q in disabled:
                        q.enable()
        finally:
            for (layer, _), w in zip(swapped, rounded):
                layer.weight.data = w
        return out

    def errors(self, disabled: list, full: float | None = None, rows: dict[str, torch.Tensor] | None = None) -> dict:
        """Relative MSE vs FP with ``disabled`` quantizers off, at the data end, and the share of ``full`` removed;
        ``rows``: more row masks (name -> bool per row), each giving ``rel_mse_<name>`` (None where it selects none)."""
        ref = self.ref
        d = (self.quantized_prediction(disabled) - ref).double().square()
        rel = float(d.mean() / ref.double().square().mean())
        removed = None if full is None else (1 - rel / full if full > 0 else 0.0)
        at = {f"rel_mse_{name}": float(d[mask].mean() / ref[mask].double().square().mean()) if mask.any() else None
              for name, mask in {"data_end": self.end, **(rows or {})}.items()}
        return {"rel_mse": rel, "rel_mse_data_end": at.pop("rel_mse_data_end"), "removed": removed, **at}


def _quantizers_by_block(qunet: torch.nn.Module) -> tuple[dict[str, list], set[int]]:
    """(block -> its enabled quantizers, ids of the weight quantizers among them; the rest quantize activations)."""
    quantizers: dict[str, list] = {}
    weight_qs: set[int] = set()
    for name, m in qunet.named_modules():
        if type(m).__name__ == "TensorQuantizer" and m.is_enabled:
            owner = name.rsplit(".", 1)[0]
            quantizers.setdefault(block_of(owner), []).append(m)
            if name.endswith("weight_quantizer"):
                weight_qs.add(id(m))
    return quantizers, weight_qs


def block_sensitivity(loaded: LoadedModel, spec: CalibSpec, qcfg: QuantConfig, recipe: str, *,
                      cache_root: Path = CALIB_CACHE_ROOT, n: int = 64, batch_size: int = 64,
                      cumulative: int = 4, progress: bool = True) -> dict:
    """Which blocks to keep in high precision: the model quantized as ``qcfg`` and ``recipe`` say (its timestep
    groups applied by timestep, its exclusions kept), then one block at a time kept in FP (leave-one-out), and
    the error of the prediction the sampler uses, on ``n`` held-out calibration samples: with guidance the guided
    eps_u + w (eps_c - eps_u), whose error is not the per-half error the per-layer report measures. Relative MSE
    vs FP overall and at the data end (t < T/10), with each block's share of the convolution and linear MACs; then
    the first 2 .. ``cumulative`` blocks of that ranking kept in FP together ("together"); and the error with only
    the weights or only the activations quantized ("weights_only", "activations_only"), and in each of those first
    blocks, the share removed by its weights alone or its activations alone in FP."""
    res = calibrate(loaded, spec, qcfg, recipe, cache_root=cache_root, batch_size=batch_size, progress=progress)
    qunet = fake_quant_unet(loaded, qcfg, res.ranges, weights=res.weights_path)
    small = dataclasses.replace(spec, n=min(n, spec.n), seed=spec.seed + 1)  # held-out trajectories
    calib, guidance = fp_calibration_set(loaded, small, batch_size=batch_size, progress=False)
    leave = LeaveOut(loaded, qunet, res.ranges, calib, guidance, qcfg, batch_size)
    quantizers, weight_qs = _quantizers_by_block(qunet)
    layers = quantized_layers(qunet)

    def of_kind(qs: list, weights: bool) -> list:
        return [q for q in qs if (id(q) in weight_qs) == weights]
    macs = layer_macs(loaded.unet, calib.x[:1], calib.t[:1], {c: v[:1] for c, v in calib.cond.items()})
    total = sum(macs.values())
    full = leave.errors([])
    rows = []
    for block, qs in tqdm(sorted(quantizers.items()), desc="block sensitivity", unit="block", disable=not progress):
        names = [n for n in layers if block_of(n) == block]
        rows.append({"block": block, "layers": len(names), "pattern": block if names == [block] else block + ".*",
                     "macs_share": sum(macs.get(n, 0) for n in names) / total,
                     **leave.errors(qs, full["rel_mse"])})
    rows.sort(key=lambda r: -r["removed"])
    together = []  # errors do not add up: the first k blocks of the ranking kept in FP together
    for k in range(2, min(cumulative, len(rows)) + 1):
        top = rows[:k]
        together.append({"blocks": [r["block"] for r in top], "patterns": [r["pattern"] for r in top],
                         "macs_share": sum(r["macs_share"] for r in top),
                         **leave.errors([q for r in top for q in quantizers[r["block"]]], full["rel_mse"])})
    # Weights or activations? The error with only one kind quantized, over the model and in each of the first
    # blocks of the ranking (the share of the error removed by that block's weights / activations alone in FP):
    # int8 weights with int16 or FP16 activations (or the reverse) is a different deployment question.
    every = [q for qs in quantizers.values() for q in qs]
    kinds = {"weights_only": leave.errors(of_kind(every, False), full["rel_mse"]),
             "activations_only": leave.errors(of_kind(every, True), full["rel_mse"])}
    for r in rows[:cumulative]:
        r["removed_by_weights"] = leave.errors(of_kind(quantizers[r["block"]], True), full["rel_mse"])["removed"]
        r["removed_by_activations"] = leave.errors(of_kind(quantizers[r["block"]], False), full["rel_mse"])["removed"]
    return {"recipe": recipe, "guidance_scale": guidance.scale, "n": len(calib.t), "rel_mse": full["rel_mse"],
            "rel_mse_data_end": full["rel_mse_data_end"], **kinds,
            "quantized_macs_share": sum(macs.get(n, 0) for n in layers) / total, "blocks": rows, "together": together}
