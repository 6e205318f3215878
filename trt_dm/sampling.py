"""Sampling loops over a denoiser callable: DDPM (ancestral) and DDIM, as short drivers over the per-image
steps of ``trt_dm.core.schedule``.

A *denoiser* is any callable ``denoiser(x, t, **extra_args) -> model_output`` where ``x`` is the noisy
batch (B, C, H, W) and ``t`` an int64 tensor (B,) of training timesteps; the output is interpreted by
the schedule's ``prediction_type`` (epsilon, v_prediction or sample). Runners (``trt_dm.runners``) turn
torch, ONNX Runtime and TensorRT UNets into such callables, so the samplers cannot tell them apart.

The loops here step a whole batch through one list of timesteps; the steps themselves work per image, so a
server can batch images at different timesteps. Noise is drawn per image from one ``torch.Generator`` per
image, so an image depends on its seed only, never on the batch it was drawn in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from trt_dm.core.errors import InputError
from trt_dm.core.guidance import cfg_denoiser, check_interval, check_scale
from trt_dm.core.io import sha256_file
from trt_dm.core.schedule import (
    Schedule,
    make_generators,
    randn_per_sample,
    sampler_rule,
)
from trt_dm.models.loading import LoadedModel
from trt_dm.models.text import prompts_key

DenoiserFn = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device="cpu", dtype=torch.float32):
    """x_T for each seed, plus the generators (advanced past x_T) that later steps draw from."""
    gens = make_generators(seeds)
    return randn_per_sample(gens, shape, device, dtype), gens


def _loop(denoiser: DenoiserFn, x: torch.Tensor, schedule: Schedule, timesteps: Sequence[int], sampler: str, eta: float,
          generators, extra_args, callback, disable) -> torch.Tensor:
    rule = sampler_rule(sampler)
    schedule.check_sampler(sampler, eta)
    td = schedule.time_dtype  # int64 training timesteps, or a flow model's float time inputs
    ts = [float(t) if td.is_floating_point else int(t) for t in timesteps]
    prev = schedule.prev_timesteps(sampler, ts)
    for i, t in enumerate(tqdm(ts, desc=sampler, disable=disable, leave=False)):
        tt = torch.full((x.shape[0],), t, dtype=td, device=x.device)
        out = denoiser(x, tt, **(extra_args or {})).to(x.dtype)
        noise = randn_per_sample(generators, x.shape[1:], x.device, x.dtype) if rule.draws_noise(t, eta) else None
        res = rule.run(schedule, out, x, tt.cpu(), torch.full((x.shape[0],), prev[i], dtype=td), noise, eta)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "model_output": out, "eps": res.eps, "denoised": res.denoised})
        x = res.prev_sample
    return x


@torch.no_grad()
def sample_ddpm(denoiser: DenoiserFn, x: torch.Tensor, schedule: Schedule, timesteps: Sequence[int], *,
                generators: Sequence[torch.Generator], extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling (``ddpm_step`` at every listed timestep; ``timesteps`` from
    ``schedule.timesteps(n)`` may skip steps). The callback receives {"i", "t", "x" (the input x_t),
    "model_output", "eps", "denoised"}."""
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} generators, batch {x.shape[0]}")
    return _loop(denoiser, x, schedule, timesteps, "ddpm", 0.0, generators, extra_args, callback, disable)


@torch.no_grad()
def sample_ddim(denoiser: DenoiserFn, x: torch.Tensor, schedule: Schedule, timesteps: Sequence[int], *,
                eta: float = 0.0, generators: Sequence[torch.Generator] | None = None,
                extra_args: dict | None = None, callback: Callback | None = None,
                disable: bool | None = None) -> torch.Tensor:
    """DDIM sampling (``ddim_step``; as in diffusers the previous timestep is t - T // num_steps). eta = 0 is
    deterministic; eta > 0 needs generators. On a flow-matching schedule: its Euler step (``trt_dm.core.flow``)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and (generators is None or len(generators) != x.shape[0]):
        raise ValueError("eta > 0 needs one generator per image (generators=make_generators(seeds))")
    return _loop(denoiser, x, schedule, timesteps, "ddim", eta, generators, extra_args, callback, disable)


def sample(denoiser: DenoiserFn, schedule: Schedule, seeds: Sequence[int], shape: Sequence[int], *,
           sampler: str = "ddim", steps: int = 50, eta: float = 0.0, extra_args: dict | None = None,
           callback: Callback | None = None, disable: bool | None = None, device="cpu",
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw one image per seed with the named sampler; returns x0 in the model's range (B, *shape)."""
    schedule.check_sampler(sampler, eta)  # an unknown sampler is refused, naming the accepted ones
    ts = schedule.timesteps(steps)
    x, gens = initial_noise(seeds, shape, device, dtype)
    if sampler == "ddpm":
        return sample_ddpm(denoiser, x, schedule, ts, generators=gens, extra_args=extra_args,
                           callback=callback, disable=disable)
    return sample_ddim(denoiser, x, schedule, ts, eta=eta, generators=gens, extra_args=extra_args,  # euler: the same
                       callback=callback, disable=disable)                                          # step on a flow


