"""trt_dm: post-training int8 quantization (PTQ4DM) for diffusion UNets, deployed as TensorRT engines."""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("trt_dm")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
