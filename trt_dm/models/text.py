"""Text-to-image pipelines in the diffusers Stable Diffusion layout: the parts around the UNet.

A pipeline directory with ``model_index.json``, ``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/`` and
``vae/``: prompts are tokenized by its tokenizer and encoded by its text encoder (transformers; the last hidden
state is the UNet's ``encoder_hidden_states``, as in diffusers' StableDiffusionPipeline), sampling runs on the
UNet's latents, and its VAE (diffusers ``AutoencoderKL``) decodes ``latents / scaling_factor`` into images. Only
the UNet is quantized; the text encoder and the VAE run in torch here. Everything loads from local directories,
weights from safetensors only (a pickle-only component is refused), nothing is fetched from a hub.

Precomputed embeddings (any encoder) come from a safetensors file with ``prompt_embeds`` (N, S, D) and optionally
``negative_prompt_embeds`` (1, S, D), diffusers' names.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from trt_dm.core.errors import InputError

log = logging.getLogger(__name__)

TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
PROMPTS_FILE = Path(__file__).with_name("prompts.txt")


class TextPipelineError(ValueError):
    """A text-to-image pipeline component that cannot be used; the message names the path and what is accepted."""


def builtin_prompts() -> tuple[str, ...]:
    """The project's own calibration prompts (trt_dm/prompts.txt: objects, scenes, styles, lengths)."""
    return read_prompts(PROMPTS_FILE)


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Prompts from a text file, one per line (blank lines and lines starting with # are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file (one prompt per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e}); a prompts file has one prompt per line",
                         field="prompts") from None
    prompts = tuple(s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#"))
    if not prompts:
        raise InputError(f"{path}: no prompts (one per line; # starts a comment)", field="prompts")
    return prompts


def prompts_key(prompts: Sequence[str], negative: str = "") -> str:
    """sha256 of a prompt list (and negative prompt): what caches of data drawn from these prompts are keyed by."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\0")
    h.update(b"\1" + negative.encode("utf-8"))
    return h.hexdigest()


def _sha256_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _safetensors_in(d: Path, what: str) -> list[Path]:
    if not d.is_dir():
        raise TextPipelineError(f"{d}: the pipeline has no {what} directory; a Stable Diffusion layout pipeline needs "
                                "unet/, scheduler/, text_encoder/, tokenizer/ and vae/")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise TextPipelineError(f"{d}: the {what} is stored only as pickles {pickles[:3]}, which are refused (they "
                                    "can run code); convert once with save_pretrained(dir, safe_serialization=True)")
        raise TextPipelineError(f"{d}: no *.safetensors weights for the {what}")
    if not (d / "config.json").is_file():
        raise TextPipelineError(f"{d}: the {what} has no config.json")
    return files


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, scaling_factor: float, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] (``vae.decode(latents / scaling_factor)``), in batches."""
    outs = [vae.decode(latents[i:i + batch].float() / scaling_factor).sample.clamp(-1, 1)
            for i in range(0, len(latents), batch)]
    return torch.cat(outs) if outs else latents.new_empty(0, 3, *latents.shape[2:])


@dataclass
class TextPipeline:
    """Tokenizer + text encoder + VAE of a Stable Diffusion layout pipeline (all in torch, float32, eval mode)."""
    root: Path
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scaling_factor: float
    fingerprints: dict = field(default_factory=dict)  # component -> sha256 of its weight files

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), max_length, hidden) float32: padded to the tokenizer's max length and truncated, the text
        encoder's last hidden state (StableDiffusionPipeline.encode_prompt without clip-skip or LoRA)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for i in range(0, len(prompts), 64):
            ids = self.tokenizer(list(prompts[i:i + 64]), padding="max_length", max_length=self.max_length,
                                 truncation=True, return_tensors="pt").input_ids
            out.append(self.text_encoder(ids)[0].float())
        return torch.cat(out)

    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        return decode_latents(self.vae, self.scaling_factor, latents, batch)

    def describe(self) -> dict:
        return {"text_encoder": str(self.root / "text_encoder"), "vae": str(self.root / "vae"),
                "text_encoder_sha256": self.fingerprints.get("text_encoder"),
                "vae_sha256": self.fingerprints.get("vae"), "vae_scaling_factor": self.scaling_factor}


@dataclass
class LatentDecoder:
    """The VAE of a latent pipeline without text (a DiTPipeline's ``vae/``): decodes what the sampler made."""
    root: Path
    vae: torch.nn.Module
    scaling_factor: float
    fingerprint: str

    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        return decode_latents(self.vae, self.scaling_factor, latents, batch)

    def describe(self) -> dict:
        return {"vae": str(self.root / "vae"), "vae_sha256": self.fingerprint, "vae_scaling_factor": self.scaling_factor}


