"""Shared fixtures: tiny diffusers models saved to disk once per session, the default model, GPU skips.

The session-scoped directories are shared by every test: treat them as read-only (copy them with
`shutil.copytree` before changing anything). Tiny models are built by `trt_dm.builders.tiny_unet2d` /
`tiny_unet2d_condition` with seed `TINY_SEED`, so a test can rebuild the exact saved model in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from support import EXPORT

from trt_dm import api
from trt_dm.cli.main import main
from trt_dm.models import builders, weights
from trt_dm.models import loading as models
from trt_dm.quant.calib.timesteps import parse
from trt_dm.quant.calib.trajectories import CalibSpec

TINY_SEED = 0
# Scheduler saved in the tiny pipeline: DDPM linear betas scaled for T=100 (1e-3..0.2, alpha_bar_T ~ 5e-5),
# so samplers in tests need few steps, and it differs from the T=1000 default so tests can tell them apart.
TINY_SCHEDULER_CONFIG = dict(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2, beta_schedule="linear",
                             prediction_type="epsilon", clip_sample=True)


# Tiny models gain nothing from threads, and on shared 2-core machines oversubscribed OpenMP threads
# spin against other jobs: one thread keeps the suite fast and its timings stable.
torch.set_num_threads(int(os.environ.get("TRT_DM_TEST_THREADS", "1")))


def _freeze_imports() -> None:
    """Import the libraries nearly every test loads, then move what exists now (modules, classes, functions: ~0.7 M
    objects) out of the garbage collector's reach (``gc.freeze``). ``trt_dm.core.stages.release_memory`` collects
    between stages, and each full collection walked all of them: 0.3 s a time, 10 of a 47 s engine test (measured)."""
    import gc

    import modelopt.torch.quantization  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import transformers  # noqa: F401

    import trt_dm.export.qdq  # noqa: F401
    gc.collect()
    gc.freeze()


_freeze_imports()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory) -> Path:
    """A tiny UNet2DModel (16 px, 1 channel) in save_pretrained layout (config.json + safetensors)."""
    path = tmp_path_factory.mktemp("tiny_unet") / "tiny_unet"
    builders.tiny_unet2d(TINY_SEED).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_cond_unet_dir(tmp_path_factory) -> Path:
    """A tiny UNet2DConditionModel (8 px, 1 channel, cross_attention_dim 16) in save_pretrained layout."""
    path = tmp_path_factory.mktemp("tiny_cond_unet") / "tiny_cond_unet"
    builders.tiny_unet2d_condition(TINY_SEED).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A DDPM pipeline directory: the tiny UNet2DModel in unet/, TINY_SCHEDULER_CONFIG in scheduler/."""
    path = tmp_path_factory.mktemp("tiny_pipeline") / "tiny_pipeline"
    builders.tiny_unet2d(TINY_SEED).save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(**TINY_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
         "unet": ["diffusers", "UNet2DModel"]}, indent=2))
    return path


TINY_CLASSES = 10  # the tiny class-conditional model: labels 0..9, null label 10 (num_class_embeds 11)


