"""The TensorRT flavours (full TensorRT, TensorRT-RTX) as data: what each can do, and which one is importable.

The builder (``trt_dm.targets.trt_builder``), the runtime (``trt_dm.runtime.tensorrt``) and the sidecar checks
(``trt_dm.core.artifacts``) ask a ``Flavour`` for a capability instead of comparing names; sidecars and
``--flavour`` keep the name string.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """An engine cannot be built, or a built engine does not fit this runtime / GPU / file."""


@dataclass(frozen=True)
class Flavour:
    """One TensorRT package and the capabilities of its builder and runtime."""
    name: str              # the Python module to import; the name sidecars store and --flavour takes
    title: str             # the product's name in messages
    install: str           # how to get it (the "no TensorRT found" message)
    # builds ahead of time, without a GPU, for a list of compute capabilities (BuildOptions.rtx_targets), and an
    # engine fits a GPU in that list; else it builds on one GPU, for that GPU's compute capability
    compute_targets: bool
    timing_cache: bool     # the builder reads and writes a timing cache (BuildOptions.timing_cache)
    # has BuilderFlag.INT8 / FP16 for a network without STRONGLY_TYPED (TensorRT < 10); else always strongly typed
    precision_flags: bool
    engine_inspector: bool  # layer precisions from the engine inspector (on the GPU it built on), else the build log
    # kernels are compiled just in time when a context is made: contexts take a runtime config (kernel
    # specialisation, a runtime cache file, its own whole-graph CUDA capture)
    jit_runtime: bool


TENSORRT = Flavour(name="tensorrt", title="TensorRT", install="install TensorRT 10/11 on a GPU machine",
                   compute_targets=False, timing_cache=True, precision_flags=True, engine_inspector=True,
                   jit_runtime=False)
TENSORRT_RTX = Flavour(name="tensorrt_rtx", title="TensorRT-RTX",
                       install="pip install tensorrt-rtx-cu13 (builds without a GPU)", compute_targets=True,
                       timing_cache=False, precision_flags=False, engine_inspector=False, jit_runtime=True)
# by name, in the order trt_module tries them (full TensorRT first)
FLAVOURS: dict[str, Flavour] = {f.name: f for f in (TENSORRT, TENSORRT_RTX)}
INSTALL_HINT = f"{TENSORRT_RTX.install}, or {TENSORRT.install}"


def get_flavour(flavour: str | Flavour) -> Flavour:
    """The flavour of that name (a ``Flavour`` is returned as it is); ValueError naming the accepted names."""
    if isinstance(flavour, Flavour):
        return flavour
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {flavour!r}; expected one of {tuple(FLAVOURS)}")
    return FLAVOURS[flavour]


def trt_module(flavour: str | Flavour | None = None):
    """(module, Flavour): ``flavour`` if given, else full TensorRT if importable, else TensorRT-RTX."""
    wanted = [get_flavour(flavour)] if flavour else list(FLAVOURS.values())
    for fl in wanted:
        try:
            return importlib.import_module(fl.name), fl
        except ImportError as e:  # the tensorrt meta-package can exist without loadable libraries
            log.info("%s not usable: %s", fl.name, e)
    raise EngineError(f"no TensorRT found ({' or '.join(fl.name for fl in wanted)} not importable): {INSTALL_HINT}")
