"""The one way to open a denoiser: TensorRT engines, ONNX Runtime graphs, OpenVINO graphs, a torch model built
elsewhere (the fake-quant model: ``trt_dm.quant.fakequant.FakeQuant``), or the torch FP UNet.

    with open_denoiser(onnx=["engines/default-ptq4dm-g4.onegraph.fp32.onnx"], unet=loaded.unet) as den:
        eps = den(x, t)

``check_sources`` validates a request (one kind of source, files present, K files carrying their timestep groups,
OpenVINO options) without opening anything, so a long run can refuse bad input before its work; ``open_denoiser``
runs it first. The API, evaluation, the CLI and the service all open denoisers here. Like the rest of the runtime,
this module imports only ``trt_dm.core`` (the torch model is given, never built here).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from trt_dm.core.artifacts import ExportReport, Sidecar
from trt_dm.runtime.base import as_denoiser, switched_denoiser
from trt_dm.runtime.ort import OrtRunner
from trt_dm.runtime.torch_runner import TorchRunner

PathsLike = Sequence[str | Path] | str | Path | None


class Denoiser:
    """An open denoiser: call it as ``den(x, t, **conditioning)``; ``device`` is where its inputs should live;
    ``describe`` says what runs (for reports and a server's /v1/models)."""

    def __init__(self, fn: Callable, device: torch.device, describe: dict) -> None:
        self._fn, self.device, self.describe = fn, device, describe

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self._fn(x, t, **extra)


class TorchSource(Protocol):
    """A torch model built outside the runtime (the fake-quant model): opened on an exit stack as
    (denoiser function, describe); it runs on the CPU."""

    def open(self, stack: contextlib.ExitStack) -> tuple[Callable, dict]: ...


@dataclass(frozen=True)
class Sources:
    """A checked request: ``kind`` "engines", "onnx", "openvino", "torch" (a ``TorchSource``) or None (the FP
    UNet); ``paths`` its files; ``t_ranges`` (t_max, t_min) per file when several (a groups=K deployment)."""
    kind: str | None
    paths: tuple[Path, ...] = ()
    t_ranges: list[tuple[int, int]] | None = None


def paths_of(given: PathsLike) -> list[Path]:
    """One path (str / Path) or several (a sequence; None for none) -> a list of paths."""
    return [Path(given)] if isinstance(given, (str, Path)) else [Path(p) for p in given or ()]


def _t_range(path: Path) -> tuple[int, int] | None:
    meta = Sidecar.load(path) if path.suffix == ".plan" else ExportReport.load(path)
    return tuple(meta.t_range) if meta is not None and meta.t_range else None


def check_sources(*, engines: PathsLike = (), onnx: PathsLike = (), openvino: PathsLike = (),
                  torch_source: TorchSource | None = None, threads: int | None = None, ov_precision: str = "fp32",
                  ov_streams: int | None = None) -> Sources:
    """What ``open_denoiser`` would open, checked: ValueError for more than one kind of source, OpenVINO options
    it refuses, or several files that are not the timestep groups of one ``groups=K`` recipe; FileNotFoundError
    for a missing file. Nothing is loaded."""
    named = {"engines": paths_of(engines), "onnx": paths_of(onnx), "openvino": paths_of(openvino),
             "ranges": torch_source is not None}
    given = [k for k, v in named.items() if v]
    if len(given) > 1:
        raise ValueError(f"give one of engines, onnx, openvino or ranges, not {' and '.join(given)}")
    if torch_source is not None:
        return Sources("torch")
    if not given:
        return Sources(None)
    kind = given[0]
    if kind == "openvino":
        from trt_dm.runtime.openvino import compile_config
        compile_config(threads=threads, precision=ov_precision, streams=ov_streams)  # bad options, before loading
    paths = tuple(named[kind])
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such {'engine' if kind == 'engines' else 'ONNX'} file")
    t_ranges = [_t_range(p) for p in paths] if len(paths) > 1 else None
    if t_ranges is not None and any(r is None for r in t_ranges):
        raise ValueError("several engines / graphs must be the timestep groups of one groups=K recipe "
                         "(their sidecars / reports carry t_range); got files without one")
    return Sources(kind, paths, t_ranges)


def _file_runner(kind: str, n: int, *, threads, cuda_graph, ov_precision, ov_cache_dir, ov_streams, ort_spin
                 ) -> Callable[[Path], Any]:
    """The runner constructor for one file of ``kind`` (``n`` files in the deployment)."""
    if kind == "engines":  # K group engines never run at once: one device-memory block for all of them
        from trt_dm.runtime.tensorrt import SharedDeviceMemory, TrtRunner
        shared = SharedDeviceMemory() if n > 1 else None
        return lambda p: TrtRunner(p, cuda_graph=cuda_graph, shared_memory=shared)
    if kind == "openvino":
        from trt_dm.runtime.openvino import OpenVinoRunner
        return lambda p: OpenVinoRunner(p, threads=threads, precision=ov_precision, cache_dir=ov_cache_dir,
                                        streams=ov_streams)
    return lambda p: OrtRunner(p, threads=threads, spin=ort_spin)


@contextlib.contextmanager
def open_denoiser(*, engines: PathsLike = (), onnx: PathsLike = (), openvino: PathsLike = (),
                  torch_source: TorchSource | None = None, unet: torch.nn.Module | None = None,
                  device: str | None = None, threads: int | None = None, cuda_graph: bool = False,
                  ov_precision: str = "fp32", ov_cache_dir: str | Path | bool | None = None,
                  ov_streams: int | None = None, ort_spin: bool = True) -> Iterator[Denoiser]:
    """The denoiser of one deployment: TensorRT ``engines``, ONNX Runtime ``onnx`` graphs, OpenVINO ``openvino``
    graphs (``ov_precision`` fp32 / bf16 for the non-quantized math, ``ov_cache_dir`` its model cache: default
    beside the graph, False for none; ``ov_streams`` its streams: default 2 with >= 2 threads; ``ort_spin`` False:
    ONNX Runtime's threads sleep between calls, see ``OrtRunner``), a ``torch_source`` (the fake-quant model), or
    the FP ``unet`` in torch (none of the others given). Several engines / graphs must be the timestep groups of
    one ``groups=K`` recipe. Runners are active inside the ``with`` block and freed after it."""
    src = check_sources(engines=engines, onnx=onnx, openvino=openvino, torch_source=torch_source, threads=threads,
                        ov_precision=ov_precision, ov_streams=ov_streams)
    with contextlib.ExitStack() as stack:
        if src.kind == "torch":
            fn, describe = torch_source.open(stack)
            yield Denoiser(fn, torch.device("cpu"), describe)
        elif src.kind is not None:
            make = _file_runner(src.kind, len(src.paths), threads=threads, cuda_graph=cuda_graph,
                                ov_precision=ov_precision, ov_cache_dir=ov_cache_dir, ov_streams=ov_streams,
                                ort_spin=ort_spin)
            runners = [stack.enter_context(make(p)) for p in src.paths]
            describe = {"runner": runners[0].name, "files": [str(p) for p in src.paths]}
            if src.kind == "openvino":  # what OpenVINO runs the non-quantized math in (bf16 only where the CPU has it)
                describe["precision"] = runners[0].effective_precision
                describe["streams"] = runners[0].streams
            elif src.kind == "onnx":
                describe["spin"] = ort_spin
            if src.t_ranges is None:
                fn = as_denoiser(runners[0])
            else:
                fn = switched_denoiser([as_denoiser(r) for r in runners], src.t_ranges)
                describe["t_ranges"] = src.t_ranges
            yield Denoiser(fn, runners[0].device, describe)
        else:
            if unet is None:
                raise ValueError("nothing to open: give engines, onnx, openvino, a torch source or the FP unet")
            # a runner moves its module to its device and dtype: off the CPU it gets a copy, so that the given
            # model (which calibration and export copy from) stays fp32 on the CPU
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            runner = stack.enter_context(TorchRunner(unet if dev.type == "cpu" else copy.deepcopy(unet), device=dev))
            yield Denoiser(as_denoiser(runner), runner.device, {"runner": runner.name})
