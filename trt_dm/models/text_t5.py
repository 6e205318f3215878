"""The text side of transformer pipelines with T5: Stable Diffusion 3 (CLIP-L, CLIP-G and T5), Flux.1 (CLIP-L and T5)
and PixArt (T5).

Flux.1 (``FluxPipeline`` directories: ``transformer/`` (``FluxTransformer2DModel``), ``scheduler/``,
``text_encoder/`` + ``tokenizer/`` (``CLIPTextModel``), ``text_encoder_2/`` + ``tokenizer_2/`` (T5), ``vae/``): as
``FluxPipeline.encode_prompt``, T5's last hidden state over 512 tokens (its ``max_sequence_length`` default) is
``encoder_hidden_states`` and CLIP-L's pooled output ``text_embeds``; the VAE shifts like SD3's. A negative prompt
(for true classifier-free guidance, ``--guidance-scale`` on a model without embedded guidance) is encoded the same way.

PixArt (``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline`` directories: ``transformer/``
(``PixArtTransformer2DModel``), ``scheduler/``, ``text_encoder/`` (``T5EncoderModel``) + ``tokenizer/`` (T5),
``vae/``): prompts lower-cased and stripped (diffusers' ``clean_caption=False``; its caption cleaning needs bs4 and
ftfy and is not done here), tokenized to ``max_sequence_length`` (300 for Sigma, 120 for alpha: the pipelines'
defaults) and encoded with their padding mask, as ``PixArtSigmaPipeline.encode_prompt``: ``encoder_hidden_states``
(N, L, d_model) and ``encoder_attention_mask`` (N, L); the negative prompt (empty by default) the same way.

Stable Diffusion 3 (``StableDiffusion3Pipeline`` directories):

A pipeline directory with ``transformer/`` (``SD3Transformer2DModel``), ``scheduler/``
(``FlowMatchEulerDiscreteScheduler``), ``text_encoder/`` + ``tokenizer/`` (CLIP-L) and ``text_encoder_2/`` +
``tokenizer_2/`` (CLIP-G, both ``CLIPTextModelWithProjection``), optionally ``text_encoder_3/`` + ``tokenizer_3/``
(``T5EncoderModel``) and ``vae/``. Prompts are encoded as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` does
(no clip-skip, no LoRA): both CLIPs' penultimate hidden states side by side, zero-padded to the transformer's
``joint_attention_dim``, then T5's last hidden state over ``max_sequence_length`` tokens (256, diffusers' default;
zeros of that length without T5) along the sequence: ``encoder_hidden_states`` (N, 77 + 256, joint_attention_dim);
both CLIPs' pooled projections side by side: ``text_embeds`` (N, pooled_projection_dim). The negative prompt is
encoded the same way (the empty one too). The VAE decodes ``latents / scaling_factor + shift_factor``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from trt_dm.models.text import (
    TextPipeline,
    TextPipelineError,
    _load_encoder,
    _safetensors_in,
    _sha256_files,
    decode_latents,
    load_latent_decoder,
)

T5_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
PIXART_SEQUENCE_LENGTH = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}  # the pipelines' defaults


@dataclass
class _T5Pipeline(TextPipeline):
    """What the T5 pipelines share: T5's ``length`` tokens per prompt, the negative prompt encoded like any other, a
    VAE that may shift (``shift_factor``)."""
    length: int = 300
    shift_factor: float = 0.0

    @property
    def sdxl(self) -> bool:
        return False

    @property
    def max_length(self) -> int:
        return self.length

    def encode_negative(self, prompt: str = "") -> dict[str, torch.Tensor]:
        return self.encode([prompt])

    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        return decode_latents(self.vae, self.scaling_factor, latents, batch, shift_factor=self.shift_factor)

    def describe(self) -> dict:
        return {**super().describe(), "max_sequence_length": self.length, "vae_shift_factor": self.shift_factor}


@dataclass
class PixArtTextPipeline(_T5Pipeline):
    """T5 (``tokenizer`` / ``text_encoder``) and the VAE of a PixArt pipeline; ``length`` tokens per prompt."""

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.d_model)

    @property
    def pooled_size(self) -> None:
        return None

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` (N, length, d_model) and ``encoder_attention_mask`` (N, length) float32."""
        hidden, masks = [], []
        for chunk in self._chunks(prompts):
            tok = self.tokenizer([p.lower().strip() for p in chunk], padding="max_length", max_length=self.length,
                                 truncation=True, add_special_tokens=True, return_tensors="pt")
            hidden.append(self.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0].float())
            masks.append(tok.attention_mask.float())
        return {"encoder_hidden_states": torch.cat(hidden), "encoder_attention_mask": torch.cat(masks)}


