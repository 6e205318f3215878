"""Random-weight models built offline, for tests and profiling: tiny UNets, the profiled architectures (``ARCHS``:
DDPM-CIFAR10, SD 1.5's and SDXL's UNets, DiT-XL/2) and Stable Diffusion layout pipeline directories."""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from trt_dm.models.denoisers import FLOW_DEFAULT_SCHEDULER, FLUX_DEFAULT_SCHEDULER, denoiser_class
from trt_dm.models.loading import ModelLoadError, load_model

# Tiny models for tests and tools: ~45k / ~52k parameters, one attention level (+ mid block), 1 channel.
TINY_UNET2D_CONFIG = MappingProxyType(dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4, attention_head_dim=8))
TINY_UNET2D_CONDITION_CONFIG = MappingProxyType(dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),  # + the cross-attention mid block
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2))  # diffusers: this is the HEAD COUNT


def _tiny(cls: type, base: MappingProxyType, seed: int, overrides: dict[str, Any]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**{**base, **overrides}).eval()



def tiny_unet2d(seed: int = 0, **overrides: Any) -> UNet2DModel:
    """A tiny random UNet2DModel (16 px, 1 channel), deterministic for `seed`; `overrides` go to the config."""
    return _tiny(UNet2DModel, TINY_UNET2D_CONFIG, seed, overrides)



