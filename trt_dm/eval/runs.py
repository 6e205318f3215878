"""Evaluation runs (`trt-dm eval`): FP images cached per model and settings, FD / KID against the reference set,
class accuracy, and a quantized model's same-seed fidelity to FP (``EvalResult``)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trt_dm.core.guidance import cfg_denoiser
from trt_dm.eval import metrics as E
from trt_dm.eval.classify import class_accuracy, load_classifier, paired_accuracy
from trt_dm.models.loading import LoadedModel
from trt_dm.models.text import prompts_key
from trt_dm.quant.calibrate import calibrate_settings
from trt_dm.quant.config import CALIB_CACHE_ROOT, DEFAULT_EXCLUDE, QuantSettings
from trt_dm.quant.fakequant import FakeQuant
from trt_dm.runtime.open import Denoiser, PathsLike, check_sources, open_denoiser, paths_of
from trt_dm.sampling import SampleSettings, conditioning, draw, schedule

log = logging.getLogger(__name__)


def fp_samples(loaded: LoadedModel, settings: SampleSettings, *, cache_root: Path = CALIB_CACHE_ROOT,
               device: str | None = None, progress: bool = True,
               fp: Denoiser | None = None) -> tuple[torch.Tensor, float, Path, bool]:
    """FP images for (model, schedule, sampler settings, seeds), cached under ``cache_root/<data key>/samples`` so
    every quantized run compared with them reuses the same images: (images, seconds, path, reused). ``fp``: an
    FP denoiser the caller has open already (none: one is opened for the draw)."""
    from safetensors.torch import load_file

    from trt_dm.core.images import save_samples
    path = Path(cache_root) / loaded.data_key()[:16] / "samples" / f"{settings.for_model(loaded).key()}.safetensors"
    if path.exists():
        log.info("reusing FP samples %s", path)
        return load_file(str(path))["samples"], 0.0, path, True
    with contextlib.nullcontext(fp) if fp is not None else open_denoiser(unet=loaded.unet, device=device) as den:
        images, secs = draw(loaded, den, settings, progress=progress)
    save_samples(images, path, {"sampler": settings.sampler, "steps": str(settings.steps), "seed": str(settings.seed),
                                "model": loaded.fingerprint(), "schedule": loaded.schedule_fingerprint()})
    return images, secs, path, False



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
    guidance_interval: list[int] | None = None  # timesteps where the guidance scale applied (None: all)
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
    format: str | None = None  # the 8-bit formats of a quantized run: int8 | fp8 | int8+fp8 (a mix)
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



class _Scores:
    """The measurements of one evaluation run: FD / KID against the reference set (none for a text-to-image
    pipeline) and class accuracy from the project's classifier (class-conditional Fashion-MNIST-shaped models)."""

    def __init__(self, loaded: LoadedModel, settings: SampleSettings, cond: dict, *, extractor, ref: str,
                 ref_limit: int | None, progress: bool) -> None:
        self.labels = cond.get("class_labels")
        self.classifier = None
        if self.labels is not None and tuple(loaded.sample_shape) == (1, 32, 32) and (loaded.num_classes or 0) <= 10:
            self.classifier = load_classifier()  # before any work: a missing classifier is said at once
        elif self.labels is not None:
            log.warning("class accuracy is not available for %s: the project's classifier takes Fashion-MNIST-shaped "
                        "(1, 32, 32) images of its 10 classes, the model makes %s", loaded.name, loaded.sample_shape)
        self.disable = None if progress else True
        self.text = loaded.text is not None
        if self.text:  # the Fashion-MNIST reference does not describe a text-to-image pipeline's images
            self.label, self.extractor, self.reference, self.kid_size = "FD", None, [], 0
        else:
            self.extractor = extractor if extractor is not None else E.get_extractor("effnet")
            self.label = "FD-EffNet" if isinstance(self.extractor, E.EffNetFeatures) else "FID (Inception)"
            self.reference = E.reference_features(ref, self.extractor, limit=ref_limit, disable=self.disable)
            self.kid_size = min(1000, settings.n, len(self.reference))

    def fd_kid(self, images: torch.Tensor) -> tuple[float, float, float]:
        if self.text:
            return float("nan"), float("nan"), float("nan")
        feats = E.extract_features(images, self.extractor, disable=self.disable)
        return (E.frechet_distance(feats, self.reference), *E.kid(feats, self.reference, subset_size=self.kid_size))

    def accuracy(self, images: torch.Tensor) -> float | None:
        return None if self.classifier is None else class_accuracy(images, self.labels, self.classifier)


