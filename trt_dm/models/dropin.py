"""A diffusers drop-in: any trt_dm denoiser (TensorRT engine, ONNX Runtime or OpenVINO graph, torch fake-quant or
FP) behind the UNet's forward signature, so a user's existing diffusers pipeline runs it unchanged:

    from trt_dm import api
    from trt_dm.models.dropin import DropInUNet
    loaded = api.load("path/to/sd-pipeline")
    with api.open_denoiser(loaded, engines=["engines/sd-ptq4dm.plan"]) as den:
        pipe = StableDiffusionPipeline.from_pretrained("path/to/sd-pipeline")
        pipe.unet = DropInUNet(loaded, den)
        image = pipe("a red apple", generator=torch.Generator().manual_seed(0)).images[0]

A DiT goes into diffusers' ``DiTPipeline`` the same way (``pipe.transformer = DropInUNet(loaded, den)``); for a DiT
with learned variance the output carries a zero variance half after the noise, which the pipeline drops.

The object carries what diffusers pipelines read from a UNet (``config``, ``dtype``, ``device``, ``in_channels``,
``add_embedding``'s input width for SDXL) and returns the usual output class; the timestep (a scalar or one per row)
is broadcast to one per row, as the runners take it. An SD3 transformer goes into diffusers'
``StableDiffusion3Pipeline`` as ``pipe.transformer``: its ``hidden_states`` and ``pooled_projections`` feed the
graph's ``sample`` and ``text_embeds``; a PixArt transformer into ``PixArtSigmaPipeline`` (its
``encoder_attention_mask`` feeds the graph's input of that name; added conditioning given as None, as PixArt-Sigma's
resolution and aspect ratio, is ignored); a Flux transformer into ``FluxPipeline`` (its packed latents, position
ids and time / 1000 become the graph's unpacked sample and sigma x 1000, the velocity is packed again). An
SDXL-layout UNet's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) feed the graph's inputs of those names.
Forward arguments the deployed graph has no input for (``timestep_cond``, ``cross_attention_kwargs``, other added
conditioning, adapters and ControlNet residuals) are refused with a clear error instead of being dropped silently.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from trt_dm.models.denoisers import image_ids, pack_latents, unpack_latents

_REFUSED = ("timestep_cond", "attention_mask", "cross_attention_kwargs",
            "down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals",
            "encoder_attention_mask")


class DropInUNet(nn.Module):
    """``loaded``'s UNet interface over ``denoiser`` (an open ``trt_dm.api.Denoiser`` or any denoiser callable)."""

    def __init__(self, loaded, denoiser) -> None:
        super().__init__()
        self._flux = loaded.kind == "FluxTransformer2DModel"  # packed latents in and out (see _flux_inputs)
        self._denoiser = denoiser
        self.config = loaded.unet.config  # diffusers' FrozenDict: attribute and key access, as pipelines use it
        self._names = loaded.signature.names
        self._time_dtype = loaded.signature["timestep"].dtype  # int64, or a flow model's float32 time input
        self._device = torch.device(getattr(denoiser, "device", "cpu"))
        # SDXL's pipeline checks its time ids against the added embedding's input width; other pipelines read None
        width = loaded.config.get("projection_class_embeddings_input_dim") if "time_ids" in self._names else None
        self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width)) if width else None
        # a DiT with learned variance (out_channels 2 x in_channels): its output, as DiTPipeline reads it, holds the
        # noise then the variance half; the graph gives the noise only (trt_dm.models.denoisers.DiTDenoiser)
        self._variance = loaded.kind in ("DiTTransformer2DModel", "PixArtTransformer2DModel") and \
            loaded.config.get("out_channels") == 2 * loaded.config.get("in_channels")

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers' cache-hook scope (FluxPipeline enters one per CFG branch): a deployed graph caches nothing."""
        yield

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # runners take and return float32 at their interface

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def forward(self, sample: torch.Tensor | None = None, timestep: torch.Tensor | float | int | None = None,
                encoder_hidden_states: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs: Any):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
        added = {k: v for k, v in (kwargs.pop("added_cond_kwargs", None) or {}).items() if v is not None}
        named = {}  # transformers' own names for graph inputs
        if "encoder_attention_mask" in self._names and kwargs.get("encoder_attention_mask") is not None:
            named["encoder_attention_mask"] = kwargs.pop("encoder_attention_mask")  # PixArt: T5's padding mask
        if sample is None:  # a transformer's pipeline names it hidden_states
            sample = kwargs.pop("hidden_states", None)
        if kwargs.get("pooled_projections") is not None:  # SD3: the pooled text embedding, our text_embeds input
            named["text_embeds"] = kwargs.pop("pooled_projections")
        if not kwargs.get("joint_attention_kwargs"):
            kwargs.pop("joint_attention_kwargs", None)
        if sample is None or timestep is None:
            raise ValueError("DropInUNet: give sample (or hidden_states) and timestep")
        grid = None
        if self._flux:
            sample, timestep, grid = _flux_inputs(sample, timestep, kwargs.pop("img_ids", None),
                                                  kwargs.pop("txt_ids", None))
            guidance = kwargs.pop("guidance", None)  # None for a model without embedded guidance
            if guidance is not None:
                named["guidance"] = guidance
        given = sorted(k for k in _REFUSED if kwargs.get(k) is not None)
        unknown = sorted(k for k in kwargs if k not in _REFUSED)
        if added and "time_ids" not in self._names:
            given.append("added_cond_kwargs")
        if given or unknown:
            raise ValueError(f"DropInUNet: {given + unknown} cannot be fed to the deployed UNet (its graph inputs are "
                             f"{self._names})")
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t.reshape(1) if t.ndim == 0 else t).to(self._time_dtype).expand(b) if t.numel() in (1, b) else None
        if t is None:
            raise ValueError(f"DropInUNet: timestep has {torch.as_tensor(timestep).numel()} values for a batch of {b}")
        extra = {}
        if "time_ids" in self._names:
            if set(added) != {"text_embeds", "time_ids"}:
                raise ValueError(f"DropInUNet: the deployed SDXL-layout UNet needs added_cond_kwargs with exactly "
                                 f"text_embeds and time_ids, got {sorted(added)}")
            added["time_ids"] = added["time_ids"].reshape(b, -1)  # diffusers passes (B, 6)
        for name, value in (("encoder_hidden_states", encoder_hidden_states), ("class_labels", class_labels),
                            *added.items(), *named.items()):
            if name in self._names:
                if value is None:
                    raise ValueError(f"DropInUNet: the deployed UNet needs {name}")
                extra[name] = value.float() if value.is_floating_point() else value
            elif value is not None:
                raise ValueError(f"DropInUNet: {name} was given, but the deployed UNet has no such input")
        out = self._denoiser(sample.float(), t.contiguous(), **extra).to(sample.dtype)
        if self._variance:  # a learned-variance DiT: the deployed graph predicts the noise only, and diffusers'
            out = torch.cat([out, torch.zeros_like(out)], dim=1)  # DiTPipeline splits the variance half off unused
        if grid is not None:  # Flux: the velocity packed as the pipeline's latents are
            out = pack_latents(out)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def _flux_inputs(packed: torch.Tensor, timestep, img_ids, txt_ids):
    """FluxPipeline's transformer inputs -> the deployed graph's: the packed latents (B, H/2 * W/2, 4C) unpacked to
    (B, C, H, W) on the grid its ``img_ids`` give (the pipeline's own: rows and columns from 0, nothing else), the
    time sigma (the pipeline passes timestep / 1000) as sigma x 1000; ``txt_ids`` must be zeros, as the pipeline's
    are (the graph makes them). Returns (sample, timestep, (H/2, W/2)). Other position ids are refused."""
    if img_ids is None or packed.ndim != 3:
        raise ValueError("DropInUNet: a Flux transformer takes packed hidden_states (B, tokens, channels) and img_ids, "
                         "as FluxPipeline passes them")
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # (L, 3); diffusers still accepts a batched (B, L, 3)
    h2, w2 = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if ids.shape != (packed.shape[1], 3) or not torch.equal(ids, image_ids(h2, w2, ids.dtype, ids.device)) or \
            (txt_ids is not None and bool(torch.as_tensor(txt_ids).any())):
        raise ValueError("DropInUNet: the deployed Flux graph makes FluxPipeline's own position ids (image rows and "
                         "columns from 0, text ids zero); these img_ids / txt_ids differ (another pipeline's "
                         "conditioning tokens or offsets), which it cannot take")
    return unpack_latents(packed, h2, w2), torch.as_tensor(timestep) * 1000, (h2, w2)