def tiny_unet2d_condition(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """A tiny random UNet2DConditionModel (8 px, 1 channel, cross_attention_dim 16), deterministic for `seed`."""
    return _tiny(UNet2DConditionModel, TINY_UNET2D_CONDITION_CONFIG, seed, overrides)


# A tiny class-conditional DiT: 8 px, 1 channel, patch 2 (16 tokens), 2 blocks of width 16, learned variance, 10 classes
TINY_DIT_CONFIG = MappingProxyType(dict(
    sample_size=8, in_channels=1, out_channels=2, patch_size=2, num_layers=2, num_attention_heads=2,
    attention_head_dim=8, num_embeds_ada_norm=10, norm_num_groups=1))


def tiny_dit(seed: int = 0, **overrides: Any) -> DiTTransformer2DModel:
    """A tiny random DiTTransformer2DModel (``TINY_DIT_CONFIG``), deterministic for `seed`."""
    return _tiny(DiTTransformer2DModel, TINY_DIT_CONFIG, seed, overrides)


def write_tiny_dit_pipeline(path: str | Path, seed: int = 0, *, latent: bool = False) -> Path:
    """A DiTPipeline-layout directory (model_index.json, transformer/, scheduler/), deterministic for ``seed``: the
    tiny DiT in pixel space, or with ``latent`` on 4-channel latents with a tiny 2-level VAE in vae/ (16 px images)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    path = Path(path)
    tiny_dit(seed, **(dict(in_channels=4, out_channels=8) if latent else {})).save_pretrained(
        path / "transformer", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2, beta_schedule="linear").save_pretrained(
        path / "scheduler")
    index = {"_class_name": "DiTPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
             "transformer": ["diffusers", "DiTTransformer2DModel"]}
    if latent:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                          norm_num_groups=4, layers_per_block=1).save_pretrained(path / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


# A tiny MMDiT (Stable Diffusion 3's layout): 8 px latents of 4 channels, patch 2 (16 tokens), 2 joint blocks of
# width 16, text tokens of width 12, pooled text embedding of width 8
TINY_SD3_CONFIG = MappingProxyType(dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=8,
    pos_embed_max_size=8))


def tiny_sd3(seed: int = 0, **overrides: Any) -> SD3Transformer2DModel:
    """A tiny random SD3Transformer2DModel (``TINY_SD3_CONFIG``), deterministic for `seed`."""
    return _tiny(SD3Transformer2DModel, TINY_SD3_CONFIG, seed, overrides)


def write_tiny_sd3(path: str | Path, seed: int = 0, *, shift: float = 3.0, **overrides: Any) -> Path:
    """A Stable Diffusion 3 layout directory without its text encoders and VAE (transformer/, scheduler/ with
    ``FlowMatchEulerDiscreteScheduler``), deterministic for ``seed``; ``overrides`` go to the transformer's config."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    path = Path(path)
    tiny_sd3(seed, **overrides).save_pretrained(path / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(path / "scheduler")
    return path


def _write_t5_tokenizer(tok_dir: Path) -> int:
    """A tiny T5 tokenizer (Unigram over a few words and the letters, "</s>" appended); its vocabulary size."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ("a", "the", "cat", "dog", "at", "dusk", "lighthouse", "red", "apple", "of", "on", "in", "and")
    pieces = ["<pad>", "</s>", "<unk>", *("\u2581" + w for w in words), "\u2581", *"abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram([(w, -float(i)) for i, w in enumerate(pieces)], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                 extra_ids=0).save_pretrained(str(tok_dir))
    return len(pieces)


def write_tiny_sd3_pipeline(path: str | Path, seed: int = 0, *, t5: bool = True, seq: int = 8,
                            clip: tuple[int, int] = (8, 12), projection: tuple[int, int] = (4, 6),
                            joint: int = 24, clip_layers: tuple[int, int] = (2, 2), clip_heads: tuple[int, int] = (2, 2),
                            vae_channels: tuple[int, ...] = (8, 16), latent_channels: int = 4,
                            **transformer: Any) -> Path:
    """A tiny random Stable Diffusion 3 pipeline (model_index.json, transformer/, scheduler/, text_encoder/ +
    tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/ (CLIP-G), with ``t5`` text_encoder_3/ + tokenizer_3/, vae/
    with a shift factor), all safetensors, deterministic for ``seed``: CLIP widths ``clip`` (``clip_layers``,
    ``clip_heads``, MLPs 4x) and pooled widths ``projection`` padded into the transformer's ``joint`` text width (T5's);
    ``transformer`` overrides its config."""
    import transformers
    from diffusers import AutoencoderKL
    path = Path(path)
    write_tiny_sd3(path, seed, **{"joint_attention_dim": joint, "pooled_projection_dim": sum(projection),
                                  "in_channels": latent_channels, "out_channels": latent_channels, **transformer})
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for i, suffix in enumerate(("", "_2")):
            vocab = _write_tokenizer(path / f"tokenizer{suffix}", seq)
            _text_encoder(vocab, clip[i], seq, clip_layers[i], clip_heads[i], 4 * clip[i],
                          projection=projection[i]).save_pretrained(
                str(path / f"text_encoder{suffix}"), safe_serialization=True)
            index[f"text_encoder{suffix}"] = ["transformers", "CLIPTextModelWithProjection"]
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        if t5:
            n = _write_t5_tokenizer(path / "tokenizer_3")
            cfg = transformers.T5Config(vocab_size=n, d_model=joint, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
            transformers.T5EncoderModel(cfg).eval().save_pretrained(str(path / "text_encoder_3"),
                                                                    safe_serialization=True)
            index.update(text_encoder_3=["transformers", "T5EncoderModel"],
                         tokenizer_3=["transformers", "T5TokenizerFast"])
        n = len(vae_channels)
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                      up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(vae_channels),
                      latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, scaling_factor=1.5305,
                      shift_factor=0.0609).save_pretrained(str(path / "vae"), safe_serialization=True)
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def write_tiny_flux_pipeline(path: str | Path, seed: int = 0, *, guidance_embeds: bool = True, seq: int = 8,
                             clip: int = 8, joint: int = 24, sample_size: int = 8, **transformer: Any) -> Path:
    """A tiny random Flux.1 pipeline (model_index.json, transformer/ (FluxTransformer2DModel on 2x2-packed 4-channel
    latents, one double- and one single-stream block, ``guidance_embeds``: Flux.1-dev's embedded guidance),
    scheduler/ (dynamic shifting), text_encoder/ (CLIPTextModel of width ``clip``) + tokenizer/, text_encoder_2/ (a
    T5 of width ``joint``) + tokenizer_2/, vae/ (shifted), trt_dm.json with the ``sample_size`` it samples at),
    safetensors, deterministic for ``seed``; ``transformer`` overrides the transformer's config."""
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    path = Path(path)
    cfg = {**dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=joint, pooled_projection_dim=clip,
                  guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)), **transformer}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        FluxTransformer2DModel(**cfg).eval().save_pretrained(path / "transformer", safe_serialization=True)
        vocab = _write_tokenizer(path / "tokenizer", seq)
        _text_encoder(vocab, clip, seq, 2, 2, 4 * clip).save_pretrained(str(path / "text_encoder"),
                                                                         safe_serialization=True)
        n = _write_t5_tokenizer(path / "tokenizer_2")
        t5 = transformers.T5Config(vocab_size=n, d_model=joint, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        transformers.T5EncoderModel(t5).eval().save_pretrained(str(path / "text_encoder_2"), safe_serialization=True)
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                      norm_num_groups=4, layers_per_block=1, scaling_factor=0.3611, shift_factor=0.1159
                      ).save_pretrained(str(path / "vae"), safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**{k: v for k, v in FLUX_DEFAULT_SCHEDULER.items() if k != "_class_name"}
                                    ).save_pretrained(path / "scheduler")
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    (path / "trt_dm.json").write_text(json.dumps({"sample_size": sample_size}))
    return path