def _new_result(loaded: LoadedModel, settings: SampleSettings, cond: dict, scores: _Scores, ref: str) -> EvalResult:
    """The result's description of the run (model, sampler, seeds, reference, conditioning), nothing measured."""
    res = EvalResult(model=str(loaded.source), fingerprint=loaded.fingerprint(),
                     schedule_fingerprint=loaded.schedule_fingerprint(), sampler=settings.sampler, steps=settings.steps,
                     eta=settings.eta, n=settings.n, seed=settings.seed, reference=f"fashion-mnist-{ref}",
                     reference_n=len(scores.reference), metric=scores.label, kid_subset_size=scores.kid_size,
                     threads=torch.get_num_threads())
    if cond and settings.labels is not None:
        res.labels = settings.labels if isinstance(settings.labels, str) else ",".join(map(str, settings.labels))
    if cond:
        res.guidance_scale, res.guidance_rescale = settings.guidance_scale, settings.guidance_rescale
        res.guidance_interval = list(settings.guidance_interval) if settings.guidance_interval else None
    if scores.text:
        if settings.prompts is not None:
            res.prompts = {"n": len(settings.prompts), "sha256": prompts_key(settings.prompts, settings.negative_prompt),
                           "first": settings.prompts[0]}
        res.reference, res.reference_n = "none", 0
        res.not_available = {
            "FD / KID": "the reference set is Fashion-MNIST, which says nothing about a text-to-image pipeline's images",
            "CLIP score": "the pipeline has a text encoder but no matching image encoder (CLIPVisionModelWithProjection "
                          "of the same CLIP), so text-image agreement cannot be measured with its own encoders"}
    return res


def _test_source(loaded: LoadedModel, res: EvalResult, quant: QuantSettings | None, onnx: list[Path],
                 openvino: list[Path], progress: bool) -> dict:
    """``open_denoiser``'s arguments for the model under test (recorded in ``res``): exported graphs, or the
    fake-quant model of ``quant`` (calibrated here, cached)."""
    if onnx or openvino:
        res.onnx = " ".join(map(str, onnx)) or None
        res.openvino = " ".join(map(str, openvino)) or None
        return {"onnx": onnx, "openvino": openvino}
    calib = calibrate_settings(loaded, quant, progress=progress)
    q = quant.qcfg
    res.recipe, res.ranges, res.weight_bits, res.weight_calib = quant.recipe, str(calib.ranges_path), q.weight_bits, q.weight_calib
    res.format = q.precision
    res.shortcut_split, res.calibration, res.calib_n = q.shortcut_split, quant.spec.timesteps.describe(), quant.spec.n
    res.rounding = q.rounding if q.rounding != "nearest" else None
    res.w8_layers = list(q.w8_layers) or None
    res.keep_fp = [p for p in q.exclude if p not in DEFAULT_EXCLUDE] + list(q.noisy_fp) or None
    res.keep_fp_from_t = q.fp_from_t
    return {"torch_source": FakeQuant(loaded, q, calib.ranges, calib.weights_path)}


def _eps_comparison(loaded: LoadedModel, settings: SampleSettings, fp: Denoiser, test: Denoiser, n: int,
                    progress: bool) -> dict:
    """Per-timestep noise-prediction error of ``test`` vs ``fp`` on the first ``n`` images' trajectories; with
    guidance, also the error of the conditional prediction alone on the same x_t (what guidance does to the
    quantization error is the difference between the two)."""
    eps_cond, guidance = conditioning(loaded, settings, n)
    also = {"conditional": (fp, test)} if guidance.active else None
    return E.compare_denoisers(cfg_denoiser(fp, guidance), cfg_denoiser(test, guidance), schedule(loaded),
                               range(settings.seed, settings.seed + n), loaded.sample_shape,
                               sampler=settings.sampler, steps=settings.steps, eta=settings.eta,
                               batch_size=settings.batch, progress=progress, conditioning=eps_cond, also=also)