@pytest.fixture(scope="session")
def tiny_cls_pipeline_dir(tmp_path_factory) -> Path:
    """A class-conditional DDPM pipeline: tiny UNet2DModel with num_class_embeds = 11 in unet/, the tiny
    scheduler, and trt_dm.json naming label 10 as the null label (for classifier-free guidance)."""
    path = tmp_path_factory.mktemp("tiny_cls") / "tiny_cls"
    builders.tiny_unet2d(TINY_SEED, num_class_embeds=TINY_CLASSES + 1).save_pretrained(path / "unet",
                                                                                     safe_serialization=True)
    DDPMScheduler(**TINY_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    (path / "trt_dm.json").write_text(json.dumps({"null_class_label": TINY_CLASSES, "num_classes": TINY_CLASSES}))
    return path


@pytest.fixture(scope="session")
def tiny_dit_pipeline_dir(tmp_path_factory) -> Path:
    """A DiTPipeline-layout directory in pixel space: the tiny DiT (learned variance, 10 classes, null label 10)
    in transformer/, the tiny scheduler in scheduler/, no VAE."""
    return builders.write_tiny_dit_pipeline(tmp_path_factory.mktemp("tiny_dit") / "tiny_dit", TINY_SEED)


@pytest.fixture
def tiny_model(tiny_pipeline_dir) -> models.LoadedModel:
    """A fresh LoadedModel of the tiny pipeline (function scope: tests may modify it in place)."""
    return models.load_model(tiny_pipeline_dir)


@pytest.fixture
def tiny_cond_model(tiny_cond_unet_dir) -> models.LoadedModel:
    """A fresh LoadedModel of the tiny conditional UNet (DDPM default schedule)."""
    return models.load_model(tiny_cond_unet_dir)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model's directory; skips the test when it has not been trained yet."""
    env = os.environ.get(models.DEFAULT_MODEL_ENV)
    path = Path(env) if env else models.DEFAULT_MODEL_DIR
    # The training script writes unet/ then scheduler/: wait for both (a run may be exporting right now).
    if not ((path / "unet" / weights.SAFE_WEIGHTS).is_file() and (path / "scheduler").is_dir()):
        pytest.skip(f"default model not found at {path}; produce it with `python tools/train_default.py`")
    return path


@pytest.fixture(scope="session")
def tiny_sd_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny text-to-image pipeline in the Stable Diffusion layout (trt_dm.text.write_tiny_sd_pipeline): CLIP
    tokenizer and text model (width 16, sequence 8), a 2-level VAE (16 px images, 4x8x8 latents), a
    UNet2DConditionModel on the latents and a DDIM scheduler config as Stable Diffusion's."""
    pytest.importorskip("transformers")
    from trt_dm.models.builders import write_tiny_sd_pipeline
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "tiny_sd", seed=TINY_SEED)


TINY_SDXL = {"hidden": 24, "projection": 12, "time_dim": 4}


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny text-to-image pipeline in SDXL base's layout (``write_tiny_sd_pipeline(sdxl=TINY_SDXL)``): two CLIP
    tokenizers and encoders (widths 16 and 24, the second with a 12-wide pooled projection), a UNet2DConditionModel
    with the text_time added embedding (cross-attention width 40, time ids embedded 4 wide), an Euler scheduler."""
    pytest.importorskip("transformers")
    from trt_dm.models.builders import write_tiny_sd_pipeline
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "tiny_sdxl", seed=TINY_SEED, sdxl=TINY_SDXL)


# from test_onegraph.py
@pytest.fixture(scope="module")
def grouped(tiny_pipeline_dir, tmp_path_factory):
    loaded = api.load(str(tiny_pipeline_dir))
    quant = api.QuantSettings(recipe="max@groups=4", spec=CalibSpec(parse("uniform"), n=32, steps=20),
                              cache_root=tmp_path_factory.mktemp("cc"), batch=16).resolved(loaded)
    return loaded, quant, api.calibrate(loaded, quant, progress=False).ranges


# from test_openvino.py
@pytest.fixture(scope="module")
def cls_graph(tiny_cls_pipeline_dir, tmp_path_factory):
    """`trt-dm export --target openvino` of the tiny class-conditional pipeline: (model dir, graph, out dir)."""
    pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("ov")
    assert main(["export", "--target", "openvino", "--model", str(tiny_cls_pipeline_dir), "--out-dir", str(out),
                 "--cache-dir", str(out / "cc"), *EXPORT]) == 0
    return tiny_cls_pipeline_dir, out / f"{tiny_cls_pipeline_dir.name}-ptq4dm.fp32.onnx", out


# from test_text.py
@pytest.fixture(scope="module")
def sd(tiny_sd_pipeline_dir):
    return api.load(str(tiny_sd_pipeline_dir))