def load_latent_decoder(root: Path) -> LatentDecoder:
    """The VAE in ``root / "vae"`` (safetensors, local files only)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover (diffusers is a dependency)
        raise TextPipelineError(f"{root}: a latent pipeline's VAE needs diffusers: {e}") from None
    files = _safetensors_in(root / "vae", "VAE")
    try:
        with torch.random.fork_rng(devices=[]):
            vae = AutoencoderKL.from_pretrained(str(root / "vae"), local_files_only=True, use_safetensors=True,
                                                low_cpu_mem_usage=False, torch_dtype=torch.float32)
    except Exception as e:
        raise TextPipelineError(f"{root / 'vae'}: cannot load the VAE ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); expected a save_pretrained AutoencoderKL "
                                "directory with config.json and safetensors weights") from None
    vae.eval().requires_grad_(False)
    return LatentDecoder(root, vae, float(getattr(vae.config, "scaling_factor", None) or 0.18215),
                         _sha256_files(files))


def is_text_pipeline(root: Path) -> bool:
    return any((root / d).exists() for d in ("text_encoder", "tokenizer")) or _index_names_text(root)


def _index_names_text(root: Path) -> bool:
    index = root / "model_index.json"
    if not index.is_file():
        return False
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("text_encoder") not in (None, [None, None])


def load_text_pipeline(root: Path) -> TextPipeline:
    """The tokenizer, text encoder and VAE of the pipeline at ``root`` (local files only, safetensors only)."""
    try:
        import transformers
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise TextPipelineError(f"text-to-image pipelines need transformers (pip install 'trt_dm[text]'): {e}") from None
    transformers.utils.logging.disable_progress_bar()  # its per-load "Loading weights" bars
    te_dir, tok_dir, vae_dir = root / "text_encoder", root / "tokenizer", root / "vae"
    te_files = _safetensors_in(te_dir, "text encoder")
    vae_files = _safetensors_in(vae_dir, "VAE")
    if not tok_dir.is_dir():
        raise TextPipelineError(f"{tok_dir}: the pipeline has no tokenizer directory (vocab.json + merges.txt of a "
                                "CLIP tokenizer, as save_pretrained writes it)")
    try:
        te_config = json.loads((te_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TextPipelineError(f"{te_dir / 'config.json'}: not valid JSON ({e})") from None
    arch = (te_config.get("architectures") or [None])[0]
    if arch not in TEXT_ENCODER_CLASSES:
        raise TextPipelineError(f"{te_dir}: text encoder {arch!r} is not supported; supported: {TEXT_ENCODER_CLASSES}")
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # missing vocab / merges, damaged JSON: transformers raises many types
        raise TextPipelineError(f"{tok_dir}: cannot load the CLIP tokenizer ({type(e).__name__}: {e}); expected "
                                "vocab.json and merges.txt (save_pretrained layout)") from None
    try:
        with torch.random.fork_rng(devices=[]):
            text_encoder = getattr(transformers, arch).from_pretrained(str(te_dir), local_files_only=True,
                                                                       use_safetensors=True, dtype=torch.float32)
            vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True, use_safetensors=True,
                                                low_cpu_mem_usage=False,
                                                torch_dtype=torch.float32)
    except Exception as e:
        raise TextPipelineError(f"{root}: cannot load the text encoder or VAE ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); expected save_pretrained directories "
                                "with config.json and safetensors weights") from None
    text_encoder.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    sf = getattr(vae.config, "scaling_factor", None) or 0.18215
    if tokenizer.model_max_length > text_encoder.config.max_position_embeddings:
        raise TextPipelineError(f"{tok_dir}: model_max_length {tokenizer.model_max_length} is longer than the text "
                                f"encoder's {text_encoder.config.max_position_embeddings} positions")
    return TextPipeline(root=root, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scaling_factor=float(sf),
                        fingerprints={"text_encoder": _sha256_files(te_files), "vae": _sha256_files(vae_files)})


def load_embeddings(path: str | Path, seq: int | None, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds (N, seq, dim), negative_prompt_embeds (1, seq, dim) or None) from a safetensors file; the
    shapes are checked against the pipeline's sequence length (None: any, the same for both) and the UNet's
    cross-attention width."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--embeddings {path}: no such file")
    if path.suffix != ".safetensors":
        why = f"{path}: expected a .safetensors file with prompt_embeds (N, {seq}, {dim})"
        raise InputError(f"--embeddings {why}", field="embeddings", flag="--embeddings",
                         request_message=f'"embeddings" {why}')
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        why = f"{path}: cannot read it as safetensors ({e})"
        raise InputError(f"--embeddings {why}", field="embeddings", flag="--embeddings",
                         request_message=f'"embeddings" {why}') from None
    if "prompt_embeds" not in d:
        why = (f"{path}: no 'prompt_embeds' tensor (found {sorted(d)[:5]}); expected prompt_embeds (N, {seq}, {dim}) "
               f"and optionally negative_prompt_embeds (1, {seq}, {dim})")
        raise InputError(f"--embeddings {why}", field="embeddings", flag="--embeddings",
                         request_message=f'"embeddings" {why}')
    out = []
    if seq is None and d["prompt_embeds"].ndim == 3:
        seq = int(d["prompt_embeds"].shape[1])
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        t = d.get(key)
        if t is None:
            out.append(None)
            continue
        if t.ndim != 3 or tuple(t.shape[1:]) != (seq, dim) or (key == "negative_prompt_embeds" and t.shape[0] != 1):
            want = f"({'N' if key == 'prompt_embeds' else 1}, {seq}, {dim})"
            why = (f"{path}: {key} has shape {tuple(t.shape)}; this UNet takes {want} (sequence length {seq}, "
                   f"cross-attention width {dim})")
            raise InputError(f"--embeddings {why}", field="embeddings", flag="--embeddings",
                             request_message=f'"embeddings" {why}')
        out.append(t.float())
    return out[0], out[1]


# ---- a tiny Stable Diffusion layout pipeline, written offline (tests, tools) --------------------------------------


