"""The denoiser classes ``load_model`` builds, behind one forward interface: ``denoiser(sample, timestep,
**conditioning).sample`` is the model's noise prediction, with the inputs ``trt_dm.core.signature`` describes.

diffusers' UNets have that interface already. Transformers get a subclass whose ``forward`` takes the same named
inputs (so the state dict, module names and config stay diffusers', and the ONNX graph's inputs are the signature's)
and returns the noise prediction alone:

- ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (SDXL's layout): its ``added_cond_kwargs`` become
  two more named inputs, ``text_embeds`` (the second text encoder's pooled embedding) and ``time_ids`` (the six
  micro-conditioning numbers: original height and width, crop top and left, target height and width, in pixels).
- ``DiTTransformer2DModel`` (Peebles & Xie 2023; diffusers' ``DiTPipeline``): class-conditional through adaLN-Zero,
  the class embedding table holding one more row, the null label ``num_embeds_ada_norm`` that classifier-free
  guidance uses. With a learned variance (``out_channels`` = 2 x ``in_channels``) the variance half is dropped: the
  DDPM / DDIM samplers here use fixed variances, as diffusers' ``DiTPipeline`` does when it splits the output.
- ``PixArtTransformer2DModel`` (PixArt-alpha / -Sigma): a DiT with adaLN-single, cross-attention to T5's tokens
  and their padding mask: inputs ``encoder_hidden_states`` (B, S, caption_channels) and ``encoder_attention_mask``
  (B, S; 1 = a token, 0 = padding), the timestep an integer as for DDPM; a learned variance half is dropped as for DiT.
  PixArt-alpha's 1024-px resolution / aspect-ratio conditioning (``use_additional_conditions``) is refused.
- ``FluxTransformer2DModel`` (Flux.1: MMDiT and single-stream blocks, rectified flow): the denoiser takes the latent
  unpacked, ``sample`` (B, in_channels / 4, H, W), and packs it into 2x2 patches itself (FluxPipeline's
  ``_pack_latents``), with the image and text position ids computed from H, W and the text length (as the pipeline
  makes them); ``timestep`` is sigma x 1000 like SD3's (the model gets sigma, as the pipeline passes ``t / 1000``),
  ``encoder_hidden_states`` T5's tokens, ``text_embeds`` CLIP-L's pooled output, and with ``guidance_embeds``
  (Flux.1-dev) ``guidance`` (B,), the embedded guidance scale. The config has no sample size: 128 (1024 px,
  FluxPipeline's default) unless trt_dm.json names one.
- ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5's MMDiT): text tokens and image patches in joint attention,
  a rectified-flow model (it predicts the velocity; its pipelines sample with ``FlowMatchEulerDiscreteScheduler``,
  ``trt_dm.core.flow``). Inputs: ``encoder_hidden_states`` (B, S, joint_attention_dim: CLIP-L and CLIP-G hidden
  states side by side, zero-padded to T5's width, then T5's tokens), ``text_embeds`` (B, pooled_projection_dim: the
  two CLIP pooled embeddings, diffusers' ``pooled_projections``) and the timestep as a float (sigma x 1000).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from trt_dm.core.errors import InputError
from trt_dm.core.flow import FlowSchedule
from trt_dm.core.guidance import check_interval
from trt_dm.core.signature import SDXL_TIME_IDS


class _SavedAsDiffusers:
    """A denoiser subclass saves (``save_pretrained``, ``to_json_string``) the config of the diffusers class it
    subclasses: ``_class_name`` names ``trt_dm_kind``, so the directory loads in diffusers and here alike."""
    trt_dm_kind: str

    def to_json_string(self) -> str:
        config = json.loads(super().to_json_string())
        config["_class_name"] = self.trt_dm_kind
        self._internal_dict["_class_name"] = self.trt_dm_kind  # diffusers writes its own class name there too
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


class DiTDenoiser(_SavedAsDiffusers, DiTTransformer2DModel):
    """A DiT as a denoiser: ``forward(sample, timestep, class_labels)`` -> ``.sample`` = the predicted noise."""
    trt_dm_kind = "DiTTransformer2DModel"  # the class its config names

    def forward(self, sample, timestep=None, class_labels=None, return_dict: bool = True):
        out = super().forward(sample, timestep=timestep, class_labels=class_labels).sample
        eps = out[:, : self.config.in_channels]
        return Transformer2DModelOutput(sample=eps) if return_dict else (eps,)


def _unit_dim(module, args, out):
    return out.unsqueeze(1)


class PixArtDenoiser(_SavedAsDiffusers, PixArtTransformer2DModel):
    """A PixArt transformer as a denoiser: ``forward(sample, timestep, encoder_hidden_states, encoder_attention_mask)``
    -> ``.sample`` = the predicted noise (the variance half dropped)."""
    trt_dm_kind = "PixArtTransformer2DModel"

    def forward(self, sample, timestep=None, encoder_hidden_states=None, encoder_attention_mask=None,
                return_dict: bool = True):
        # diffusers squeezes proj_out's (B, tokens, C) output at dim 1, a no-op with more than one token, which the
        # ONNX exporter turns into an If whose squeeze branch ONNX Runtime rejects: a unit dimension added by a hook
        # is what that squeeze removes (module names and weights stay diffusers'; quantized copies get it too)
        if not getattr(self.proj_out, "_trt_dm_unit_dim", False):
            self.proj_out.register_forward_hook(_unit_dim)
            self.proj_out._trt_dm_unit_dim = True
        out = super().forward(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                              encoder_attention_mask=encoder_attention_mask).sample
        eps = out[:, : self.config.in_channels]
        return Transformer2DModelOutput(sample=eps) if return_dict else (eps,)


def _rotary(x: torch.Tensor, freqs_cis, sequence_dim: int = 1, **_) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` as Flux calls it (real cos / sin, pairs interleaved in the last dimension),
    with ``unflatten`` where diffusers reshapes to ``x.shape[:-1]``: the same arithmetic, but the ONNX exporter keeps
    the batch dynamic instead of freezing the traced one."""
    cos, sin = freqs_cis
    if sequence_dim == 1:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[None, None], sin[None, None]
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos.to(x.device) + x_rotated.float() * sin.to(x.device)).to(x.dtype)