def load_pixart_text_pipeline(root: Path, kind: str | None) -> PixArtTextPipeline:
    """T5 and the VAE of the PixArt pipeline at ``root`` (local files, safetensors only); ``kind``: model_index.json's
    ``_class_name`` (its sequence length: ``PIXART_SEQUENCE_LENGTH``, 300 when unnamed)."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise TextPipelineError(f"text-to-image pipelines need transformers (pip install 'trt_dm[text]'): "
                                f"{e}") from None
    tokenizer, encoder, files = _load_t5(root, "")
    vae = load_latent_decoder(root)
    return PixArtTextPipeline(root=root, tokenizer=tokenizer, text_encoder=encoder, vae=vae.vae,
                              scaling_factor=vae.scaling_factor,
                              fingerprints={"text_encoder": _sha256_files(files), "vae": vae.fingerprint},
                              length=PIXART_SEQUENCE_LENGTH.get(kind, 300))


@dataclass
class SD3TextPipeline(_T5Pipeline):
    """The two CLIPs (``tokenizer`` / ``text_encoder``, ``tokenizer_2`` / ``text_encoder_2``), T5 (or None) and VAE
    of a Stable Diffusion 3 pipeline, for a transformer of ``joint_dim`` text width."""
    tokenizer_3: object = None
    text_encoder_3: torch.nn.Module | None = None
    joint_dim: int = 4096
    length: int = T5_SEQUENCE_LENGTH  # T5's tokens

    @property
    def sd3(self) -> bool:
        return True

    @property
    def max_length(self) -> int:
        """The sequence of ``encoder_hidden_states``: CLIP's tokens, then T5's."""
        return int(self.tokenizer.model_max_length) + self.length

    @property
    def hidden_size(self) -> int:
        return self.joint_dim

    @property
    def clip_size(self) -> int:
        return int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        return int(self.text_encoder.config.projection_dim) + int(self.text_encoder_2.config.projection_dim)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The transformer's text inputs for ``prompts`` (module docstring), float32."""
        hidden, pooled = [], []
        for chunk in self._chunks(prompts):
            states, pools = [], []
            for tok, te in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = tok(chunk, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                out = te(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2].float())
                pools.append(out[0].float())
            clip = torch.nn.functional.pad(torch.cat(states, dim=-1), (0, self.joint_dim - self.clip_size))
            if self.text_encoder_3 is None:
                t5 = torch.zeros(len(chunk), self.length, self.joint_dim)
            else:
                ids = self.tokenizer_3(chunk, padding="max_length", max_length=self.length, truncation=True,
                                       add_special_tokens=True, return_tensors="pt").input_ids
                t5 = self.text_encoder_3(ids)[0].float()
            hidden.append(torch.cat([clip, t5], dim=-2))
            pooled.append(torch.cat(pools, dim=-1))
        return {"encoder_hidden_states": torch.cat(hidden), "text_embeds": torch.cat(pooled)}

    def release(self) -> None:
        super().release()
        self.text_encoder_3 = None

    def describe(self) -> dict:
        d = super().describe()
        d.update(text_encoder_2=str(self.root / "text_encoder_2"),
                 text_encoder_2_sha256=self.fingerprints.get("text_encoder_2"),
                 text_encoder_3=str(self.root / "text_encoder_3") if "text_encoder_3" in self.fingerprints else None,
                 text_encoder_3_sha256=self.fingerprints.get("text_encoder_3"))
        return d