def write_tiny_pixart_pipeline(path: str | Path, seed: int = 0, *, kind: str = "PixArtSigmaPipeline", width: int = 16,
                               learned_sigma: bool = True, t5_heads: int = 2, t5_ff: int = 32, t5_layers: int = 1,
                               vae_channels: tuple[int, ...] = (8, 16), **transformer: Any) -> Path:
    """A tiny random PixArt pipeline (model_index.json naming ``kind``, transformer/ (PixArtTransformer2DModel, 8 px
    latents of 4 channels, patch 2, 2 blocks, ``learned_sigma``: 8 output channels), scheduler/ (DPM-Solver's config,
    as PixArt ships), text_encoder/ (a 1-layer T5 encoder of ``width``) + tokenizer/ (T5), vae/), safetensors,
    deterministic for ``seed``; ``transformer`` overrides the transformer's config."""
    import transformers
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    path = Path(path)
    cfg = {**dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8 if learned_sigma else 4, num_layers=2,
                  num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=width,
                  use_additional_conditions=False, norm_type="ada_norm_single", num_embeds_ada_norm=1000),
           **transformer}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        PixArtTransformer2DModel(**cfg).eval().save_pretrained(path / "transformer", safe_serialization=True)
        n = _write_t5_tokenizer(path / "tokenizer")
        t5 = transformers.T5Config(vocab_size=n, d_model=width, d_kv=width // t5_heads, d_ff=t5_ff,
                                   num_layers=t5_layers, num_heads=t5_heads, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)
        transformers.T5EncoderModel(t5).eval().save_pretrained(str(path / "text_encoder"), safe_serialization=True)
        k = len(vae_channels)
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * k,
                      up_block_types=("UpDecoderBlock2D",) * k, block_out_channels=tuple(vae_channels),
                      latent_channels=4, norm_num_groups=4, layers_per_block=1).save_pretrained(
            str(path / "vae"), safe_serialization=True)
    DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                num_train_timesteps=1000).save_pretrained(path / "scheduler")
    index = {"_class_name": kind, "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


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



def _write_tokenizer(tok_dir: Path, seq: int) -> dict[str, int]:
    """A byte-level BPE CLIP tokenizer (256 byte symbols and their word-final forms, a few merges); its vocabulary."""
    import transformers
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    for m in _TINY_MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_TINY_MERGES) + "\n", encoding="utf-8")
    transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                               model_max_length=seq).save_pretrained(str(tok_dir))
    return vocab