def evaluate(loaded: LoadedModel, settings: SampleSettings, *, quant: QuantSettings | None = None,
             onnx: PathsLike = None, openvino: PathsLike = None, ov_precision: str = "fp32",
             ov_streams: int | None = None, extractor=None, ref: str = "test", ref_limit: int | None = None,
             eps_n: int = 256, cache_root: Path = CALIB_CACHE_ROOT, device: str | None = None,
             threads: int | None = None, progress: bool = True) -> EvalResult:
    """FD (FD-EffNet by default, or the given feature ``extractor``) and KID against Fashion-MNIST ``ref``; with
    ``quant`` (a fake-quant recipe), ``onnx`` (exported graphs in ONNX Runtime: one, or the timestep groups /
    segments of one deployment) or ``openvino`` (exported graphs in OpenVINO, ``ov_precision`` for their
    non-quantized math, ``ov_streams`` its streams) also the same-seed fidelity to FP: FD change, PSNR of the
    images, per-timestep noise-prediction error on ``eps_n`` images."""
    onnx, openvino = paths_of(onnx), paths_of(openvino)
    given = [k for k, v in (("--recipe", quant), ("--onnx", onnx), ("--openvino", openvino)) if v]
    if len(given) > 1:
        raise ValueError("--recipe evaluates the torch fake-quant model, --onnx / --openvino an exported graph in "
                         f"ONNX Runtime / OpenVINO: give one, not {' and '.join(given)}")
    check_sources(onnx=onnx, openvino=openvino, threads=threads, ov_precision=ov_precision,
                  ov_streams=ov_streams)  # missing files, bad options: before the long run
    quant = quant.resolved(loaded) if quant is not None else None
    if quant is not None and quant.spec.guidance_scale != settings.guidance_scale:
        log.info("calibrating with guidance %g, sampling with %g", quant.spec.guidance_scale, settings.guidance_scale)
    cond, _ = conditioning(loaded, settings)  # bad labels / guidance fail before any work
    settings = settings.for_model(loaded)  # the model's guidance interval, explicit in the cache key and result
    scores = _Scores(loaded, settings, cond, extractor=extractor, ref=ref, ref_limit=ref_limit, progress=progress)
    res = _new_result(loaded, settings, cond, scores, ref)
    if quant is None and not onnx and not openvino:
        fp_images, fp_secs, _, _ = fp_samples(loaded, settings, cache_root=cache_root, device=device,
                                              progress=progress)
        res.images, res.sampling_seconds = fp_images, round(fp_secs, 1)
        res.fd, res.kid_mean, res.kid_std = scores.fd_kid(fp_images)
        res.class_accuracy = scores.accuracy(fp_images)
        return res
    source = _test_source(loaded, res, quant, onnx, openvino, progress)
    with open_denoiser(**source, threads=threads, ov_precision=ov_precision,
                       ov_streams=ov_streams) as test, open_denoiser(unet=loaded.unet, device=device) as fp:
        res.ov_precision = test.describe.get("precision") if openvino else None
        images, secs = draw(loaded, test, settings, progress=progress)
        res.images, res.sampling_seconds = images, round(secs, 1)
        # the FP images after the quantized ones: a second process (`trt-dm eval` of the FP row) can fill the
        # FP sample cache meanwhile, and this run then reuses them instead of drawing them again
        fp_images, _, _, _ = fp_samples(loaded, settings, cache_root=cache_root, progress=progress, fp=fp)
        res.eps_n = min(settings.n, eps_n)
        cmp = _eps_comparison(loaded, settings, fp, test, res.eps_n, progress)
        res.eps_conditional = cmp.get("eps_conditional")
    res.fd, res.kid_mean, res.kid_std = scores.fd_kid(images)
    res.fp_fd, res.fp_kid_mean, res.fp_kid_std = scores.fd_kid(fp_images)
    res.psnr_vs_fp, res.eps = E.psnr(fp_images, images), cmp["eps"]
    res.fd_change_vs_fp_pct = None if scores.text else 100 * (res.fd - res.fp_fd) / res.fp_fd
    res.class_accuracy, res.fp_class_accuracy = scores.accuracy(images), scores.accuracy(fp_images)
    if scores.classifier is not None:
        res.class_accuracy_vs_fp = paired_accuracy(fp_images, images, scores.labels, scores.classifier)
    return res
