"""Load diffusers denoisers (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, PixArtTransformer2DModel,
SD3Transformer2DModel, FluxTransformer2DModel: ``denoisers.py``) and the embedded default models.

`load_model(spec)` accepts "default", a UNet directory in diffusers `save_pretrained` layout, or a
pipeline directory (unet/ or transformer/ [+ scheduler/] [+ text encoders, vae/]). It reads and validates
config.json itself, builds the model
from the config and loads the weights with safetensors; pickled `.bin` weights only on opt-in, and then
with `torch.load(weights_only=True)`. Every failure is a `ModelLoadError` naming the path and what is
accepted. ``builders.py`` writes tiny random models for tests and tools.

A loaded model carries its input ``signature`` (``trt_dm.core.signature``: the one description of the UNet's
inputs every stage reads) and two fingerprints: of the UNet (config + weights) and of its noise schedule.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Sequence

import torch
from torch import nn

from trt_dm.core.errors import InputError
from trt_dm.core.guidance import Guidance, check_interval, check_scale, class_labels_for
from trt_dm.core.schedule import Schedule
from trt_dm.core.signature import Signature
from trt_dm.models.denoisers import (
    added_cond_dims,
    check_config,
    default_classes,
    default_scheduler,
    denoiser_class,
    flux_sample_size,
    pooled_dim,
    read_conditioning,
    schedule_for,
)
from trt_dm.models.text import (
    check_text,
    default_time_ids,
    is_text_pipeline,
    load_embeddings,
    load_latent_decoder,
    load_text_pipeline,
    model_index_class,
    text_rows,
)
from trt_dm.models.text_t5 import (
    check_flux_text,
    check_pixart_text,
    check_sd3_text,
    load_flux_text_pipeline,
    load_pixart_text_pipeline,
    load_sd3_text_pipeline,
)
from trt_dm.models.weights import (
    SAFE_WEIGHTS,
    ModelLoadError,
    check_state,
    find_weights,
    read_json,
    read_weights,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ENV = "TRT_DM_DEFAULT_MODEL"


def _embedded_root() -> Path:
    """The embedded models' folder: the copy a wheel installs inside the package (``trt_dm/embedded``), else
    ``models/`` of the source checkout (what an editable install reads too)."""
    package = Path(__file__).resolve().parents[1]  # trt_dm/
    packaged = package / "embedded"
    return packaged if packaged.is_dir() else package.parent / "models"


EMBEDDED_ROOT = _embedded_root()
DEFAULT_MODEL_DIR = EMBEDDED_ROOT / "default"
# Embedded models by name, under models/ ("default" can be redirected with TRT_DM_DEFAULT_MODEL).
EMBEDDED = {"default": "default", "default-cond": "default-cond", "default-dit": "default-dit"}
# Conditioning facts a UNet config cannot hold, next to it: {"null_class_label": int, "num_classes": int,
# "class_names": [...], "guidance_interval": [lo, hi]} (written by tools/train_default.py; the model card says how
# it was trained and why the interval).
CONDITIONING_FILE = "trt_dm.json"
# DDPM (Ho et al. 2020, Sec. 4): linear betas 1e-4..0.02 over T=1000, epsilon prediction. Used when the
# model directory carries no scheduler/scheduler_config.json.
DEFAULT_SCHEDULER_CONFIG = MappingProxyType(dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", clip_sample=True))

_ACCEPTED = (f'"default", a diffusers UNet, DiT, PixArt, SD3 or Flux transformer directory (config.json + '
             f"{SAFE_WEIGHTS}, or shards listed in {SAFE_WEIGHTS}.index.json), or a pipeline directory with unet/ or "
             "transformer/ (and optionally scheduler/)")


@dataclass
class LoadedModel:
    unet: nn.Module
    kind: str                    # a diffusers class name of denoisers.SUPPORTED_CLASSES
    source: Path                 # resolved directory given (pipeline root or UNet dir)
    name: str                    # "default" or the directory's name
    config: dict[str, Any]       # config.json as read
    scheduler_config: dict[str, Any]
    scheduler_source: str        # "dir" (pipeline's scheduler/scheduler_config.json) or "default" (DDPM)
    weight_files: tuple[Path, ...] = ()
    weight_names: tuple[str, ...] = ()  # state_dict keys at load; fingerprint() hashes exactly these
    null_class_label: int | None = None  # the class label the model was trained with as "no class" (for CFG)
    num_classes: int | None = None       # labels 0 .. num_classes - 1 are real classes
    class_names: tuple[str, ...] | None = None
    guidance_interval: tuple[int, int] | None = None  # the default timesteps where guidance applies (None: all)
    text: Any = None  # trt_dm.text.TextPipeline of a Stable Diffusion layout pipeline (tokenizer, text encoder, VAE)
    vae: Any = None   # trt_dm.text.LatentDecoder of a latent pipeline without text (a DiTPipeline's vae/)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image the UNet denoises."""
        c = self.unet.config
        s = c.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return (c.in_channels // 4 if self.kind == "FluxTransformer2DModel" else c.in_channels, h, w)

    @property
    def signature(self) -> Signature:
        """The UNet's inputs (names, interface dtypes, named dynamic axes, which are conditioning)."""
        return Signature.from_config(self.kind, self.config)

    def fingerprint(self) -> str:
        """sha256 of the canonical config JSON and every weight's name, dtype, shape and bytes (sorted).

        Computed from the current weights (an in-place change shows), over the keys present at load, so
        quantizer buffers added later (e.g. modelopt's `_amax`) do not change it.
        """
        h = hashlib.sha256(_canonical_config(self.config).encode())
        state = self.unet.state_dict()
        names = self.weight_names or tuple(state)
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"fingerprint: weights {missing[:5]} were removed from the model after loading")
        for name in sorted(names):
            t = state[name].detach().to("cpu").contiguous()
            h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    @property
    def class_labels_spec(self):
        """The class_labels input of the signature, or None for models without class conditioning."""
        sig = self.signature
        return sig["class_labels"] if "class_labels" in sig else None

    @property
    def text_conditioned(self) -> bool:
        return "encoder_hidden_states" in self.signature.conditioning

    @property
    def seq_len(self) -> int | None:
        """The text encoder's sequence length (the tokenizer pads to it), or None without a text encoder."""
        return self.text.max_length if self.text is not None else None

    def conditioning_for(self, n: int, labels: Sequence[int] | str | None = None, *,
                         prompts: Sequence[str] | None = None, embeddings=None,
                         guidance_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The conditioning of ``n`` images: ``labels`` cycled over them (image i gets labels[i % len]), "all"
        for every class in turn; for text-conditional UNets ``prompts`` (encoded by the pipeline's text encoders)
        or precomputed ``embeddings`` ((N, S, D) or {input: (N, ...)}), cycled likewise (``text.text_rows``; SDXL
        adds its pooled embeddings and time ids); nothing for an unconditional model. Raises
        ValueError naming what is accepted. A model with embedded guidance (Flux.1-dev) gets ``guidance_scale`` as its
        ``guidance`` input, one value per image."""
        rows = self._conditioning_rows(n, labels, prompts, embeddings)
        if "guidance" in self.signature.names:
            rows["guidance"] = torch.full((n,), float(guidance_scale))
        return rows

    def _conditioning_rows(self, n: int, labels, prompts, embeddings) -> dict[str, torch.Tensor]:
        if self.text_conditioned:
            if labels is not None:
                raise InputError(f"{self.name!r} is text-conditional: give --prompt / --prompts / --embeddings, "
                                 "not class labels", field="prompt", flag="--prompt",
                                 request_message=f'{self.name!r} is text-conditional: give "prompt", not class labels')
            return text_rows(self, n, prompts, embeddings)
        if prompts is not None or embeddings is not None:
            why = (f"a prompt or embeddings were given, but {self.kind} {self.name!r} is not text-conditional (no "
                   "encoder_hidden_states input)")
            raise InputError(f"{why}; drop --prompt / --embeddings", field="prompt", flag="--prompt",
                             request_message=f'{why}; drop "prompt"')
        spec = self.class_labels_spec
        if spec is None:
            if labels is not None:
                why = f"class labels were given, but {self.name!r} is an unconditional model (no class_labels input)"
                raise InputError(f"{why}; drop --class-labels / --classes", field="class_labels", flag="--class-labels",
                                 request_message=f'{why}; drop "class_labels" / "classes"')
            return {}
        if spec.dtype != torch.int64:
            raise InputError(f"{self.name!r} takes class_labels of shape {list(spec.shape)} ({spec.dtype}: "
                             "class_embed_type 'projection'), which trt_dm cannot build from labels",
                             field="class_labels", flag="--class-labels")
        k = self.num_classes or spec.num_values
        if labels is None:
            raise InputError(f"{self.name!r} is class-conditional: give --class-labels L [L ...] (0..{k - 1}) or "
                             "--classes all", field="class_labels", flag="--class-labels",
                             request_message=f'{self.name!r} is class-conditional: give "class_labels" L [L ...] '
                                             f'(0..{k - 1}) or "classes" all')
        if isinstance(labels, str):
            if labels != "all":
                raise InputError(f"--classes takes 'all', got {labels!r}; or give --class-labels L [L ...]",
                                 field="classes", flag="--classes",
                                 request_message=f'"classes" takes \'all\', got {labels!r}; or give "class_labels" '
                                                 'L [L ...]')
            labels = list(range(k))
        labels = [int(v) for v in labels]
        bad = [v for v in labels if not 0 <= v < k or v == self.null_class_label]
        if bad:
            raise InputError(f"class labels {bad} are out of range for {self.name!r}: accepted 0..{k - 1}"
                             + (f" (label {self.null_class_label} is its null label)" if self.null_class_label
                                is not None and self.null_class_label < k else ""),
                             field="class_labels", flag="--class-labels")
        return {"class_labels": class_labels_for(n, labels)}

    @property
    def text_dim(self) -> int | None:
        """The width of ``encoder_hidden_states`` (cross_attention_dim, an MMDiT's joint_attention_dim), or None."""
        return int(self.signature["encoder_hidden_states"].shape[2]) if self.text_conditioned else None

    @property
    def pooled_dim(self) -> int | None:
        """The width of the pooled text embedding ``text_embeds`` (SDXL-layout UNets, SD3), or None."""
        return pooled_dim(self.kind, self.config)

    def embeddings_file(self, path, flag: str = "--embeddings"):
        """(rows, negative) of a precomputed embeddings file for this model (``text.load_embeddings``): any sequence
        length for a bare denoiser, the pipeline's otherwise."""
        return load_embeddings(path, self.seq_len, self.text_dim, self.pooled_dim, flag=flag,
                               time_ids=self.added_cond is not None,
                               mask="encoder_attention_mask" in self.signature.names)

    @property
    def added_cond(self) -> tuple[int, int] | None:
        """SDXL-layout UNets: (width of ``text_embeds``, number of ``time_ids``); None for other denoisers."""
        return added_cond_dims(self.config)

    def time_ids(self, n: int) -> torch.Tensor:
        """SDXL's default micro-conditioning for this model's image size, (n, 6) (``text.default_time_ids``)."""
        return default_time_ids(self, n)

    def resolve_interval(self, scale: float, interval: Sequence[int] | None) -> tuple[int, int] | None:
        """The guidance interval a request means: None takes the model's default (``guidance_interval`` of its
        trt_dm.json; None = every timestep), a given one is checked against the schedule. None without guidance."""
        if scale == 1.0:
            return None
        if interval is None:
            return self.guidance_interval
        return check_interval(tuple(interval) if isinstance(interval, list) else interval,
                              int(self.scheduler_config.get("num_train_timesteps", 1000)) - 1)

    def guidance(self, scale: float = 1.0, rescale: float = 0.0, *, negative_prompt: str = "",
                 negative_embeddings: torch.Tensor | None = None, interval: Sequence[int] | None = None):
        """Classifier-free guidance for this model (``trt_dm.core.guidance.Guidance``); scale 1 needs nothing,
        another scale needs the null class label the model was trained with, or for a text-conditional model the
        embedding of the negative prompt (the empty prompt by default) or precomputed negative embeddings.
        ``interval``: the timesteps where it applies (``resolve_interval``: None is the model's default)."""
        check_scale(scale)
        if scale == 1.0 or "guidance" in self.signature.names:  # embedded guidance: an input, one call (no CFG)
            return Guidance(1.0, rescale)
        interval = self.resolve_interval(scale, interval)
        if self.text_conditioned:
            if negative_embeddings is None:
                if self.text is None:
                    why = (f"{scale:g} on {self.name!r} (no text encoder) needs negative_prompt_embeds (1, S, D)"
                           + (" and negative_pooled_prompt_embeds (1, P)" if self.pooled_dim else ""))
                    raise InputError(f"--guidance-scale {why} in the --embeddings file", field="guidance_scale",
                                     flag="--guidance-scale",
                                     request_message=f'"guidance_scale" {why}, which a request cannot give; send '
                                                     '"guidance_scale" 1')
                negative_embeddings = self.text.encode_negative(negative_prompt)
            null = (dict(negative_embeddings) if isinstance(negative_embeddings, dict)
                    else {"encoder_hidden_states": negative_embeddings})
            if self.added_cond:
                null.setdefault("time_ids", self.time_ids(1))
            return Guidance(scale, rescale, {k: v[:1].float() for k, v in null.items()}, interval)
        if self.class_labels_spec is None:
            raise InputError(f"--guidance-scale {scale:g} needs a conditional model; {self.name!r} is unconditional",
                             field="guidance_scale", flag="--guidance-scale",
                             request_message=f'"guidance_scale" {scale:g} needs a conditional model; {self.name!r} is '
                                             'unconditional')
        if self.null_class_label is None:
            why = (f"{scale:g} needs the null class label {self.name!r} was trained with (classifier-free guidance); "
                   f"it has no {CONDITIONING_FILE} naming one")
            raise InputError(f"--guidance-scale {why}. Give --null-label N if you know it, or sample with "
                             "--guidance-scale 1", field="guidance_scale", flag="--guidance-scale",
                             request_message=f'"guidance_scale" {why}; send "guidance_scale" 1')
        return Guidance(scale, rescale, {"class_labels": torch.tensor([self.null_class_label], dtype=torch.int64)},
                        interval)

    def set_null_label(self, label: int) -> None:
        """Declare the null class label (when the model directory does not): checked against the embedding."""
        spec = self.class_labels_spec
        if spec is None or spec.num_values is None:
            raise InputError(f"--null-label: {self.name!r} has no class-label embedding", field="null_label",
                             flag="--null-label",
                             request_message=f'"null_label": {self.name!r} has no class-label embedding')
        if not 0 <= int(label) < spec.num_values:
            raise InputError(f"--null-label {label} is outside the model's {spec.num_values} class embeddings",
                             field="null_label", flag="--null-label",
                             request_message=f'"null_label" {label} is outside the model\'s {spec.num_values} class '
                                             'embeddings')
        self.null_class_label = int(label)
        if self.num_classes is None and label == spec.num_values - 1:
            self.num_classes = int(label)

    def schedule(self):
        """The noise schedule the samplers step (``Schedule``, or a flow model's ``FlowSchedule``, with a
        dynamic-shifting one's shift for this model's token count)."""
        return schedule_for(self.kind, self.config, Schedule.from_config(self.scheduler_config), self.sample_shape)

    def schedule_fingerprint(self) -> str:
        """sha256 of the noise schedule as the samplers use it (see ``Schedule.fingerprint``):
        two scheduler configs that sample alike share it, any change that moves a trajectory does not."""
        return self.schedule().fingerprint()

    def data_key(self) -> str:
        """What every cache of data drawn from this model is keyed by: the UNet AND its noise schedule (the same
        UNet under another scheduler config draws other trajectories, so it must not share their cache), and for a
        text-to-image pipeline its text encoder (the embeddings) and VAE (the decoded images)."""
        parts = [self.fingerprint(), self.schedule_fingerprint()]
        if self.text is not None:
            parts += [self.text.fingerprints[k] for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
                      if k in self.text.fingerprints]
        if self.vae is not None:
            parts.append(self.vae.fingerprint)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """What the sampler made -> images: a latent pipeline's VAE decodes its latents; others are images already."""
        decoder = self.text if self.text is not None else self.vae
        return decoder.decode(samples) if decoder is not None else samples


def _canonical_config(config: dict[str, Any]) -> str:
    # Drop bookkeeping keys (_diffusers_version, _name_or_path, ...) but keep the class name.
    kept = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _resolve(spec: str | os.PathLike) -> tuple[Path, str]:
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model spec must be a str or os.PathLike, got {type(spec).__name__}: {spec!r}")
    if os.fspath(spec) in EMBEDDED:
        name = os.fspath(spec)
        env = os.environ.get(DEFAULT_MODEL_ENV) if name == "default" else None
        root = Path(env).expanduser() if env else DEFAULT_MODEL_DIR.parent / EMBEDDED[name]
        if not root.exists():
            if env:
                raise ModelLoadError(f"{DEFAULT_MODEL_ENV}={env!r} names a path that does not exist; point it "
                                     f"at {_ACCEPTED}, or unset it to use {DEFAULT_MODEL_DIR}")
            raise ModelLoadError(
                f"the embedded {name} model is missing: {root} does not exist. Produce it with "
                f"`python tools/train_default.py` (see the model card in models/), or give a model directory")
        return root.resolve(), name
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist; accepted: {_ACCEPTED}")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is a file, not a directory; accepted: {_ACCEPTED}")
    return path.resolve(), path.resolve().name


def load_model(spec: str | os.PathLike, *, allow_pickle: bool = False,
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a diffusers UNet (see the module docstring for `spec`); the model is in eval mode."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype; accepted: torch.float32, "
                         "torch.float16, torch.bfloat16, torch.float64")
    root, name = _resolve(spec)
    scheduler_json = None
    if (root / "config.json").is_file():
        unet_dir = root
        if (root.parent / "scheduler" / "scheduler_config.json").is_file():
            logger.warning("%s is the unet/ of a pipeline; its scheduler is NOT used (the DDPM default is). "
                           "Pass the pipeline directory %s to use it", root, root.parent)
    elif (root / "unet").is_dir() or (root / "transformer").is_dir():
        unet_dir = root / ("unet" if (root / "unet").is_dir() else "transformer")
        if (root / "scheduler" / "scheduler_config.json").is_file():
            scheduler_json = root / "scheduler" / "scheduler_config.json"
    else:
        raise ModelLoadError(f"{root}: no config.json and no unet/ subfolder; accepted: {_ACCEPTED}")
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{unet_dir}: pipeline {unet_dir.name}/ folder has no config.json; accepted: {_ACCEPTED}")
    config = read_json(config_path, "model config")
    kind = check_config(config, config_path, ModelLoadError)
    if kind == "FluxTransformer2DModel" and config.get("sample_size") is None:  # Flux's config has none
        config["sample_size"] = flux_sample_size([root, unet_dir], ModelLoadError)

    files, pickles = find_weights(unet_dir, allow_pickle)
    state = read_weights(files, pickles)
    with torch.random.fork_rng(devices=[]):  # random init must not move the caller's RNG
        try:
            unet = denoiser_class(kind, config).from_config(
                {k: v for k, v in config.items() if kind != "FluxTransformer2DModel" or k != "sample_size"})
        except Exception as e:
            raise ModelLoadError(f"{config_path}: cannot build {kind} from this config "
                                 f"({type(e).__name__}: {e})") from e
    if kind == "FluxTransformer2DModel":  # not a constructor argument: the size it samples at, kept in its config
        unet.register_to_config(sample_size=config["sample_size"])
    fix_keys = getattr(unet, "_fix_state_dict_keys_on_load", None)  # diffusers' private rename of
    if fix_keys is not None:                                          # old attention keys (query, proj_attn)
        fix_keys(state)
    check_state(state, unet.state_dict(), ", ".join(str(f) for f in files))
    unet.load_state_dict(state, strict=True)
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast ("should be kept in float32: []")
    # even when no module must stay fp32, as for both UNet classes.
    nn.Module.to(unet, dtype).eval()

    if scheduler_json is not None:
        scheduler_config, scheduler_source = read_json(scheduler_json, "scheduler config"), "dir"
    else:  # DDPM's default; a flow transformer without its pipeline: its family's (``denoisers.default_scheduler``)
        scheduler_config, scheduler_source = dict(default_scheduler(kind) or DEFAULT_SCHEDULER_CONFIG), "default"
    loaded = LoadedModel(unet=unet, kind=kind, source=root, name=name, config=config,
                         scheduler_config=scheduler_config, scheduler_source=scheduler_source,
                         weight_files=tuple(files), weight_names=tuple(unet.state_dict()))
    loaded.null_class_label, loaded.num_classes = default_classes(kind, config)
    path = next((d / CONDITIONING_FILE for d in (root, unet_dir) if (d / CONDITIONING_FILE).is_file()), None)
    if path is not None:
        read_conditioning(loaded, path, read_json(path, "conditioning description"), ModelLoadError)
    if unet_dir != root:
        _attach_pipeline(loaded, root)
    logger.info("loaded %s %r from %s (%.3fM params, %s, schedule: %s)", kind, name, root,
                sum(p.numel() for p in unet.parameters()) / 1e6, dtype, scheduler_source)
    return loaded


def _attach_pipeline(loaded: LoadedModel, root: Path) -> None:
    """The parts of the pipeline at ``root`` around its denoiser: text encoders + VAE (text_t5.py, text.py) or,
    without text, a latent pipeline's VAE."""
    if is_text_pipeline(root):
        if loaded.kind == "SD3Transformer2DModel":  # CLIP-L, CLIP-G, T5 (text_t5.py)
            loaded.text = load_sd3_text_pipeline(root, loaded.text_dim)
            check_sd3_text(loaded, root, ModelLoadError)
        elif loaded.kind == "FluxTransformer2DModel":  # CLIP-L pooled, T5 tokens (text_t5.py)
            loaded.text = load_flux_text_pipeline(root)
            check_flux_text(loaded, root, ModelLoadError)
        elif loaded.kind == "PixArtTransformer2DModel":  # T5 and its padding mask (text_t5.py)
            loaded.text = load_pixart_text_pipeline(root, model_index_class(root))
            check_pixart_text(loaded, root, ModelLoadError)
        elif loaded.kind != "UNet2DConditionModel":
            raise ModelLoadError(f"{root}: a text encoder / tokenizer comes with a {loaded.kind}, which takes no "
                                 "text")
        else:
            loaded.text = load_text_pipeline(root)
            check_text(loaded, root, ModelLoadError)
    elif (root / "vae").is_dir():  # a latent pipeline without text (DiTPipeline): its VAE decodes
        loaded.vae = load_latent_decoder(root)
        if loaded.vae.vae.config.latent_channels != loaded.sample_shape[0]:
            raise ModelLoadError(f"{root}: the VAE's {loaded.vae.vae.config.latent_channels} latent channels are "
                                 f"not the denoiser's {loaded.sample_shape[0]} input channels")
