"""Helpers shared by unit and integration tests (`from support import ...`: pytest puts tests/, the folder of the
root conftest.py, on sys.path)."""
import numpy as np
import pytest

from trt_dm.core.signature import OUTPUT_NAME
from trt_dm.eval import data

needs_data = pytest.mark.skipif(not (data.dataset_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed")

KEEP = ("down_blocks.0.*",)  # the layers kept in FP at the noisy steps in the --keep-fp-from-t tests

# `trt-dm export` flags of the OpenVINO tests: a small, fast calibration
EXPORT = ["--recipe", "ptq4dm", "--calib-n", "8", "--calib-steps", "4", "--batch", "4", "--no-progress"]


def rel_rmse(a, b) -> float:
    """Relative RMS error of ``a`` against ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def ort_reference(path, feed: dict) -> np.ndarray:
    """ONNX Runtime with graph optimisations off: every Q/DQ evaluated in float (no int8 kernels, no saturation)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {k: v.numpy() for k, v in feed.items()})[0]


def served_equals_sampled(loaded, prompts=("the cat", "a red apple")):
    """`trt-dm serve` over ``loaded`` (torch FP): two prompts' images served at seed 7 equal `trt-dm sample`'s
    (uint8 rounding, <= 1); returns the service's answers to /v1/models, a request without a prompt and one with
    class labels."""
    import base64
    import io

    from PIL import Image

    from trt_dm import api
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from trt_dm.core.images import to_uint8
    from trt_dm.serve.engine import Service
    from trt_dm.serve.http import create_app
    with api.open_denoiser(loaded, device="cpu") as den:
        ref = to_uint8(api.draw(loaded, den, api.SampleSettings(steps=3, n=2, seed=7, prompts=prompts,
                                                                guidance_scale=7.5), progress=False)[0])
        with TestClient(create_app(Service(loaded, den, max_rows=8))) as client:
            r = client.post("/v1/generate", json={"n": 2, "steps": 3, "seed": 7, "prompt": list(prompts),
                                                  "output": "json"})
            assert r.status_code == 200, r.text
            for i, b in enumerate(r.json()["images"]):
                got = np.array(Image.open(io.BytesIO(base64.b64decode(b))))[2:-2, 2:-2].astype(int)
                assert np.abs(got - ref[i].astype(int)).max() <= 1
            return {"models": client.get("/v1/models").json(),
                    "no_prompt": client.post("/v1/generate", json={"n": 1}),
                    "labels": client.post("/v1/generate", json={"n": 1, "class_labels": [1]})}
