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