def _text_encoder(vocab: dict[str, int], hidden: int, seq: int, layers: int, heads: int, intermediate: int | None,
                  projection: int | None = None):
    import transformers
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=seq,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], projection_dim=projection or hidden)
    cls = transformers.CLIPTextModel if projection is None else transformers.CLIPTextModelWithProjection
    return cls(cfg).eval()


def write_tiny_sd_pipeline(path: str | Path, seed: int = 0, *, hidden: int = 16, seq: int = 8, layers: int = 2,
                           heads: int = 2, unet: dict | None = None, latent_channels: int = 4,
                           vae_channels: tuple[int, ...] = (8, 16), scaling_factor: float = 0.18215,
                           intermediate: int | None = None, vae_groups: int = 4, vae_layers: int = 1,
                           sdxl: dict | None = None) -> Path:
    """A tiny random text-to-image pipeline in the Stable Diffusion layout (model_index.json, unet/, scheduler/,
    text_encoder/, tokenizer/, vae/), all safetensors, deterministic for ``seed``: a byte-level BPE CLIP tokenizer,
    a CLIP text model of width ``hidden`` and sequence length ``seq``, a VAE with ``len(vae_channels)`` levels and a
    UNet2DConditionModel on its latents. With ``sdxl`` ({"hidden": width of the second encoder, "projection": its
    pooled width, "time_dim": addition_time_embed_dim; optionally its "layers", "heads", "intermediate"}) SDXL base's
    layout instead: also text_encoder_2/ (a
    CLIPTextModelWithProjection) and tokenizer_2/, the UNet reading both encoders' states side by side
    (cross_attention_dim = hidden + sdxl["hidden"]) and the added text_time embedding, an Euler scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    path = Path(path)
    vocab = _write_tokenizer(path / "tokenizer", seq)
    cross = hidden
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _text_encoder(vocab, hidden, seq, layers, heads, intermediate).save_pretrained(
            str(path / "text_encoder"), safe_serialization=True)
        if sdxl:
            _write_tokenizer(path / "tokenizer_2", seq)
            _text_encoder(vocab, sdxl["hidden"], seq, sdxl.get("layers", layers), sdxl.get("heads", heads),
                          sdxl.get("intermediate", intermediate), projection=sdxl["projection"]
                          ).save_pretrained(str(path / "text_encoder_2"), safe_serialization=True)
            cross = hidden + sdxl["hidden"]
        n = len(vae_channels)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(vae_channels),
                            latent_channels=latent_channels, norm_num_groups=vae_groups, layers_per_block=vae_layers,
                            scaling_factor=scaling_factor)
        vae.save_pretrained(str(path / "vae"), safe_serialization=True)
        cfg = dict(sample_size=8, in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(8, 16),
                   layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4, cross_attention_dim=cross,
                   attention_head_dim=2)
        if sdxl:
            cfg.update(addition_embed_type="text_time", addition_time_embed_dim=sdxl["time_dim"],
                       projection_class_embeddings_input_dim=sdxl["projection"] + 6 * sdxl["time_dim"])
        UNet2DConditionModel(**{**cfg, **(unet or {})}).save_pretrained(str(path / "unet"), safe_serialization=True)
    sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    if sdxl:
        EulerDiscreteScheduler(**sched, timestep_spacing="leading").save_pretrained(str(path / "scheduler"))
        for k in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            del index[k]
        index.update({"_class_name": "StableDiffusionXLPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
    else:
        DDIMScheduler(**sched, clip_sample=False, set_alpha_to_one=False).save_pretrained(str(path / "scheduler"))
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def write_sd15_layout_pipeline(path: str | Path, seed: int = 0, *, text_layers: int = 12) -> Path:
    """A random-weight pipeline at Stable Diffusion 1.5's sizes, for scale runs (no downloads): the 859.5 M
    parameter UNet (``trt_dm.profile.ARCHS['sd15-unet']``, 64x64 latents), a CLIP ViT-L/14-sized text encoder
    (width 768, 12 heads, 77 tokens, MLP 3072, ``text_layers`` layers; the tiny byte-level tokenizer, so a small
    vocabulary) and a VAE with SD's channels (128, 256, 512, 512; 8x: 512x512 images)."""
    unet = dict(ARCHS["sd15-unet"][1], down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
    return write_tiny_sd_pipeline(path, seed, hidden=768, seq=77, layers=text_layers, heads=12, intermediate=3072,
                                  unet=unet, vae_channels=(128, 256, 512, 512), vae_groups=32, vae_layers=2)


def write_sdxl_layout_pipeline(path: str | Path, seed: int = 0, *, text_layers: tuple[int, int] = (12, 32),
                               sample_size: int = 128) -> Path:
    """A random-weight pipeline at SDXL base's sizes, for scale runs (no downloads): the 2.567 B parameter UNet
    (``ARCHS['sdxl-unet']``; ``sample_size`` latents, 128 = 1024 px), text encoders of CLIP ViT-L's and OpenCLIP
    ViT-bigG's sizes (widths 768 and 1280, 12 and 20 heads, MLPs 3072 and 5120, ``text_layers`` layers, a 1280-wide
    pooled projection, 77 tokens; the tiny byte-level tokenizer, so small vocabularies) and SDXL's VAE channels."""
    unet = dict(ARCHS["sdxl-unet"][1], sample_size=sample_size)
    for k in ("cross_attention_dim", "addition_embed_type", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim"):
        unet.pop(k)  # set by the sdxl layout from the encoders' widths
    return write_tiny_sd_pipeline(path, seed, hidden=768, seq=77, layers=text_layers[0], heads=12, intermediate=3072,
                                  unet=unet, vae_channels=(128, 256, 512, 512), vae_groups=32, vae_layers=2,
                                  scaling_factor=0.13025,
                                  sdxl={"hidden": 1280, "projection": 1280, "time_dim": 256, "layers": text_layers[1],
                                        "heads": 20, "intermediate": 5120})


# Architectures with random weights (diffusers configs). ddpm-cifar10: Ho et al.'s CIFAR-10 UNet as in
# google/ddpm-cifar10-32 (35.7 M parameters); sd15-unet: Stable Diffusion 1.5's UNet (859.5 M); sdxl-unet: SDXL
# base's UNet (2.567 B; stabilityai/stable-diffusion-xl-base-1.0's unet/config.json); dit-xl-2: DiT-XL/2 at 256 px
# (facebook/DiT-XL-2-256's transformer/config.json: 749.8 M in diffusers' layout, where each of the 28 blocks holds
# its own copy of the timestep / class embedding; the paper's 675 M counts them once); pixart-sigma: PixArt-Sigma-XL-2
# at 1024 px (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS's transformer/config.json: 0.61 B); sd3-medium: Stable
# Diffusion 3 medium's MMDiT (stabilityai/stable-diffusion-3-medium-diffusers' transformer/config.json: 2.03 B).
ARCHS: dict[str, tuple[str, dict]] = {
    "ddpm-cifar10": ("UNet2DModel", dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None)),
    "sd15-unet": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)),
    "sdxl-unet": ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        norm_num_groups=32)),
    "dit-xl-2": ("DiTTransformer2DModel", dict(
        sample_size=32, in_channels=4, out_channels=8, patch_size=2, num_layers=28, num_attention_heads=16,
        attention_head_dim=72, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_num_groups=32,
        activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False)),
    "pixart-sigma": ("PixArtTransformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
        attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False,
        norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False)),
    "sd3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192)),
}


