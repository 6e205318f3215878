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
        raise TextPipelineError(f"{path}: not UTF-8 text ({e}); a prompts file has one prompt per line") from None
    prompts = tuple(s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#"))
    if not prompts:
        raise TextPipelineError(f"{path}: no prompts (one per line; # starts a comment)")
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

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] (``vae.decode(latents / scaling_factor)``)."""
        outs = [self.vae.decode(latents[i:i + batch].float() / self.scaling_factor).sample.clamp(-1, 1)
                for i in range(0, len(latents), batch)]
        return torch.cat(outs) if outs else latents.new_empty(0, 3, *latents.shape[2:])

    def describe(self) -> dict:
        return {"text_encoder": str(self.root / "text_encoder"), "vae": str(self.root / "vae"),
                "text_encoder_sha256": self.fingerprints.get("text_encoder"),
                "vae_sha256": self.fingerprints.get("vae"), "vae_scaling_factor": self.scaling_factor}


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
        raise TextPipelineError(f"--embeddings {path}: expected a .safetensors file with prompt_embeds (N, {seq}, {dim})")
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise TextPipelineError(f"--embeddings {path}: cannot read it as safetensors ({e})") from None
    if "prompt_embeds" not in d:
        raise TextPipelineError(f"--embeddings {path}: no 'prompt_embeds' tensor (found {sorted(d)[:5]}); expected "
                                f"prompt_embeds (N, {seq}, {dim}) and optionally negative_prompt_embeds (1, {seq}, {dim})")
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
            raise TextPipelineError(f"--embeddings {path}: {key} has shape {tuple(t.shape)}; this UNet takes {want} "
                                    f"(sequence length {seq}, cross-attention width {dim})")
        out.append(t.float())
    return out[0], out[1]


# ---- a tiny Stable Diffusion layout pipeline, written offline (tests, tools) --------------------------------------

def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: the 256 symbols byte-level BPE vocabularies are made of."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


_TINY_MERGES = ("t h", "th e</w>", "a n", "an d</w>", "o n</w>", "i n", "e r</w>")


def write_tiny_sd_pipeline(path: str | Path, seed: int = 0, *, hidden: int = 16, seq: int = 8, layers: int = 2,
                           heads: int = 2, unet: dict | None = None, latent_channels: int = 4,
                           vae_channels: tuple[int, ...] = (8, 16), scaling_factor: float = 0.18215,
                           intermediate: int | None = None, vae_groups: int = 4, vae_layers: int = 1) -> Path:
    """A tiny random text-to-image pipeline in the Stable Diffusion layout (model_index.json, unet/, scheduler/,
    text_encoder/, tokenizer/, vae/), all safetensors, deterministic for ``seed``: a byte-level BPE CLIP tokenizer
    (256 byte symbols and their word-final forms, a few merges), a CLIP text model of width ``hidden`` and
    sequence length ``seq``, a VAE with ``len(vae_channels)`` levels and a UNet2DConditionModel on its latents."""
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    path = Path(path)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    for m in _TINY_MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok_dir = path / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_TINY_MERGES) + "\n", encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                           model_max_length=seq)
    tokenizer.save_pretrained(str(tok_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=seq, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])).eval()
        te.save_pretrained(str(path / "text_encoder"), safe_serialization=True)
        n = len(vae_channels)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(vae_channels),
                            latent_channels=latent_channels, norm_num_groups=vae_groups, layers_per_block=vae_layers,
                            scaling_factor=scaling_factor)
        vae.save_pretrained(str(path / "vae"), safe_serialization=True)
        cfg = dict(sample_size=8, in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(8, 16),
                   layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4, cross_attention_dim=hidden,
                   attention_head_dim=2)
        UNet2DConditionModel(**{**cfg, **(unet or {})}).save_pretrained(str(path / "unet"), safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(str(path / "scheduler"))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    return path


def write_sd15_layout_pipeline(path: str | Path, seed: int = 0, *, text_layers: int = 12) -> Path:
    """A random-weight pipeline at Stable Diffusion 1.5's sizes, for scale runs (no downloads): the 859.5 M
    parameter UNet (``trt_dm.profile.ARCHS['sd15-unet']``, 64x64 latents), a CLIP ViT-L/14-sized text encoder
    (width 768, 12 heads, 77 tokens, MLP 3072, ``text_layers`` layers; the tiny byte-level tokenizer, so a small
    vocabulary) and a VAE with SD's channels (128, 256, 512, 512; 8x: 512x512 images)."""
    from .profile import ARCHS
    unet = dict(ARCHS["sd15-unet"][1], down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
    return write_tiny_sd_pipeline(path, seed, hidden=768, seq=77, layers=text_layers, heads=12, intermediate=3072,
                                  unet=unet, vae_channels=(128, 256, 512, 512), vae_groups=32, vae_layers=2)