@contextlib.contextmanager
def _traceable_rotary():
    import diffusers.models.transformers.transformer_flux as flux
    original, flux.apply_rotary_emb = flux.apply_rotary_emb, _rotary
    try:
        yield
    finally:
        flux.apply_rotary_emb = original


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> FluxPipeline's packed latents (B, H/2 * W/2, 4C): 2x2 patches, row-major."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack_latents(packed: torch.Tensor, h2: int, w2: int) -> torch.Tensor:
    """``pack_latents`` undone for a grid of h2 x w2 patches: (B, h2 * w2, 4C) -> (B, C, 2 h2, 2 w2)."""
    b, _, c4 = packed.shape
    return packed.reshape(b, h2, w2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, 2 * h2, 2 * w2)


def image_ids(h2: int, w2: int, dtype: torch.dtype, device) -> torch.Tensor:
    """FluxPipeline's image position ids of an h2 x w2 patch grid: (h2 * w2, 3), rows (0, row, column)."""
    ids = torch.zeros(h2, w2, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(h2, device=device)[:, None].to(dtype)
    ids[..., 2] = torch.arange(w2, device=device)[None, :].to(dtype)
    return ids.reshape(-1, 3)


class FluxDenoiser(_SavedAsDiffusers, FluxTransformer2DModel):
    """A Flux transformer as a denoiser: ``forward(sample, timestep, encoder_hidden_states, text_embeds[, guidance])``
    on the unpacked latent -> ``.sample`` = the predicted velocity, unpacked."""
    trt_dm_kind = "FluxTransformer2DModel"

    def forward(self, sample, timestep=None, encoder_hidden_states=None, text_embeds=None, guidance=None,
                return_dict: bool = True):
        h, w = sample.shape[2:]
        packed = pack_latents(sample)
        txt_ids = torch.zeros_like(encoder_hidden_states[0, :, :3], dtype=sample.dtype)  # (S, 3): S stays dynamic
        with _traceable_rotary():
            out = super().forward(packed, encoder_hidden_states=encoder_hidden_states, pooled_projections=text_embeds,
                                  timestep=timestep / 1000,
                                  img_ids=image_ids(h // 2, w // 2, sample.dtype, sample.device), txt_ids=txt_ids,
                                  guidance=guidance).sample
        out = unpack_latents(out, h // 2, w // 2)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class SD3Denoiser(_SavedAsDiffusers, SD3Transformer2DModel):
    """An MMDiT as a denoiser: ``forward(sample, timestep, encoder_hidden_states, text_embeds)`` -> ``.sample`` =
    the predicted velocity."""
    trt_dm_kind = "SD3Transformer2DModel"

    def forward(self, sample, timestep=None, encoder_hidden_states=None, text_embeds=None, return_dict: bool = True):
        out = super().forward(sample, encoder_hidden_states=encoder_hidden_states, pooled_projections=text_embeds,
                              timestep=timestep).sample
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class SDXLUNetDenoiser(_SavedAsDiffusers, UNet2DConditionModel):
    """An SDXL-layout UNet as a denoiser: ``forward(sample, timestep, encoder_hidden_states, text_embeds, time_ids)``,
    the added conditioning as named inputs instead of the ``added_cond_kwargs`` dict."""
    trt_dm_kind = "UNet2DConditionModel"

    def forward(self, sample, timestep=None, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                return_dict: bool = True):
        return super().forward(sample, timestep, encoder_hidden_states,
                               added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                               return_dict=return_dict)


SUPPORTED_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel,
                     "DiTTransformer2DModel": DiTDenoiser, "PixArtTransformer2DModel": PixArtDenoiser,
                     "SD3Transformer2DModel": SD3Denoiser, "FluxTransformer2DModel": FluxDenoiser}
TRANSFORMERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
FLOW_MODELS = ("SD3Transformer2DModel", "FluxTransformer2DModel")  # rectified flow: float time inputs
# Flux.1's scheduler (dynamic shifting by the token count), for a transformer saved without its pipeline
FLUX_DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                          "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                          "max_image_seq_len": 4096}
FLUX_SAMPLE_SIZE = 128  # FluxPipeline's default latent size (1024 px)


def default_scheduler(kind: str) -> dict | None:
    """The scheduler config a flow transformer saved without its pipeline samples with (SD3's, Flux's); None: DDPM's."""
    return {"SD3Transformer2DModel": FLOW_DEFAULT_SCHEDULER, "FluxTransformer2DModel": FLUX_DEFAULT_SCHEDULER}.get(kind)


def schedule_for(kind: str, config: dict[str, Any], sched, sample_shape: tuple[int, int, int]):
    """The schedule as this model's pipeline samples it: a flow schedule gets its resolution shift for the model's
    token count (Flux: 2x2 packing), and Flux's levels are FluxPipeline's (sigmas linspace(1, 1/n, n))."""
    if not isinstance(sched, FlowSchedule):
        return sched
    _, h, w = sample_shape
    p = 2 if kind == "FluxTransformer2DModel" else int(config.get("patch_size") or 1)
    sched = sched.for_tokens((h // p) * (w // p))
    return dataclasses.replace(sched, levels_from="linspace") if kind == "FluxTransformer2DModel" else sched


def flux_sample_size(dirs: list[Path], error: type[Exception]) -> int:
    """The latent size a Flux transformer samples at: trt_dm.json's ``sample_size`` (the first of ``dirs`` holding
    one), else ``FLUX_SAMPLE_SIZE``; an even integer (2x2 packing)."""
    for d in dirs:
        f = d / "trt_dm.json"
        if f.is_file():
            size = json.loads(f.read_text(encoding="utf-8")).get("sample_size", FLUX_SAMPLE_SIZE)
            if not isinstance(size, int) or size < 2 or size % 2:
                raise error(f"{f}: sample_size {size!r}: accepted an even integer >= 2 (the latent's height and width, "
                            "packed 2x2 by Flux)")
            return size
    return FLUX_SAMPLE_SIZE
# The scheduler a denoiser directory without one samples with: DDPM's default for the DDPM-family models, and for
# the MMDiT Stable Diffusion 3's own (rectified flow, shift 3).
FLOW_DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# UNet config keys that need forward inputs this project does not describe (image embeddings, hint images).
_UNSUPPORTED_KEYS = ("encoder_hid_dim_type",)
ADDITION_EMBED_TYPES = (None, "text_time")


def added_cond_dims(config: dict[str, Any]) -> tuple[int, int] | None:
    """(width of ``text_embeds``, number of ``time_ids``) of an SDXL-layout UNet; None for any other denoiser."""
    if config.get("addition_embed_type") != "text_time":
        return None
    total, each = config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"]
    return int(total) - SDXL_TIME_IDS * int(each), SDXL_TIME_IDS


def pooled_dim(kind: str, config: dict[str, Any]) -> int | None:
    """The width of the pooled text embedding input ``text_embeds`` (SDXL-layout UNets, SD3, Flux), else None."""
    if kind == "SD3Transformer2DModel":
        return int(config.get("pooled_projection_dim", 2048))
    if kind == "FluxTransformer2DModel":
        return int(config.get("pooled_projection_dim", 768))
    dims = added_cond_dims(config)
    return dims[0] if dims else None


def denoiser_class(kind: str, config: dict[str, Any]) -> type:
    """The class ``load_model`` builds for a checked config: SDXL-layout UNets get ``SDXLUNetDenoiser``."""
    return SDXLUNetDenoiser if added_cond_dims(config) is not None else SUPPORTED_CLASSES[kind]
_CLASS_EMBED_TYPES = (None, "timestep", "projection")


def check_config(config: dict[str, Any], path: Path, error: type[Exception]) -> str:
    """The denoiser class named by ``config`` (its ``_class_name``), or ``error`` naming what is not supported."""
    kind = config.get("_class_name")
    if kind not in SUPPORTED_CLASSES:
        raise error(f"{path}: _class_name is {kind!r}, not a supported denoiser; supported: "
                    f"{', '.join(SUPPORTED_CLASSES)}")
    if kind == "FluxTransformer2DModel":
        c, out = config.get("in_channels", 64), config.get("out_channels") or config.get("in_channels", 64)
        if out != c or c % 4 or config.get("patch_size", 1) != 1:
            raise error(f"{path}: in_channels={c}, out_channels={out}, patch_size={config.get('patch_size', 1)}; "
                        "supported: Flux.1's layout (patch_size 1 on 2x2-packed latents: in_channels = out_channels = "
                        "4 x the latent's channels)")
        return kind
    if kind == "SD3Transformer2DModel":
        c, out = config.get("in_channels", 16), config.get("out_channels") or config.get("in_channels", 16)
        if out != c:
            raise error(f"{path}: out_channels={out} for in_channels={c}; supported: equal (the latent's velocity)")
        return kind
    if kind == "PixArtTransformer2DModel":
        extra = config.get("use_additional_conditions")
        if extra is None:  # diffusers' default: on at sample_size 128 (PixArt-alpha 1024 px)
            extra = config.get("sample_size", 128) == 128
        norm, captions = config.get("norm_type", "ada_norm_single"), config.get("caption_channels")
        if norm != "ada_norm_single" or extra or not captions:
            raise error(f"{path}: a PixArtTransformer2DModel with norm_type={norm!r}, use_additional_conditions="
                        f"{extra!r}, caption_channels={captions!r}; supported: norm_type 'ada_norm_single', no "
                        "resolution / aspect-ratio conditioning (PixArt-Sigma, PixArt-alpha below 1024 px; set "
                        "use_additional_conditions false), T5 captions")
    if kind in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        out, c = config.get("out_channels") or config.get("in_channels", 4), config.get("in_channels", 4)
        if out not in (c, 2 * c):
            raise error(f"{path}: out_channels={out} for in_channels={c}; supported: in_channels (the noise) or twice "
                        "that (noise and learned variance)")
    if kind == "PixArtTransformer2DModel":
        return kind
    if kind == "DiTTransformer2DModel":
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not config.get("num_embeds_ada_norm"):
            raise error(f"{path}: a DiTTransformer2DModel with norm_type={config.get('norm_type')!r} and "
                        f"num_embeds_ada_norm={config.get('num_embeds_ada_norm')!r}; supported: the class-conditional "
                        "DiT (norm_type 'ada_norm_zero', num_embeds_ada_norm = its class count)")
        out, c = config.get("out_channels") or config.get("in_channels"), config.get("in_channels")
        if out not in (c, 2 * c):
            raise error(f"{path}: out_channels={out} for in_channels={c}; supported: in_channels (the noise) or twice "
                        "that (noise and learned variance)")
        return kind
    for key in _UNSUPPORTED_KEYS:
        if config.get(key) is not None:
            raise error(f"{path}: {key}={config[key]!r} needs extra forward inputs that trt_dm does "
                        f"not describe; supported: {key}=None")
    addition = config.get("addition_embed_type")
    if addition not in ADDITION_EMBED_TYPES:
        raise error(f"{path}: addition_embed_type={addition!r} needs extra forward inputs that trt_dm does not "
                    f"describe (image embeddings or hints); supported: None or 'text_time' (SDXL's text_embeds and "
                    "time_ids)")
    if addition == "text_time":
        total, each = config.get("projection_class_embeddings_input_dim"), config.get("addition_time_embed_dim")
        if not isinstance(total, int) or not isinstance(each, int) or total - SDXL_TIME_IDS * each < 1:
            raise error(f"{path}: addition_embed_type 'text_time' with projection_class_embeddings_input_dim={total!r} "
                        f"and addition_time_embed_dim={each!r}; supported: integers with the first larger than "
                        f"{SDXL_TIME_IDS} x the second (the pooled text embedding plus {SDXL_TIME_IDS} time ids, SDXL "
                        "base's layout)")
        if kind != "UNet2DConditionModel":
            raise error(f"{path}: addition_embed_type 'text_time' on a {kind}; supported on UNet2DConditionModel")
    if config.get("class_embed_type") not in _CLASS_EMBED_TYPES:
        raise error(f"{path}: class_embed_type={config['class_embed_type']!r} is not supported; "
                    f"supported: {_CLASS_EMBED_TYPES}")
    return kind


def default_classes(kind: str, config: dict[str, Any]) -> tuple[int | None, int | None]:
    """(null class label, real class count) a model's own class embedding defines, before its trt_dm.json: DiT's
    ``num_embeds_ada_norm`` classes and the null label after them; (None, None) for the UNets (their trt_dm.json)."""
    if kind == "DiTTransformer2DModel":
        n = int(config["num_embeds_ada_norm"])
        return n, n
    return None, None


def read_conditioning(loaded, path: Path, doc: dict[str, Any], error: type[Exception]) -> None:
    """Null class label, class count, names and guidance interval from a model's trt_dm.json ``doc`` (read from
    ``path``; the pipeline root's first, then the denoiser's), checked against the model's class embedding."""
    if doc.get("guidance_interval") is not None:  # the timesteps where guidance helps this model (its card says why)
        last = int(loaded.scheduler_config.get("num_train_timesteps", 1000)) - 1
        try:
            loaded.guidance_interval = check_interval(doc["guidance_interval"], last)
        except InputError as e:
            raise error(f"{path}: guidance_interval: {str(e).split(' must ', 1)[1]}") from e
    spec = loaded.class_labels_spec
    n = None if spec is None else spec.num_values
    null, k, names = doc.get("null_class_label"), doc.get("num_classes"), doc.get("class_names")
    if n is None:
        if null is not None or k is not None:
            raise error(f"{path}: names class labels, but the model has no class-label embedding")
        return
    if null is not None and not (isinstance(null, int) and 0 <= null < n):
        raise error(f"{path}: null_class_label {null!r} must be an integer in 0..{n - 1} (the model has "
                    f"{n} class embeddings)")
    if k is not None and not (isinstance(k, int) and 1 <= k <= n and (null is None or null >= k)):
        raise error(f"{path}: num_classes {k!r} must be an integer in 1..{n}, below the null label")
    if names is not None and (not isinstance(names, list) or (k is not None and len(names) != k)):
        raise error(f"{path}: class_names must be a list of num_classes names")
    loaded.null_class_label = null if null is not None else loaded.null_class_label
    loaded.num_classes = k if k is not None else loaded.num_classes
    loaded.class_names = tuple(names) if names else None