def write_pixart_layout_pipeline(path: str | Path, seed: int = 0, *, sample_size: int = 128, t5_layers: int = 2
                                 ) -> Path:
    """A random-weight PixArt-Sigma pipeline at its 1024-px sizes, for scale runs: the 0.61 B transformer
    (``ARCHS['pixart-sigma']``; ``sample_size`` latents), a T5 encoder of T5-XXL's width (4096, 64 heads of 64, MLP
    10240) with ``t5_layers`` of its 24 layers (the whole encoder is 4.7 B parameters; the transformer's cost does not
    depend on it), SD's VAE channels, 300 tokens."""
    cfg = {k: v for k, v in ARCHS["pixart-sigma"][1].items() if k != "caption_channels"}
    return write_tiny_pixart_pipeline(path, seed, width=4096, t5_heads=64, t5_ff=10240, t5_layers=t5_layers,
                                      vae_channels=(128, 256, 512, 512), **{**cfg, "sample_size": sample_size})


def write_sd3_layout_pipeline(path: str | Path, seed: int = 0, *, sample_size: int = 128,
                              text_layers: tuple[int, int] = (12, 32)) -> Path:
    """A random-weight pipeline at Stable Diffusion 3 medium's sizes, for scale runs (no downloads): the 2.03 B
    MMDiT (``ARCHS['sd3-medium']``; ``sample_size`` latents, 128 = 1024 px), text encoders of CLIP ViT-L's and
    OpenCLIP ViT-bigG's sizes (widths 768 and 1280, their pooled projections 768 + 1280 = 2048, 77 tokens) and no
    T5 (4.7 B parameters: the pipeline then feeds zeros in its place, as diffusers' does without text_encoder_3),
    SD3's VAE (16 latent channels, 8x)."""
    cfg = {k: v for k, v in ARCHS["sd3-medium"][1].items() if k not in ("joint_attention_dim", "pooled_projection_dim")}
    return write_tiny_sd3_pipeline(path, seed, t5=False, seq=77, clip=(768, 1280), projection=(768, 1280), joint=4096,
                                   clip_layers=text_layers, clip_heads=(12, 20), vae_channels=(128, 256, 512, 512),
                                   latent_channels=16, **{**cfg, "sample_size": sample_size})