FLUX_SEQUENCE_LENGTH = 512  # FluxPipeline's default max_sequence_length


@dataclass
class FluxTextPipeline(_T5Pipeline):
    """CLIP-L (``tokenizer`` / ``text_encoder``: its pooled output), T5 (``tokenizer_2`` / ``text_encoder_2``: the
    tokens) and the VAE of a Flux.1 pipeline."""
    length: int = FLUX_SEQUENCE_LENGTH

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder_2.config.d_model)

    @property
    def pooled_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` (N, 512, d_model) from T5, ``text_embeds`` (N, 768) CLIP-L's pooled output."""
        hidden, pooled = [], []
        for chunk in self._chunks(prompts):
            ids = self.tokenizer(chunk, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            pooled.append(self.text_encoder(ids, output_hidden_states=False).pooler_output.float())
            ids = self.tokenizer_2(chunk, padding="max_length", max_length=self.length, truncation=True,
                                   return_tensors="pt").input_ids
            hidden.append(self.text_encoder_2(ids, output_hidden_states=False)[0].float())
        return {"encoder_hidden_states": torch.cat(hidden), "text_embeds": torch.cat(pooled)}

    def describe(self) -> dict:
        return {**super().describe(), "text_encoder_2": str(self.root / "text_encoder_2"),
                "text_encoder_2_sha256": self.fingerprints.get("text_encoder_2")}


def load_flux_text_pipeline(root: Path) -> FluxTextPipeline:
    """CLIP-L, T5 and the VAE of the Flux.1 pipeline at ``root`` (local files, safetensors only)."""
    try:
        import transformers
    except ImportError as e:
        raise TextPipelineError(f"text-to-image pipelines need transformers (pip install 'trt_dm[text]'): "
                                f"{e}") from None
    transformers.utils.logging.disable_progress_bar()
    tokenizer, clip, f1 = _load_encoder(transformers, root, "", ("CLIPTextModel",))
    tokenizer_2, t5, f2 = _load_t5(root, "_2")
    vae = load_latent_decoder(root)
    return FluxTextPipeline(root=root, tokenizer=tokenizer, text_encoder=clip, vae=vae.vae,
                            scaling_factor=vae.scaling_factor, tokenizer_2=tokenizer_2, text_encoder_2=t5,
                            fingerprints={"text_encoder": _sha256_files(f1), "text_encoder_2": _sha256_files(f2),
                                          "vae": vae.fingerprint},
                            shift_factor=float(getattr(vae.vae.config, "shift_factor", None) or 0.0))


def _load_t5(root: Path, suffix: str = "_3"):
    """(tokenizer, T5 encoder, weight files) of ``text_encoder<suffix>/`` and ``tokenizer<suffix>/``."""
    import transformers
    te_dir, tok_dir = root / f"text_encoder{suffix}", root / f"tokenizer{suffix}"
    files = _safetensors_in(te_dir, f"T5 text encoder (text_encoder{suffix}/)")
    arch = (json.loads((te_dir / "config.json").read_text(encoding="utf-8")).get("architectures") or [None])[0]
    if arch != "T5EncoderModel":
        raise TextPipelineError(f"{te_dir}: text encoder {arch!r} is not supported here; supported: T5EncoderModel")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:
        raise TextPipelineError(f"{tok_dir}: cannot load the T5 tokenizer ({type(e).__name__}: {e}); expected "
                                "tokenizer.json or spiece.model (save_pretrained layout)") from None
    try:
        with torch.random.fork_rng(devices=[]):
            encoder = transformers.T5EncoderModel.from_pretrained(str(te_dir), local_files_only=True,
                                                                  use_safetensors=True, dtype=torch.float32)
    except Exception as e:
        raise TextPipelineError(f"{te_dir}: cannot load the T5 encoder ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return tokenizer, encoder.eval().requires_grad_(False), files


def load_sd3_text_pipeline(root: Path, joint_dim: int) -> SD3TextPipeline:
    """The text encoders and VAE of the Stable Diffusion 3 pipeline at ``root`` (local files, safetensors only), for a
    transformer of text width ``joint_dim``."""
    try:
        import transformers
    except ImportError as e:
        raise TextPipelineError(f"text-to-image pipelines need transformers (pip install 'trt_dm[text]'): "
                                f"{e}") from None
    transformers.utils.logging.disable_progress_bar()
    for sub in ("text_encoder", "text_encoder_2"):
        if not (root / sub).is_dir():
            raise TextPipelineError(f"{root}: a Stable Diffusion 3 pipeline needs {sub}/ (CLIP-L in text_encoder/, "
                                    "CLIP-G in text_encoder_2/); it has none")
    proj = ("CLIPTextModelWithProjection",)
    tokenizer, text_encoder, f1 = _load_encoder(transformers, root, "", proj)
    tokenizer_2, text_encoder_2, f2 = _load_encoder(transformers, root, "_2", proj)
    fingerprints = {"text_encoder": _sha256_files(f1), "text_encoder_2": _sha256_files(f2)}
    tokenizer_3 = text_encoder_3 = None
    if (root / "text_encoder_3").is_dir():
        tokenizer_3, text_encoder_3, f3 = _load_t5(root)
        fingerprints["text_encoder_3"] = _sha256_files(f3)
    vae = load_latent_decoder(root)
    fingerprints["vae"] = vae.fingerprint
    shift = float(getattr(vae.vae.config, "shift_factor", None) or 0.0)
    return SD3TextPipeline(root=root, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.vae,
                           scaling_factor=vae.scaling_factor, fingerprints=fingerprints, tokenizer_2=tokenizer_2,
                           text_encoder_2=text_encoder_2, tokenizer_3=tokenizer_3, text_encoder_3=text_encoder_3,
                           joint_dim=joint_dim, shift_factor=shift)


def check_flux_text(loaded, root: Path, error: type[Exception]) -> None:
    """T5's width against joint_attention_dim, CLIP-L's against pooled_projection_dim."""
    text = loaded.text
    if text.hidden_size != loaded.text_dim or text.pooled_size != loaded.pooled_dim:
        raise error(f"{root}: the T5 encoder's width {text.hidden_size} and CLIP-L's {text.pooled_size} are not the "
                    f"transformer's joint_attention_dim {loaded.text_dim} and pooled_projection_dim "
                    f"{loaded.pooled_dim}")


def check_pixart_text(loaded, root: Path, error: type[Exception]) -> None:
    """T5's width against the transformer's caption_channels."""
    if loaded.text.hidden_size != loaded.text_dim:
        raise error(f"{root}: the T5 encoder's width {loaded.text.hidden_size} is not the transformer's "
                    f"caption_channels {loaded.text_dim}")


def check_sd3_text(loaded, root: Path, error: type[Exception]) -> None:
    """The encoders' widths against the transformer's: CLIP-L + CLIP-G within joint_attention_dim, T5's width equal to
    it, the pooled projections adding up to pooled_projection_dim."""
    text, joint, pooled = loaded.text, loaded.text_dim, loaded.pooled_dim
    if text.clip_size > joint:
        raise error(f"{root}: the CLIP encoders' widths add up to {text.clip_size}, more than the transformer's "
                    f"joint_attention_dim {joint}")
    if text.text_encoder_3 is not None and int(text.text_encoder_3.config.d_model) != joint:
        raise error(f"{root}: the T5 encoder's width {text.text_encoder_3.config.d_model} is not the transformer's "
                    f"joint_attention_dim {joint}")
    if text.pooled_size != pooled:
        raise error(f"{root}: the CLIP encoders' projection_dims add up to {text.pooled_size}, not the transformer's "
                    f"pooled_projection_dim {pooled}")
    if text.tokenizer_2.model_max_length != text.tokenizer.model_max_length:
        raise error(f"{root}: tokenizer/ pads to {text.tokenizer.model_max_length} tokens and tokenizer_2/ to "
                    f"{text.tokenizer_2.model_max_length}; SD3's CLIP encoders must give one sequence length")