def sample_many(denoiser: DenoiserFn, schedule: Schedule, seeds: Sequence[int], shape: Sequence[int], *,
                batch_size: int = 64, progress: bool = True, callback: Callback | None = None,
                conditioning: Mapping[str, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """``sample`` over many seeds in batches, with one progress bar over images; returns CPU float32.

    ``conditioning``: {input name: (N, ...) tensor}, one row per seed, passed to the denoiser batch by batch.
    The callback additionally receives "batch" (the batch index) and "seeds" (that batch's seeds).
    """
    bad = {k: tuple(v.shape) for k, v in (conditioning or {}).items() if v.shape[0] != len(seeds)}
    if bad:
        raise ValueError(f"conditioning rows {bad} do not match the {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    fixed_extra = kwargs.pop("extra_args", None)
    outs = []
    with tqdm(total=len(seeds), desc=f"{kwargs.get('sampler', 'ddim')} {kwargs.get('steps', 50)} steps",
              unit="img", disable=not progress) as bar:
        for b, start in enumerate(range(0, len(seeds), batch_size)):
            chunk = seeds[start:start + batch_size]
            cb = None
            if callback is not None:
                cb = lambda d, b=b, chunk=chunk: callback({**d, "batch": b, "seeds": chunk})  # noqa: E731
            extra = {k: v[start:start + batch_size] for k, v in (conditioning or {}).items()} or fixed_extra
            outs.append(sample(denoiser, schedule, chunk, shape, callback=cb, disable=True, extra_args=extra,
                               **kwargs).float().cpu())
            bar.update(len(chunk))
    return torch.cat(outs) if outs else torch.empty(0, *shape)


# ---- sampling a loaded model ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleSettings:
    """How images are drawn: image i uses seed ``seed + i``; ``batch`` images per UNet call."""
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0  # DDIM only; 0 = deterministic
    seed: int = 0
    n: int = 64
    batch: int = 64  # images per batch (a guided UNet call takes 2 rows per image)
    labels: tuple[int, ...] | str | None = None  # class-conditional models: labels cycled over the images, or "all"
    guidance_scale: float = 1.0  # classifier-free guidance w (1 = none)
    guidance_rescale: float = 0.0
    guidance_interval: tuple[int, int] | None = None  # timesteps where w applies; None: the model's default
    # text-conditional models: prompts cycled over the images, the negative prompt of guidance, or a safetensors file
    # of precomputed prompt_embeds (N, S, D) [+ negative_prompt_embeds (1, S, D)]
    prompts: tuple[str, ...] | None = None
    negative_prompt: str = ""
    embeddings: str | None = None

    def __post_init__(self) -> None:
        check_scale(self.guidance_scale)
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", check_interval(self.guidance_interval))
        if isinstance(self.labels, list):
            object.__setattr__(self, "labels", tuple(self.labels))
        if isinstance(self.prompts, (list, str)):
            object.__setattr__(self, "prompts", (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts))
        if self.prompts is not None and self.embeddings is not None:
            raise InputError("give --prompt / --prompts or --embeddings, not both", field="prompt", flag="--prompt",
                             request_message='give "prompt" or embeddings, not both')
        if self.prompts is not None and (not self.prompts or not all(isinstance(p, str) for p in self.prompts)):
            raise InputError("prompts must be a non-empty list of strings", field="prompt", flag="--prompt")
        sampler_rule(self.sampler)  # an unknown sampler is refused, naming the accepted ones
        for name in ("n", "steps", "batch"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}", field=name, flag=f"--{name}",
                                 request_message=f'"{name}" must be >= 1, got {getattr(self, name)}')
        if not self.eta >= 0:
            raise InputError(f"--eta must be >= 0, got {self.eta}", field="eta", flag="--eta",
                             request_message=f'"eta" must be >= 0, got {self.eta}')

    @property
    def seeds(self) -> range:
        return range(self.seed, self.seed + self.n)

    def for_model(self, loaded: LoadedModel) -> SampleSettings:
        """These settings with the model's defaults made explicit (its guidance interval), as keys and reports
        need them."""
        return dataclasses.replace(self, guidance_interval=loaded.resolve_interval(self.guidance_scale,
                                                                                   self.guidance_interval))

    def key(self) -> str:
        key = f"{self.sampler}{self.steps}-eta{self.eta:g}-s{self.seed}-n{self.n}"
        if self.labels is not None:
            labels = self.labels if isinstance(self.labels, str) else ",".join(map(str, self.labels))
            key += f"-c{labels if len(labels) <= 24 else hashlib.sha256(labels.encode()).hexdigest()[:12]}"
        if self.guidance_scale != 1.0 or self.guidance_rescale:
            key += f"-w{self.guidance_scale:g}" + (f"r{self.guidance_rescale:g}" if self.guidance_rescale else "")
            if self.guidance_interval is not None:
                key += f"i{self.guidance_interval[0]}-{self.guidance_interval[1]}"
        if self.prompts is not None:
            key += f"-p{prompts_key(self.prompts, self.negative_prompt)[:12]}"
        if self.embeddings is not None:
            key += f"-e{sha256_file(self.embeddings)[:12]}"
        return key


def schedule(loaded: LoadedModel) -> Schedule:
    return loaded.schedule()


def draw(loaded: LoadedModel, denoiser: DenoiserFn, settings: SampleSettings, *, progress: bool = True,
         seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, float]:
    """(images (N, C, H, W) float32 on CPU in the model's range, seconds) for ``settings`` (or other ``seeds``):
    class labels and classifier-free guidance from the settings (one UNet call of 2B rows per step with guidance)."""
    seeds = settings.seeds if seeds is None else seeds
    cond, guidance = conditioning(loaded, settings, len(seeds))
    t0 = time.perf_counter()
    images = sample_many(cfg_denoiser(denoiser, guidance), schedule(loaded), seeds, loaded.sample_shape,
                         batch_size=settings.batch, sampler=settings.sampler, steps=settings.steps, eta=settings.eta,
                         progress=progress, device=denoiser.device, conditioning=cond)
    return loaded.decode(images), time.perf_counter() - t0  # a latent pipeline's VAE decodes (in torch)


def conditioning(loaded: LoadedModel, settings: SampleSettings, n: int | None = None):
    """(per-image conditioning {input: (n, ...)}, Guidance) of ``settings`` for this model; ValueError naming what
    is accepted for a label out of range, labels for an unconditional model, none for a conditional one, a prompt
    for a model without a text encoder, embeddings of the wrong shape, guidance the model cannot do, or more
    sampling steps than the model's schedule has."""
    sched = schedule(loaded)
    sched.check_steps(settings.steps, "--steps", loaded.name)
    try:
        sched.check_sampler(settings.sampler, settings.eta)
    except ValueError as e:
        raise InputError(f"--sampler {settings.sampler} on {loaded.name!r}: {e}", field="sampler", flag="--sampler",
                         request_message=f'"sampler" {settings.sampler!r} on {loaded.name!r}: {e}') from None
    embeds = negative = None
    if settings.embeddings is not None:
        if not loaded.text_conditioned:
            raise InputError(f"--embeddings was given, but {loaded.name!r} is not text-conditional",
                             field="embeddings", flag="--embeddings",
                             request_message=f'"embeddings" were given, but {loaded.name!r} is not text-conditional')
        embeds, negative = loaded.embeddings_file(settings.embeddings)
    cond = loaded.conditioning_for(settings.n if n is None else n, settings.labels, prompts=settings.prompts,
                                   embeddings=embeds, guidance_scale=settings.guidance_scale)
    guidance = loaded.guidance(settings.guidance_scale, settings.guidance_rescale, negative_prompt=settings.negative_prompt,
                               negative_embeddings=negative, interval=settings.guidance_interval)
    return cond, guidance