def write_arch_pipeline(path: str | Path, name: str, seed: int = 0) -> Path:
    """An ``ARCHS`` entry without text (random weights) as a pipeline directory: unet/ (a DiT: transformer/, its
    latents left undecoded: no vae/) and a DDPM scheduler/."""
    from diffusers import DDPMScheduler
    path = Path(path)
    kind = ARCHS[name][0]
    if kind not in ("UNet2DModel", "DiTTransformer2DModel"):
        raise ValueError(f"{name!r} is a {kind}; write_arch_pipeline writes the ones without text")
    unet, sched = build_arch(name, seed)
    folder, pipeline = ("unet", "DDPMPipeline") if kind == "UNet2DModel" else ("transformer", "DiTPipeline")
    unet.save_pretrained(str(path / folder), safe_serialization=True)
    DDPMScheduler(**sched).save_pretrained(str(path / "scheduler"))
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "scheduler": [
        "diffusers", "DDPMScheduler"], folder: ["diffusers", kind]}, indent=2))
    return path


def build_arch(name: str, seed: int = 0):
    """(unet, schedule config) for an ARCHS entry (random weights), 'default' or a model directory."""
    if name not in ARCHS:
        try:
            m = load_model(name)
        except ModelLoadError as e:
            raise ValueError(f"--arch {name!r} is neither one of {', '.join(ARCHS)} nor a loadable model ({e})") from None
        return m.unet, m.scheduler_config
    cls, cfg = ARCHS[name]
    torch.manual_seed(seed)
    sched = dict(FLOW_DEFAULT_SCHEDULER) if cls == "SD3Transformer2DModel" else {"num_train_timesteps": 1000}
    return denoiser_class(cls, cfg)(**cfg).eval(), sched
