"""Text-to-image pipelines in the diffusers Stable Diffusion layout: the parts around the UNet.

A pipeline directory with ``model_index.json``, ``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/`` and
``vae/``: prompts are tokenized by its tokenizer and encoded by its text encoder (transformers; the last hidden
state is the UNet's ``encoder_hidden_states``, as in diffusers' StableDiffusionPipeline), sampling runs on the
UNet's latents, and its VAE (diffusers ``AutoencoderKL``) decodes ``latents / scaling_factor`` into images. Only
the UNet is quantized; the text encoder and the VAE run in torch here. Everything loads from local directories,
weights from safetensors only (a pickle-only component is refused), nothing is fetched from a hub.

Precomputed embeddings (any encoder) come from a safetensors file in diffusers' names: ``prompt_embeds`` (N, S, D) and
optionally ``negative_prompt_embeds`` (1, S, D); for an SDXL-layout UNet also ``pooled_prompt_embeds`` (N, P) (and
``negative_pooled_prompt_embeds`` (1, P) with a negative) and optionally ``add_time_ids`` (N or 1, 6) and
``negative_add_time_ids`` (1, 6), which default to the image size's (original = target size, no crop).
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
def decode_latents(vae: torch.nn.Module, scaling_factor: float, latents: torch.Tensor, batch: int = 16, *,
                   shift_factor: float = 0.0) -> torch.Tensor:
    """Latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] (``vae.decode(latents / scaling_factor +
    shift_factor)``; SD3's VAE shifts), in batches."""
    outs = [vae.decode(latents[i:i + batch].float() / scaling_factor + shift_factor).sample.clamp(-1, 1)
            for i in range(0, len(latents), batch)]
    return torch.cat(outs) if outs else latents.new_empty(0, 3, *latents.shape[2:])


@dataclass
class TextPipeline:
    """Tokenizer(s) + text encoder(s) + VAE of a Stable Diffusion (one encoder) or SDXL (two) layout pipeline (all in
    torch, float32, eval mode)."""
    root: Path
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scaling_factor: float
    fingerprints: dict = field(default_factory=dict)  # component -> sha256 of its weight files
    tokenizer_2: object = None  # SDXL: the second tokenizer and text encoder (CLIPTextModelWithProjection)
    text_encoder_2: torch.nn.Module | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: the empty negative prompt is all zeros, not its encoding
    released: bool = False  # ``release``d: encoders and VAE dropped

    def __post_init__(self) -> None:
        self._vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def sdxl(self) -> bool:
        return self.tokenizer_2 is not None

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def hidden_size(self) -> int:
        """The width of the UNet's encoder_hidden_states this pipeline makes (SDXL: both encoders' side by side)."""
        return sum(int(te.config.hidden_size) for te in self._encoders()[1])

    @property
    def pooled_size(self) -> int | None:
        """SDXL: the width of the pooled, projected embedding (the UNet's ``text_embeds``); None otherwise."""
        return int(self.text_encoder_2.config.projection_dim) if self.sdxl else None

    @property
    def vae_scale_factor(self) -> int:
        return self._vae_scale

    def _encoders(self) -> tuple[list, list]:
        if self.sdxl:
            return [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2]
        return [self.tokenizer], [self.text_encoder]

    def _chunks(self, prompts: Sequence[str] | str, size: int = 64) -> list[list[str]]:
        """``prompts`` in batches of ``size`` for the encoders; RuntimeError once they were released."""
        if self.released:
            raise RuntimeError(f"{self.root}: the text encoders were released after calibration; load the model again")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [prompts[i:i + size] for i in range(0, len(prompts), size)]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's text inputs for ``prompts``, padded to the tokenizer's max length and truncated, float32:
        ``encoder_hidden_states`` (N, max_length, hidden), the text encoder's last hidden state
        (StableDiffusionPipeline.encode_prompt without clip-skip or LoRA); for SDXL both encoders' penultimate hidden
        states side by side and ``text_embeds`` (N, pooled), the second encoder's pooled projection
        (StableDiffusionXLPipeline.encode_prompt)."""
        hidden, pooled = [], []
        for chunk in self._chunks(prompts):
            parts = []
            for tok, te in zip(*self._encoders()):
                ids = tok(chunk, padding="max_length", max_length=tok.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
                out = te(ids, output_hidden_states=self.sdxl)
                parts.append((out.hidden_states[-2] if self.sdxl else out[0]).float())
            hidden.append(torch.cat(parts, dim=-1))
            if self.sdxl:
                pooled.append(out[0].float())  # CLIPTextModelWithProjection: text_embeds
        enc = {"encoder_hidden_states": torch.cat(hidden)}
        if self.sdxl:
            enc["text_embeds"] = torch.cat(pooled)
        return enc

    def encode_negative(self, prompt: str = "") -> dict[str, torch.Tensor]:
        """``encode([prompt])``; an SDXL pipeline with ``force_zeros_for_empty_prompt`` makes the empty one zeros."""
        enc = self.encode([prompt])
        if self.force_zeros_for_empty_prompt and prompt == "":
            enc = {k: torch.zeros_like(v) for k, v in enc.items()}
        return enc

    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        return decode_latents(self.vae, self.scaling_factor, latents, batch)

    def release(self) -> None:
        """Drop the text encoders and the VAE (their paths and sha256 stay for reports): for runs that have encoded
        their prompts and decode nothing more (``deploy(release=True)``: 3 GB for SDXL's encoders)."""
        self.text_encoder = self.text_encoder_2 = self.vae = None
        self.released = True

    def describe(self) -> dict:
        d = {"text_encoder": str(self.root / "text_encoder"), "vae": str(self.root / "vae"),
             "text_encoder_sha256": self.fingerprints.get("text_encoder"),
             "vae_sha256": self.fingerprints.get("vae"), "vae_scaling_factor": self.scaling_factor}
        if self.sdxl:
            d.update(text_encoder_2=str(self.root / "text_encoder_2"),
                     text_encoder_2_sha256=self.fingerprints.get("text_encoder_2"),
                     force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        return d


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
    return (any((root / d).exists() for d in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
            or _index_names_text(root))


def _model_index(root: Path) -> dict:
    index = root / "model_index.json"
    if not index.is_file():
        return {}
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def model_index_class(root: Path) -> str | None:
    """The pipeline class ``model_index.json`` names, or None."""
    return _model_index(root).get("_class_name")


def _index_names_text(root: Path) -> bool:
    return _model_index(root).get("text_encoder") not in (None, [None, None])


def _load_encoder(transformers, root: Path, suffix: str, archs: tuple[str, ...]):
    """(tokenizer, text encoder, weight files) of ``text_encoder<suffix>/`` and ``tokenizer<suffix>/``."""
    te_dir, tok_dir = root / f"text_encoder{suffix}", root / f"tokenizer{suffix}"
    files = _safetensors_in(te_dir, f"text encoder (text_encoder{suffix}/)")
    if not tok_dir.is_dir():
        raise TextPipelineError(f"{tok_dir}: the pipeline has no tokenizer{suffix} directory (vocab.json + merges.txt "
                                "of a CLIP tokenizer, as save_pretrained writes it)")
    try:
        config = json.loads((te_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TextPipelineError(f"{te_dir / 'config.json'}: not valid JSON ({e})") from None
    arch = (config.get("architectures") or [None])[0]
    if arch not in archs:
        raise TextPipelineError(f"{te_dir}: text encoder {arch!r} is not supported here; supported: {archs}")
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # missing vocab / merges, damaged JSON: transformers raises many types
        raise TextPipelineError(f"{tok_dir}: cannot load the CLIP tokenizer ({type(e).__name__}: {e}); expected "
                                "vocab.json and merges.txt (save_pretrained layout)") from None
    try:
        with torch.random.fork_rng(devices=[]):
            encoder = getattr(transformers, arch).from_pretrained(str(te_dir), local_files_only=True,
                                                                  use_safetensors=True, dtype=torch.float32)
    except Exception as e:
        raise TextPipelineError(f"{te_dir}: cannot load the text encoder ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); expected a save_pretrained directory "
                                "with config.json and safetensors weights") from None
    if tokenizer.model_max_length > encoder.config.max_position_embeddings:
        raise TextPipelineError(f"{tok_dir}: model_max_length {tokenizer.model_max_length} is longer than the text "
                                f"encoder's {encoder.config.max_position_embeddings} positions")
    return tokenizer, encoder.eval().requires_grad_(False), files


def load_text_pipeline(root: Path) -> TextPipeline:
    """The tokenizer(s), text encoder(s) and VAE of the pipeline at ``root`` (local files only, safetensors only):
    Stable Diffusion's layout (text_encoder/, tokenizer/) or SDXL's (and text_encoder_2/, tokenizer_2/)."""
    try:
        import transformers
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise TextPipelineError(f"text-to-image pipelines need transformers (pip install 'trt_dm[text]'): "
                                f"{e}") from None
    transformers.utils.logging.disable_progress_bar()  # its per-load "Loading weights" bars
    sdxl = (root / "text_encoder_2").exists()
    if sdxl and not (root / "text_encoder").exists():
        raise TextPipelineError(f"{root}: text_encoder_2/ without text_encoder/ (SDXL's refiner layout, which "
                                "conditions on an aesthetic score) is not supported; supported: Stable Diffusion's "
                                "layout (text_encoder/) and SDXL base's (text_encoder/ and text_encoder_2/)")
    tokenizer, text_encoder, te_files = _load_encoder(transformers, root, "", TEXT_ENCODER_CLASSES)
    fingerprints = {"text_encoder": _sha256_files(te_files)}
    tokenizer_2 = text_encoder_2 = None
    if sdxl:
        tokenizer_2, text_encoder_2, files = _load_encoder(transformers, root, "_2", ("CLIPTextModelWithProjection",))
        fingerprints["text_encoder_2"] = _sha256_files(files)
        if tokenizer_2.model_max_length != tokenizer.model_max_length:
            raise TextPipelineError(f"{root}: tokenizer/ pads to {tokenizer.model_max_length} tokens and tokenizer_2/ "
                                    f"to {tokenizer_2.model_max_length}; SDXL's encoders must give one sequence length")
    vae_dir = root / "vae"
    vae_files = _safetensors_in(vae_dir, "VAE")
    try:
        with torch.random.fork_rng(devices=[]):
            vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True, use_safetensors=True,
                                                low_cpu_mem_usage=False, torch_dtype=torch.float32)
    except Exception as e:
        raise TextPipelineError(f"{vae_dir}: cannot load the VAE ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); expected a save_pretrained directory "
                                "with config.json and safetensors weights") from None
    vae.eval().requires_grad_(False)
    fingerprints["vae"] = _sha256_files(vae_files)
    sf = getattr(vae.config, "scaling_factor", None) or 0.18215
    zeros = bool(_model_index(root).get("force_zeros_for_empty_prompt", True)) if sdxl else False
    return TextPipeline(root=root, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scaling_factor=float(sf),
                        fingerprints=fingerprints, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
                        force_zeros_for_empty_prompt=zeros)


def _embeddings_error(path: Path, why: str, flag: str = "--embeddings") -> InputError:
    return InputError(f"{flag} {path}: {why}", field=flag.lstrip("-").replace("-", "_"), flag=flag,
                      request_message=f'"embeddings" {path}: {why}')


def load_embeddings(path: str | Path, seq: int | None, dim: int, pooled: int | None = None, *,
                    flag: str = "--embeddings", time_ids: bool = True,
                    mask: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(rows, negative) from a safetensors file (module docstring): rows {UNet input: (N, ...)} and the negative's
    {input: (1, ...)} or None, checked against the pipeline's sequence length (None: any, the same for all), the UNet's
    cross-attention width ``dim`` and, for an SDXL-layout UNet or SD3, its pooled width ``pooled`` (SDXL also takes
    time ids; SD3, ``time_ids=False``, does not); with ``mask`` (PixArt) also ``prompt_attention_mask`` (N, S) and with
    a negative ``negative_prompt_attention_mask`` (1, S): 1 = a token, 0 = padding."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if path.suffix != ".safetensors":
        raise _embeddings_error(path, f"expected a .safetensors file with prompt_embeds (N, {seq}, {dim})", flag=flag)
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _embeddings_error(path, f"cannot read it as safetensors ({e})", flag=flag) from None
    if "prompt_embeds" not in d:
        raise _embeddings_error(path, f"no 'prompt_embeds' tensor (found {sorted(d)[:5]}); expected prompt_embeds "
                                      f"(N, {seq}, {dim}) and optionally negative_prompt_embeds (1, {seq}, {dim})",
                                flag=flag)
    if seq is None and d["prompt_embeds"].ndim == 3:
        seq = int(d["prompt_embeds"].shape[1])
    # {key: (leading dim: "N" (one per prompt), "1" or "N|1", trailing shape)}
    want = {"prompt_embeds": ("N", (seq, dim)), "negative_prompt_embeds": ("1", (seq, dim))}
    sdxl = {"pooled_prompt_embeds": ("N", (pooled,)), "negative_pooled_prompt_embeds": ("1", (pooled,)),
            "add_time_ids": ("N|1", (6,)), "negative_add_time_ids": ("1", (6,))}
    if pooled is None:
        extra = sorted(k for k in sdxl if k in d)
        if extra:
            raise _embeddings_error(path, f"{extra} are SDXL inputs, but this UNet takes only prompt_embeds "
                                          f"(N, {seq}, {dim}) and negative_prompt_embeds (1, {seq}, {dim})", flag=flag)
    else:
        if not time_ids:
            sdxl = {k: v for k, v in sdxl.items() if "time_ids" not in k}
            extra = sorted(k for k in d if "time_ids" in k)
            if extra:
                raise _embeddings_error(path, f"{extra} are SDXL's micro-conditioning; this model takes prompt_embeds "
                                              f"(N, {seq}, {dim}) and pooled_prompt_embeds (N, {pooled}) only",
                                        flag=flag)
        want.update(sdxl)
        for key, pair in (("pooled_prompt_embeds", "prompt_embeds"),
                          ("negative_pooled_prompt_embeds", "negative_prompt_embeds")):
            if (key in d) != (pair in d):
                    raise _embeddings_error(path, f"this model needs {key} (the pooled text embedding, "
                                              f"({want[key][0]}, {pooled})) with {pair}, and only with it", flag=flag)
    if mask:
        want.update(prompt_attention_mask=("N", (seq,)), negative_prompt_attention_mask=("1", (seq,)))
        for key, pair in (("prompt_attention_mask", "prompt_embeds"),
                          ("negative_prompt_attention_mask", "negative_prompt_embeds")):
            if (key in d) != (pair in d):
                raise _embeddings_error(path, f"this model needs {key} (the tokens' padding mask, ({want[key][0]}, "
                                              f"{seq}): 1 = a token, 0 = padding) with {pair}, and only with it",
                                        flag=flag)
    n = int(d["prompt_embeds"].shape[0])
    for key, (lead, tail) in want.items():
        t = d.get(key)
        leads = {"N": (n,), "1": (1,), "N|1": (n, 1)}[lead]
        if t is not None and (t.ndim != 1 + len(tail) or t.shape[0] not in leads or tuple(t.shape[1:]) != tail):
            where = f"sequence length {seq}, cross-attention width {dim}" + (f", pooled width {pooled}" * bool(pooled))
            raise _embeddings_error(path, f"{key} has shape {tuple(t.shape)}; this UNet takes "
                                          f"({lead}, {', '.join(map(str, tail))}) with N = {n} prompts ({where})",
                                    flag=flag)
    names = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "text_embeds",
             "add_time_ids": "time_ids", "prompt_attention_mask": "encoder_attention_mask"}
    rows = {v: d[k].float() for k, v in names.items() if k in d}
    negative = {v: d[f"negative_{k}"].float() for k, v in names.items() if f"negative_{k}" in d}
    return rows, negative or None


def text_rows(loaded, n: int, prompts: Sequence[str] | None, embeddings) -> dict[str, torch.Tensor]:
    """The text conditioning of ``n`` images (``LoadedModel.conditioning_for``): ``prompts`` encoded by the pipeline's
    encoders or ``embeddings`` ({input: (N, ...)} of ``load_embeddings``, or encoder_hidden_states alone), cycled
    over the images; SDXL's time ids default to the image size's."""
    if prompts is not None and embeddings is not None:
        raise InputError("give prompts or embeddings, not both", field="prompt", flag="--prompt")
    if embeddings is not None:  # {input: (N, ...)} (``load_embeddings``) or encoder_hidden_states alone
        rows = dict(embeddings) if isinstance(embeddings, dict) else {"encoder_hidden_states": embeddings}
    elif prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise InputError("no prompts given", field="prompt", flag="--prompt")
        if loaded.text is None:
            why = (f"{loaded.name!r} has no text encoder (not a Stable Diffusion or SDXL layout pipeline with "
                   "text_encoder/ and tokenizer/): prompts cannot be encoded")
            raise InputError(f"{why}; give --embeddings FILE.safetensors with prompt_embeds (N, S, D)"
                             + (" and pooled_prompt_embeds (N, P)" if loaded.pooled_dim else ""),
                             field="prompt", flag="--prompt",
                             request_message=f"{why}, and a request cannot give precomputed embeddings")
        unique = list(dict.fromkeys(prompts))
        idx = torch.tensor([unique.index(p) for p in prompts])
        rows = {k: v[idx] for k, v in loaded.text.encode(unique).items()}
    else:
        raise InputError(f"{loaded.name!r} is text-conditional: give --prompt TEXT, --prompts FILE or --embeddings "
                         "FILE.safetensors", field="prompt", flag="--prompt",
                         request_message=f'{loaded.name!r} is text-conditional: give "prompt" TEXT')
    dim, emb = loaded.text_dim, rows["encoder_hidden_states"]
    if emb.ndim != 3 or (isinstance(dim, int) and emb.shape[2] != dim):
        raise InputError(f"embeddings of shape {tuple(emb.shape)} do not fit {loaded.name!r}: it takes "
                         f"(N, S, {dim}) encoder_hidden_states", field="embeddings", flag="--embeddings")
    if loaded.pooled_dim:
        pooled = rows.get("text_embeds")
        if pooled is None or tuple(pooled.shape[1:]) != (loaded.pooled_dim,):
            what = "an SDXL-layout UNet" if loaded.added_cond else f"a {loaded.kind}"
            raise InputError(f"{loaded.name!r} is {what}: it also takes pooled text embeddings (N, "
                             f"{loaded.pooled_dim}), got {None if pooled is None else tuple(pooled.shape)}",
                             field="embeddings", flag="--embeddings")
    if loaded.added_cond:
        rows.setdefault("time_ids", loaded.time_ids(1))
    i = torch.arange(n)
    return {k: v[i % v.shape[0]].float() for k, v in rows.items()}


def default_time_ids(loaded, n: int) -> torch.Tensor:
    """SDXL's micro-conditioning for this model's image size, as diffusers' pipeline makes it by default:
    original size = target size = the decoded image's (latent size x the VAE's scale factor; 8 without a VAE),
    no crop; (n, 6) float32."""
    f = loaded.text.vae_scale_factor if loaded.text is not None else 8
    _, h, w = loaded.sample_shape
    return torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]], dtype=torch.float32).expand(n, 6).clone()


def check_text(loaded, root: Path, error: type[Exception]) -> None:
    """The text encoders' widths against the UNet's inputs; an SDXL-layout UNet needs SDXL's two encoders."""
    text, dim = loaded.text, loaded.config.get("cross_attention_dim")
    if bool(text.sdxl) != bool(loaded.added_cond):
        raise error(f"{root}: " + ("an SDXL-layout UNet (addition_embed_type 'text_time') needs SDXL's second text "
                                   "encoder (text_encoder_2/, tokenizer_2/)" if loaded.added_cond else
                                   "text_encoder_2/ comes with a UNet that takes no pooled text embedding "
                                   "(addition_embed_type is not 'text_time')"))
    if text.hidden_size != dim:
        raise error(f"{root}: the text encoder{'s' if text.sdxl else ''}' width {text.hidden_size} is not the "
                    f"UNet's cross_attention_dim {dim}".replace("encoder'", "encoder's"))
    if text.sdxl and text.pooled_size != loaded.added_cond[0]:
        raise error(f"{root}: text_encoder_2's projection_dim {text.pooled_size} is not the UNet's pooled text_embeds "
                    f"width {loaded.added_cond[0]} (projection_class_embeddings_input_dim - 6 x "
                    "addition_time_embed_dim)")


# ---- a tiny Stable Diffusion layout pipeline, written offline (tests, tools) --------------------------------------


