"""The library API under the CLI: what `trt-dm` does, as functions with typed results that the CLI, the tools
and a server call. The CLI only turns arguments into these settings and prints.

    from trt_dm import api
    loaded = api.load("default")
    settings = api.SampleSettings(sampler="ddim", steps=50, n=16)
    with api.open_denoiser(loaded, engines=["engines/default-ptq4dm.plan"]) as den:   # or onnx=, openvino=, ranges=
        images, seconds = api.draw(loaded, den, settings)
    result = api.evaluate(loaded, settings, quant=api.QuantSettings(recipe="ptq4dm"))  # EvalResult
    made = api.deploy(loaded, api.QuantSettings(), target="tensorrt")   # default recipe, one graph: DeployResult

Loading a denoiser from artifacts (``open_denoiser``): torch FP, torch fake-quant (``ranges`` + ``qcfg``,
``groups=K`` ranges switched by timestep per row), one graph in ONNX Runtime or OpenVINO, one TensorRT engine, or
K of them for the K timestep groups of a ``groups=K`` recipe (their reports / sidecars carry each group's t range).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .core.artifacts import ExportReport, RangeSet, Sidecar, atomic_write
from .core.guidance import cfg_denoiser, check_scale
from .models import LoadedModel, load_model
from .runners import OrtRunner, TorchRunner, TrtRunner, as_denoiser, switched_denoiser
from .sampling import SAMPLERS, Schedule, sample_many

log = logging.getLogger(__name__)
DEFAULT_CACHE_ROOT = Path("calib_cache")


def load(spec: str = "default", *, allow_pickle: bool = False, threads: int | None = None) -> LoadedModel:
    """``trt_dm.models.load_model`` (see there), optionally setting torch's CPU threads first."""
    if threads:
        torch.set_num_threads(threads)
    return load_model(spec, allow_pickle=allow_pickle)


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
    # text-conditional models: prompts cycled over the images, the negative prompt of guidance, or a safetensors file
    # of precomputed prompt_embeds (N, S, D) [+ negative_prompt_embeds (1, S, D)]
    prompts: tuple[str, ...] | None = None
    negative_prompt: str = ""
    embeddings: str | None = None

    def __post_init__(self) -> None:
        check_scale(self.guidance_scale)
        if isinstance(self.labels, list):
            object.__setattr__(self, "labels", tuple(self.labels))
        if isinstance(self.prompts, (list, str)):
            object.__setattr__(self, "prompts", (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts))
        if self.prompts is not None and self.embeddings is not None:
            raise ValueError("give --prompt / --prompts or --embeddings, not both")
        if self.prompts is not None and (not self.prompts or not all(isinstance(p, str) for p in self.prompts)):
            raise ValueError("prompts must be a non-empty list of strings")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; accepted: {SAMPLERS}")
        for name in ("n", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.eta >= 0:
            raise ValueError(f"--eta must be >= 0, got {self.eta}")

    @property
    def seeds(self) -> range:
        return range(self.seed, self.seed + self.n)

    def key(self) -> str:
        key = f"{self.sampler}{self.steps}-eta{self.eta:g}-s{self.seed}-n{self.n}"
        if self.labels is not None:
            labels = self.labels if isinstance(self.labels, str) else ",".join(map(str, self.labels))
            key += f"-c{labels if len(labels) <= 24 else hashlib.sha256(labels.encode()).hexdigest()[:12]}"
        if self.guidance_scale != 1.0 or self.guidance_rescale:
            key += f"-w{self.guidance_scale:g}" + (f"r{self.guidance_rescale:g}" if self.guidance_rescale else "")
        if self.prompts is not None:
            from .text import prompts_key
            key += f"-p{prompts_key(self.prompts, self.negative_prompt)[:12]}"
        if self.embeddings is not None:
            from .core.artifacts import sha256_file
            key += f"-e{sha256_file(self.embeddings)[:12]}"
        return key


def default_recipe(qcfg=None, spec=None, target: str | None = None) -> tuple[str, str]:
    """The recipe used when none is named, and why when it is not ``DEFAULT_RECIPE``: ``ptq4dm-g4`` (four
    timestep-dependent range sets, deployed as one graph), or the paper's ``ptq4dm`` where the settings take one
    range set: the ort-cpu target, learned input ranges (``--recon-act-iters``: one range per layer), split shortcuts or
    quantized attention matmuls (no one-graph form), fewer calibration steps than groups."""
    from .calib.ranges import DEFAULT_RECIPE, ONE_RANGE_RECIPE
    from .quant import QuantConfig
    qcfg = qcfg or QuantConfig()
    why = [reason for cond, reason in (
        (target == "ort-cpu", "--target ort-cpu"), (qcfg.recon_act_iters > 0, "--recon-act-iters"),
        (qcfg.shortcut_split, "--shortcut-split"), (qcfg.quantize_attention, "--quantize-attention"),
        (spec is not None and spec.steps < 4, f"--calib-steps {getattr(spec, 'steps', '')}")) if cond]
    if why:
        return ONE_RANGE_RECIPE, (f"recipe {ONE_RANGE_RECIPE} (the default {DEFAULT_RECIPE} has 4 timestep range "
                                  f"sets; {', '.join(why)} takes one)")
    return DEFAULT_RECIPE, ""


@dataclass(frozen=True)
class QuantSettings:
    """How the model is quantized and calibrated (``trt-dm calibrate`` / ``export`` / ``engine`` / ``eval --recipe``).
    ``recipe`` None: ``default_recipe`` for these settings (and the target, when deploying)."""
    recipe: str | None = None
    spec: Any = None        # trt_dm.calib.trajectories.CalibSpec (default: CalibSpec())
    qcfg: Any = None        # trt_dm.quant.QuantConfig (default: QuantConfig())
    cache_root: Path = DEFAULT_CACHE_ROOT
    batch: int = 64         # images per UNet call while calibrating

    def resolved(self, loaded: LoadedModel | None = None, target: str | None = None) -> QuantSettings:
        """Defaults filled in (the recipe for ``target`` when deploying); with ``loaded``, a class-conditional
        model calibrates on every class in turn (balanced) unless the spec names labels."""
        from .calib.ranges import get_recipe
        from .calib.trajectories import CalibSpec
        from .quant import QuantConfig
        spec = self.spec or CalibSpec()
        recipe = self.recipe or default_recipe(self.qcfg, spec, target)[0]
        get_recipe(recipe)  # validate before any work
        if loaded is not None and loaded.class_labels_spec is not None and spec.labels is None:
            spec = dataclasses.replace(spec, labels="all")
        if loaded is not None and loaded.text_conditioned and spec.prompts is None:
            from .text import builtin_prompts
            spec = dataclasses.replace(spec, prompts=builtin_prompts())  # the project's 141 prompts
        return dataclasses.replace(self, recipe=recipe, spec=spec, qcfg=self.qcfg or QuantConfig(),
                                   cache_root=Path(self.cache_root))


def calibrate(loaded: LoadedModel, quant: QuantSettings, *, progress: bool = True):
    """Statistics (cached per model, schedule and calibration set) -> ranges of ``quant.recipe``: a
    ``trt_dm.calibrate.CalibrationResult`` whose ``ranges`` is a ``RangeSet``."""
    from .calibrate import calibrate as _calibrate
    q = quant.resolved(loaded)
    return _calibrate(loaded, q.spec, q.qcfg, q.recipe, cache_root=q.cache_root, batch_size=q.batch, progress=progress)


def sensitivity(loaded: LoadedModel, quant: QuantSettings, *, by: str = "blocks", progress: bool = True):
    """Which layers to keep in high precision. ``by="blocks"``: ``trt_dm.calibrate.block_sensitivity`` (the model
    quantized as ``quant`` says, one block kept in FP at a time, the error of the prediction the sampler uses,
    guided under CFG); ``by="layers"``: ``layer_sensitivity`` (one layer quantized at a time, ``quant.recipe``'s
    ranges, nothing excluded)."""
    from .calibrate import block_sensitivity, layer_sensitivity
    q = quant.resolved(loaded)
    if q.qcfg.fp_from_t is not None:
        raise ValueError("the sensitivity report ranks layers kept in FP at every step; --keep-fp-from-t is for "
                         "evaluation and deployment (eval --recipe, export, engine)")
    if by == "blocks":
        return block_sensitivity(loaded, q.spec, q.qcfg, q.recipe, cache_root=q.cache_root, batch_size=q.batch,
                                 progress=progress)
    if by == "layers":
        return layer_sensitivity(loaded, q.spec, q.recipe, cache_root=q.cache_root, weight_bits=q.qcfg.weight_bits,
                                 batch_size=q.batch, progress=progress)
    raise ValueError(f"sensitivity by {by!r}: accepted 'blocks' or 'layers'")


# ---- denoisers from artifacts -------------------------------------------------------------------------------

class Denoiser:
    """An open denoiser: call it as ``den(x, t, **conditioning)``; ``device`` is where its inputs should live;
    ``describe`` says what runs (for reports and a server's /v1/models)."""

    def __init__(self, fn: Callable, device: torch.device, describe: dict) -> None:
        self._fn, self.device, self.describe = fn, device, describe

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self._fn(x, t, **extra)


def _t_range(path: Path) -> tuple[int, int] | None:
    meta = Sidecar.load(path) if path.suffix == ".plan" else ExportReport.load(path)
    return tuple(meta.t_range) if meta is not None and meta.t_range else None


def _paths(given) -> list:
    """One path (str / Path) or several (a sequence, or None for none) -> a list of them."""
    return [given] if isinstance(given, (str, Path)) else list(given or ())


@contextlib.contextmanager
def open_denoiser(loaded: LoadedModel, *, engines: Sequence[str | Path] = (), onnx: Sequence[str | Path] | str | Path = (),
                  openvino: Sequence[str | Path] | str | Path = (), ranges: RangeSet | None = None, qcfg=None,
                  device: str | None = None, threads: int | None = None, cuda_graph: bool = False,
                  ov_precision: str = "fp32", ov_cache_dir: str | Path | bool | None = None,
                  ov_streams: int | None = None, weights: str | Path | None = None,
                  ort_spin: bool = True) -> Iterator[Denoiser]:
    """The denoiser of one deployment: TensorRT ``engines``, ONNX Runtime ``onnx`` graphs, OpenVINO ``openvino``
    graphs (``ov_precision`` fp32 / bf16 for the non-quantized math, ``ov_cache_dir`` its model cache: default
    beside the graph, False for none; ``ov_streams`` its streams: default 2 with >= 2 threads; ``ort_spin`` False:
    ONNX Runtime's threads sleep between calls, see ``OrtRunner``), torch fake-quant
    (``ranges`` [+ ``qcfg``, + ``weights``: reconstructed weights for ``qcfg.rounding`` other than nearest, the
    calibration's ``weights_path``]), or the torch FP model (none given). Several engines / graphs must be the timestep groups of one ``groups=K`` recipe. Runners are active
    inside the ``with`` block and freed after it."""
    onnx, openvino, engines = _paths(onnx), _paths(openvino), list(engines)
    given = [k for k, v in (("engines", engines), ("onnx", onnx), ("openvino", openvino), ("ranges", ranges)) if v]
    if len(given) > 1:
        raise ValueError(f"give one of engines, onnx, openvino or ranges, not {' and '.join(given)}")
    if openvino:
        from .ov_runner import compile_config
        # bad options fail before any loading
        compile_config(threads=threads, precision=ov_precision, streams=ov_streams)
    paths = [Path(p) for p in engines or onnx or openvino]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such {'engine' if engines else 'ONNX'} file")
    t_ranges = [_t_range(p) for p in paths] if len(paths) > 1 else None
    if t_ranges is not None and any(r is None for r in t_ranges):
        raise ValueError("several engines / graphs must be the timestep groups of one groups=K recipe "
                         "(their sidecars / reports carry t_range); got files without one")
    with contextlib.ExitStack() as stack:
        if paths:
            if engines:  # K group engines never run at once: one device-memory block for all of them
                from .trt_runner import SharedDeviceMemory
                shared = SharedDeviceMemory() if len(paths) > 1 else None
                make = lambda p: TrtRunner(p, cuda_graph=cuda_graph, shared_memory=shared)  # noqa: E731
            elif openvino:
                from .runners import OpenVinoRunner
                make = lambda p: OpenVinoRunner(p, threads=threads, precision=ov_precision,  # noqa: E731
                                                cache_dir=ov_cache_dir, streams=ov_streams)
            else:
                make = lambda p: OrtRunner(p, threads=threads, spin=ort_spin)  # noqa: E731
            runners = [stack.enter_context(make(p)) for p in paths]
            describe = {"runner": runners[0].name, "files": [str(p) for p in paths]}
            if openvino:  # what OpenVINO runs the non-quantized math in (bf16 only where the CPU has it)
                describe["precision"] = runners[0].effective_precision
                describe["streams"] = runners[0].streams
            elif onnx:
                describe["spin"] = ort_spin
            if t_ranges is None:
                fn = as_denoiser(runners[0])
            else:
                fn = switched_denoiser([as_denoiser(r) for r in runners], t_ranges)
                describe["t_ranges"] = t_ranges
            yield Denoiser(fn, runners[0].device, describe)
        elif ranges is not None:
            from .calibrate import fake_quant_denoiser
            from .quant import QuantConfig
            fn, describe = fake_quant_denoiser(loaded, qcfg or QuantConfig(), ranges, weights=weights, stack=stack)
            yield Denoiser(fn, torch.device("cpu"), describe)
        else:
            # a runner moves its module to its device and dtype: off the CPU it gets a copy, so that the loaded
            # model (which calibration and export copy from) stays fp32 on the CPU
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            unet = loaded.unet if dev.type == "cpu" else copy.deepcopy(loaded.unet)
            runner = stack.enter_context(TorchRunner(unet, device=dev))
            yield Denoiser(as_denoiser(runner), runner.device, {"runner": runner.name})


def schedule(loaded: LoadedModel) -> Schedule:
    return Schedule.from_config(loaded.scheduler_config)


def draw(loaded: LoadedModel, denoiser: Denoiser, settings: SampleSettings, *, progress: bool = True,
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
    schedule(loaded).check_steps(settings.steps, "--steps", loaded.name)
    embeds = negative = None
    if settings.embeddings is not None:
        from .text import load_embeddings
        dim = loaded.config.get("cross_attention_dim")
        if not loaded.text_conditioned:
            raise ValueError(f"--embeddings was given, but {loaded.name!r} is not text-conditional")
        embeds, negative = load_embeddings(settings.embeddings, loaded.seq_len, dim)  # bare UNet: any length
    cond = loaded.conditioning_for(settings.n if n is None else n, settings.labels, prompts=settings.prompts,
                                   embeddings=embeds)
    guidance = loaded.guidance(settings.guidance_scale, settings.guidance_rescale,
                               negative_prompt=settings.negative_prompt, negative_embeddings=negative)
    return cond, guidance


def fp_samples(loaded: LoadedModel, settings: SampleSettings, *, cache_root: Path = DEFAULT_CACHE_ROOT,
               device: str | None = None, progress: bool = True,
               fp: Denoiser | None = None) -> tuple[torch.Tensor, float, Path, bool]:
    """FP images for (model, schedule, sampler settings, seeds), cached under ``cache_root/<data key>/samples`` so
    every quantized run compared with them reuses the same images: (images, seconds, path, reused). ``fp``: an
    FP denoiser the caller has open already (none: one is opened for the draw)."""
    from safetensors.torch import load_file

    from .images import save_samples
    path = Path(cache_root) / loaded.data_key()[:16] / "samples" / f"{settings.key()}.safetensors"
    if path.exists():
        log.info("reusing FP samples %s", path)
        return load_file(str(path))["samples"], 0.0, path, True
    with contextlib.nullcontext(fp) if fp is not None else open_denoiser(loaded, device=device) as den:
        images, secs = draw(loaded, den, settings, progress=progress)
    save_samples(images, path, {"sampler": settings.sampler, "steps": str(settings.steps), "seed": str(settings.seed),
                                "model": loaded.fingerprint(), "schedule": loaded.schedule_fingerprint()})
    return images, secs, path, False


# ---- evaluation ---------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """What `trt-dm eval` measures (``result.json``). FP runs fill the first block; a quantized run (fake-quant
    recipe or exported graph) adds the same-seed comparison with FP."""
    model: str
    fingerprint: str
    schedule_fingerprint: str
    sampler: str
    steps: int
    eta: float
    n: int
    seed: int
    reference: str
    reference_n: int
    metric: str
    kid_subset_size: int
    threads: int
    sampling_seconds: float = 0.0
    fd: float = float("nan")
    kid_mean: float = float("nan")
    kid_std: float = float("nan")
    # conditional models: what the images were asked to show, and whether they do
    labels: str | None = None
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    class_accuracy: float | None = None  # share of images the project's classifier assigns the requested class
    fp_class_accuracy: float | None = None
    # quantized runs of conditional models: the class accuracy's change vs FP on the same seeds and labels (points,
    # 95 % CI from the paired per-image differences) and the share of images classified as their FP twin
    class_accuracy_vs_fp: dict | None = None
    # quantized runs
    recipe: str | None = None
    onnx: str | None = None
    openvino: str | None = None  # the graph(s) OpenVINO ran
    ov_precision: str | None = None  # what OpenVINO ran the non-quantized math in (f32 / bf16)
    ranges: str | None = None
    weight_bits: int | None = None
    weight_calib: str | None = None
    rounding: str | None = None  # learned weight rounding (adaround), when not round-to-nearest
    w8_layers: list | None = None  # W4A8 / W7A8: the layers whose weights stay 8-bit (fnmatch patterns)
    keep_fp: list | None = None  # layers kept in high precision beyond the defaults (fnmatch patterns)
    keep_fp_from_t: int | None = None  # ... at the steps t >= this only (quantized below)
    shortcut_split: bool | None = None
    calibration: str | None = None
    calib_n: int | None = None
    fp_fd: float | None = None
    fp_kid_mean: float | None = None
    fp_kid_std: float | None = None
    psnr_vs_fp: float | None = None
    eps_n: int | None = None
    eps: dict | None = None
    eps_conditional: dict | None = None  # guided runs: the conditional prediction's own error on the same x_t
    prompts: dict | None = None  # text-to-image: {"n", "sha256", "first"} of the prompts sampled
    not_available: dict | None = None  # metric -> why it is not reported for this model
    fd_change_vs_fp_pct: float | None = None
    images: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {f.name: v for f in dataclasses.fields(self) if f.name != "images"
                and (v := getattr(self, f.name)) is not None and not (isinstance(v, float) and math.isnan(v))}

    def line(self) -> str:
        if math.isnan(self.fd) and self.psnr_vs_fp is not None:  # text-to-image: fidelity to FP only
            return (f"PSNR vs FP: {self.psnr_vs_fp:.2f} dB   eps MSE {self.eps['mse']:.2e} cos {self.eps['cosine']:.5f}"
                    + "".join(f"   {k}: not available ({v})" for k, v in (self.not_available or {}).items()))
        if math.isnan(self.fd):
            return "FP samples drawn" + "".join(f"   {k}: not available ({v})" for k, v in (self.not_available or {}).items())
        acc = "" if self.class_accuracy is None else f"   class accuracy: {100 * self.class_accuracy:.1f}%" + (
            "" if self.fp_class_accuracy is None else f" (FP {100 * self.fp_class_accuracy:.1f}%")
        if self.class_accuracy_vs_fp is not None:
            lo, hi = self.class_accuracy_vs_fp["ci95_points"]
            acc += f", {self.class_accuracy_vs_fp['change_points']:+.1f} points, 95% CI [{lo:+.1f}, {hi:+.1f}])"
        elif self.fp_class_accuracy is not None:
            acc += ")"
        if self.fp_fd is None:
            return (f"{self.metric}: {self.fd:.3f}   KID: {self.kid_mean * 1e3:.3f} ± {self.kid_std * 1e3:.3f} (x1e-3)"
                    + acc)
        return (f"{self.metric}: {self.fd:.3f} (FP {self.fp_fd:.3f}, {self.fd_change_vs_fp_pct:+.1f}%)   "
                f"PSNR vs FP: {self.psnr_vs_fp:.2f} dB   eps MSE {self.eps['mse']:.2e} cos {self.eps['cosine']:.5f}   "
                f"KID: {self.kid_mean * 1e3:.3f} (x1e-3)" + acc)


def evaluate(loaded: LoadedModel, settings: SampleSettings, *, quant: QuantSettings | None = None,
             onnx: str | Path | Sequence[str | Path] | None = None,
             openvino: str | Path | Sequence[str | Path] | None = None,
             ov_precision: str = "fp32", ov_streams: int | None = None, extractor=None, ref: str = "test",
             ref_limit: int | None = None,
             eps_n: int = 256, cache_root: Path = DEFAULT_CACHE_ROOT, device: str | None = None,
             threads: int | None = None, progress: bool = True) -> EvalResult:
    """FD (FD-EffNet by default, or the given feature ``extractor``) and KID against Fashion-MNIST ``ref``; with
    ``quant`` (a fake-quant recipe), ``onnx`` (exported graphs in ONNX Runtime: one, or the timestep groups /
    segments of one deployment) or ``openvino`` (exported
    graphs in OpenVINO, ``ov_precision`` for their non-quantized math, ``ov_streams`` its streams) also the same-seed fidelity to FP: FD
    change, PSNR of the images, per-timestep noise-prediction error on ``eps_n`` images."""
    from . import evaluate as E
    onnx, openvino = _paths(onnx), _paths(openvino)
    given = [k for k, v in (("--recipe", quant), ("--onnx", onnx), ("--openvino", openvino)) if v]
    if len(given) > 1:
        raise ValueError("--recipe evaluates the torch fake-quant model, --onnx / --openvino an exported graph in "
                         f"ONNX Runtime / OpenVINO: give one, not {' and '.join(given)}")
    files = [("--onnx", p) for p in onnx] + [("--openvino", p) for p in openvino]
    for flag, path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if openvino:
        from .ov_runner import compile_config
        # bad options fail before the long run
        compile_config(threads=threads, precision=ov_precision, streams=ov_streams)
    quant = quant.resolved(loaded) if quant is not None else None
    if quant is not None and quant.spec.guidance_scale != settings.guidance_scale:
        log.info("calibrating with guidance %g, sampling with %g", quant.spec.guidance_scale, settings.guidance_scale)
    cond, _ = conditioning(loaded, settings)  # bad labels / guidance fail before any work
    classifier = None
    if "class_labels" in cond and tuple(loaded.sample_shape) == (1, 32, 32) and (loaded.num_classes or 0) <= 10:
        from .classify import load_classifier
        classifier = load_classifier()  # before any work: a missing classifier is said at once
    elif "class_labels" in cond:
        log.warning("class accuracy is not available for %s: the project's classifier takes Fashion-MNIST-shaped "
                    "(1, 32, 32) images of its 10 classes, the model makes %s", loaded.name, loaded.sample_shape)
    disable = None if progress else True
    text = loaded.text is not None
    if text:  # the Fashion-MNIST reference does not describe a text-to-image pipeline's images
        label, reference, kid_size = "FD", [], 0
    else:
        extractor = extractor if extractor is not None else E.get_extractor("effnet")
        label = "FD-EffNet" if isinstance(extractor, E.EffNetFeatures) else "FID (Inception)"
        reference = E.reference_features(ref, extractor, limit=ref_limit, disable=disable)
        kid_size = min(1000, settings.n, len(reference))
    res = EvalResult(model=str(loaded.source), fingerprint=loaded.fingerprint(),
                     schedule_fingerprint=loaded.schedule_fingerprint(), sampler=settings.sampler, steps=settings.steps,
                     eta=settings.eta, n=settings.n, seed=settings.seed, reference=f"fashion-mnist-{ref}",
                     reference_n=len(reference), metric=label, kid_subset_size=kid_size, threads=torch.get_num_threads())
    if cond and settings.labels is not None:
        res.labels = settings.labels if isinstance(settings.labels, str) else ",".join(map(str, settings.labels))
    if cond:
        res.guidance_scale, res.guidance_rescale = settings.guidance_scale, settings.guidance_rescale
    if text:
        from .text import prompts_key
        if settings.prompts is not None:
            res.prompts = {"n": len(settings.prompts), "sha256": prompts_key(settings.prompts, settings.negative_prompt),
                           "first": settings.prompts[0]}
        res.reference, res.reference_n = "none", 0
        res.not_available = {
            "FD / KID": "the reference set is Fashion-MNIST, which says nothing about a text-to-image pipeline's images",
            "CLIP score": "the pipeline has a text encoder but no matching image encoder (CLIPVisionModelWithProjection "
                          "of the same CLIP), so text-image agreement cannot be measured with its own encoders"}

    def accuracy(images: torch.Tensor) -> float | None:
        if classifier is None:
            return None
        from .classify import class_accuracy
        return class_accuracy(images, cond["class_labels"], classifier)

    def score(images: torch.Tensor) -> tuple[float, float, float]:
        if text:
            return float("nan"), float("nan"), float("nan")
        feats = E.extract_features(images, extractor, disable=disable)
        return (E.frechet_distance(feats, reference), *E.kid(feats, reference, subset_size=kid_size))

    if quant is None and not onnx and not openvino:
        fp_images, fp_secs, _, _ = fp_samples(loaded, settings, cache_root=cache_root, device=device,
                                              progress=progress)
        res.images, res.sampling_seconds = fp_images, round(fp_secs, 1)
        res.fd, res.kid_mean, res.kid_std = score(fp_images)
        res.class_accuracy = accuracy(fp_images)
        return res
    if onnx:
        res.onnx = " ".join(map(str, onnx))
        den_ctx = open_denoiser(loaded, onnx=onnx, threads=threads)
    elif openvino:
        res.openvino = " ".join(map(str, openvino))
        den_ctx = open_denoiser(loaded, openvino=openvino, threads=threads, ov_precision=ov_precision,
                                ov_streams=ov_streams)
    else:
        calib = calibrate(loaded, quant, progress=progress)
        q = quant.qcfg
        res.recipe, res.ranges, res.weight_bits, res.weight_calib = quant.recipe, str(calib.ranges_path), q.weight_bits, q.weight_calib
        res.shortcut_split, res.calibration, res.calib_n = q.shortcut_split, quant.spec.timesteps.describe(), quant.spec.n
        res.rounding = q.rounding if q.rounding != "nearest" else None
        res.w8_layers = list(q.w8_layers) or None
        from .quant import DEFAULT_EXCLUDE
        res.keep_fp = [p for p in q.exclude if p not in DEFAULT_EXCLUDE] + list(q.noisy_fp) or None
        res.keep_fp_from_t = q.fp_from_t
        den_ctx = open_denoiser(loaded, ranges=calib.ranges, qcfg=q, weights=calib.weights_path)
    with den_ctx as test, open_denoiser(loaded, device=device) as fp:
        res.ov_precision = test.describe.get("precision") if openvino else None
        images, secs = draw(loaded, test, settings, progress=progress)
        res.images, res.sampling_seconds = images, round(secs, 1)
        # the FP images after the quantized ones: a second process (`trt-dm eval` of the FP row) can fill the
        # FP sample cache meanwhile, and this run then reuses them instead of drawing them again
        fp_images, _, _, _ = fp_samples(loaded, settings, cache_root=cache_root, progress=progress, fp=fp)
        res.eps_n = min(settings.n, eps_n)
        # the first eps_n images' conditioning (``cond`` stays all N images': class accuracy needs it)
        eps_cond, guidance = conditioning(loaded, settings, res.eps_n)
        # with guidance, also the error of the conditional prediction alone on the same x_t: what guidance does to
        # the quantization error is the difference between the two
        also = {"conditional": (fp, test)} if guidance.active else None
        cmp = E.compare_denoisers(cfg_denoiser(fp, guidance), cfg_denoiser(test, guidance), schedule(loaded),
                                  range(settings.seed, settings.seed + res.eps_n), loaded.sample_shape,
                                  sampler=settings.sampler, steps=settings.steps, eta=settings.eta,
                                  batch_size=settings.batch, progress=progress, conditioning=eps_cond, also=also)
        res.eps_conditional = cmp.get("eps_conditional")
    res.fd, res.kid_mean, res.kid_std = score(images)
    res.fp_fd, res.fp_kid_mean, res.fp_kid_std = score(fp_images)
    res.psnr_vs_fp, res.eps = E.psnr(fp_images, images), cmp["eps"]
    res.fd_change_vs_fp_pct = None if text else 100 * (res.fd - res.fp_fd) / res.fp_fd
    res.class_accuracy, res.fp_class_accuracy = accuracy(images), accuracy(fp_images)
    if classifier is not None:
        from .classify import paired_accuracy
        res.class_accuracy_vs_fp = paired_accuracy(fp_images, images, cond["class_labels"], classifier)
    return res


# ---- deployment ---------------------------------------------------------------------------------------------

@dataclass
class DeployResult:
    """What `trt-dm export` / `trt-dm engine` produced: the calibration, the checked graphs, and (engine) the
    engines' sidecars, or why no engine was built."""
    calibration: Any
    graphs: list            # trt_dm.targets.Exported
    sidecars: list = field(default_factory=list)
    not_built: str | None = None  # why no engine was built (no TensorRT here), when build was asked for
    usage: str = ""
    stages: list = field(default_factory=list)  # wall time and peak RSS per stage (trt_dm.core.stages)
    stages_path: Path | None = None


def deploy(loaded: LoadedModel, quant: QuantSettings, *, out_dir: Path = Path("engines"), **kw) -> DeployResult:
    """Calibrate (cached) -> the target's checked graphs -> with ``build``, the target's engines (plus the
    unquantized baseline when the target has one). The target refuses what it cannot express before any work.
    ``precision``: the graph's non-quantized math (default: the target's, fp16 for TensorRT, fp32 for OpenVINO).
    Wall time and peak memory of every stage are in ``result.stages`` and ``<out_dir>/<model>-<recipe>.stages.json``."""
    from .core import stages
    from .targets.base import graph_stem
    q = quant.resolved(loaded, kw.get("target", "tensorrt"))
    path = Path(out_dir) / f"{graph_stem(loaded.name, q.recipe, q.qcfg)}.stages.json"

    def write(rows, error=None):  # after every stage, and when one fails: how far it got and what it cost
        atomic_write(path, json.dumps({"model": str(loaded.source), "recipe": q.recipe, "threads": torch.get_num_threads(),
                                       "stages": rows, **({"error": error} if error else {})}, indent=2).encode())

    with stages.recording(on_stage=write) as log:
        try:
            result = _deploy(loaded, q, out_dir=out_dir, **kw)
        except Exception as e:
            if log.rows:
                write(log.rows, f"{type(e).__name__}: {e}")
            raise
    result.stages, result.stages_path = log.rows, path
    return result


def _deploy(loaded: LoadedModel, quant: QuantSettings, *, target: str = "tensorrt", out_dir: Path = Path("engines"),
            precision: str | None = None, options: dict | None = None, build: bool = False, baseline: bool = True,
            build_options=None, flavour: str | None = None, progress: Callable[[str], None] = print,
            show_progress: bool = True) -> DeployResult:
    from .core.stages import stage
    from .calib.ranges import get_recipe
    from .core.artifacts import EngineError, trt_module
    from .targets import ExportJob, get_target
    tgt = get_target(target)
    precision = precision or getattr(tgt, "default_precision", "fp16")
    quant = quant.resolved(loaded, target)
    tgt.check(quant.qcfg, get_recipe(quant.recipe), options)
    guidance = loaded.guidance(quant.spec.guidance_scale, quant.spec.guidance_rescale,  # refuse before any work
                               negative_prompt=quant.spec.negative_prompt)
    if not loaded.text_conditioned:  # (prompts are encoded once, by the calibration itself)
        loaded.conditioning_for(quant.spec.n, quant.spec.label_list)
    elif loaded.text is None:
        raise ValueError(f"{loaded.name!r} has no text encoder: calibrating a text-conditional UNet needs a Stable "
                         "Diffusion layout pipeline (text_encoder/, tokenizer/) to encode its prompts")
    if build_options is not None and loaded.seq_len is not None:  # the text encoder's sequence length
        build_options = dataclasses.replace(build_options, seq_len=(loaded.seq_len,) * 3)
    if build_options is not None and guidance.active:  # a guided step is one UNet call of 2 rows per image
        build_options = dataclasses.replace(build_options, min_batch=2 * build_options.min_batch,
                                            opt_batch=2 * build_options.opt_batch, max_batch=2 * build_options.max_batch)
        progress(f"guidance {guidance.scale:g}: engine profiles sized for 2 UNet rows per image "
                 f"(batch {build_options.min_batch}..{build_options.max_batch})")
    with stage("calibration"):
        calib = calibrate(loaded, quant, progress=show_progress)
    how = ("reused from cache" if calib.stats_reused else
           f"collected in {calib.seconds_collect:.1f} s: FP trajectories {calib.seconds_trajectories:.1f} s + "
           f"statistics pass {calib.seconds_collect - calib.seconds_trajectories:.1f} s")
    progress(f"calibration: recipe {quant.recipe}, {len(calib.ranges)} activation ranges -> {calib.ranges_path} "
             f"(statistics {how})")
    job = ExportJob(loaded=loaded, qcfg=quant.qcfg, calib=calib, recipe=quant.recipe, spec=quant.spec,
                    out_dir=Path(out_dir), batch_size=quant.batch, precision=precision, options=options)
    with stage("export"):
        graphs = tgt.export(job, progress)
    result = DeployResult(calib, graphs, usage=tgt.usage([g.onnx for g in graphs]))
    if not (build and tgt.builds):
        return result
    all_graphs = list(graphs)
    if baseline and hasattr(tgt, "export_baseline"):
        base = tgt.export_baseline(loaded, Path(out_dir), precision=precision)
        progress(f"  {base.onnx}: unquantized baseline, checked")
        all_graphs.append(base)
    try:
        _, flavour = trt_module(flavour)
    except EngineError as e:
        result.not_built = str(e)
        return result
    with stage("build"):
        result.sidecars = tgt.build(all_graphs, build_options, flavour=flavour, progress=progress)
    result.usage = tgt.usage([g.onnx.with_suffix(".plan") for g in graphs])
    return result
