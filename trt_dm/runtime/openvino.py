"""The OpenVINO runner: an ONNX graph (or OpenVINO IR) compiled by OpenVINO for the CPU.

    with OpenVinoRunner("engines/default-ptq4dm.fp32.onnx", threads=2) as r:
        out = r.infer({"sample": x, "timestep": t})["out_sample"]

It runs the same Q/DQ graph the TensorRT target exports (symmetric int8 on layer inputs, FP32 math elsewhere):
OpenVINO's low-precision transformations turn each QuantizeLinear/DequantizeLinear pair around a convolution or
matmul into an int8 kernel, with no second calibration. What each layer executes is in the target's report
(``trt-dm export --target openvino``; ``trt_dm.targets.openvino.layer_precisions``).

Options (OpenVINO CPU properties): ``threads`` -> INFERENCE_NUM_THREADS; ``precision`` ("fp32" / "bf16") ->
INFERENCE_PRECISION_HINT, the precision of the non-quantized math (bf16 needs a CPU with native bf16:
AVX512_BF16 or AMX; elsewhere OpenVINO keeps f32, which the runner reads back from the compiled model and says);
``cache_dir`` -> CACHE_DIR, OpenVINO's model cache: compiled blobs keyed by the graph's content and the
options, so a second start loads instead of compiling (default: ``<graph stem>.ovcache/`` next to the graph;
``False``: no cache); ``streams`` -> NUM_STREAMS: with k > 1 streams a call of at least k rows is split into k
near-equal slices run at once, each on its own stream with its share of the threads, and a call of fewer rows runs
on a second, one-stream compilation with all threads (compiled when first needed), so a lone image keeps its
latency. Default: 2 streams where there are >= 2 threads (measured on a 2-core AVX-512 VNNI EPYC, DDPM-CIFAR10 int8:
+5 % at batch 8, +16 % at batch 32 over one stream, side by side in one run), else 1. Each slice is computed as in a
call of its own, so row i of a split call equals row i of an unsplit one up to the float rounding of another kernel
schedule.

Part of the runtime: it imports only ``trt_dm.core`` and ``trt_dm.runners`` (and OpenVINO when activated), and
``trt_dm.runners`` loads it lazily, so processes that never run OpenVINO never import it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from trt_dm.core.cpu import INSTALL_HINT, SAFE_WEIGHT_CODE, cpu_int8_isa, pair_sums_saturate
from trt_dm.core.io import sha256_file
from trt_dm.core.signature import OUTPUT_NAME, Signature, TensorSpec, dtypes
from trt_dm.runtime.base import Runner

log = logging.getLogger(__name__)

# our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
_DTYPES = dtypes("openvino")


def import_openvino():
    """The ``openvino`` module, or ImportError saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise ImportError(f"OpenVINO is not installed ({e}): {INSTALL_HINT}") from None
    return openvino


def default_cache_dir(path: str | Path) -> Path:
    """``engines/M-R.fp32.onnx`` -> ``engines/M-R.fp32.ovcache`` (one folder per graph, beside it)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.ovcache")


def default_streams(threads: int | None) -> int:
    """2 streams where the runner has >= 2 threads (its own or, with none given, the machine's cores), else 1."""
    return 2 if (threads or os.cpu_count() or 1) >= 2 else 1


def compile_config(*, threads: int | None = None, precision: str = "fp32",
                   cache_dir: str | Path | None = None, streams: int | None = None) -> dict:
    """The OpenVINO CPU properties for these options (``streams`` None: ``default_streams(threads)``); ValueError
    naming the accepted values."""
    if streams is None:
        streams = default_streams(threads)
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if streams < 1:
        raise ValueError(f"OpenVINO streams must be >= 1, got {streams}")
    if threads and streams > threads:
        raise ValueError(f"OpenVINO streams ({streams}) cannot exceed threads ({threads}): each stream needs a thread")
    cfg = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "NUM_STREAMS": int(streams)}
    if streams == 1:
        cfg["PERFORMANCE_HINT"] = "LATENCY"
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    if cache_dir:
        cfg["CACHE_DIR"] = str(cache_dir)
    return cfg


class OpenVinoRunner(Runner):
    """A graph compiled by OpenVINO for the CPU; one infer request per stream, inputs fed as numpy views of the
    tensors."""

    def __init__(self, path, *, threads: int | None = None, precision: str = "fp32",
                 cache_dir: str | Path | bool | None = None, streams: int | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such graph file (ONNX or OpenVINO IR .xml)")
        self._default_cache = cache_dir is None or cache_dir is True
        if self._default_cache:
            cache_dir = default_cache_dir(self.path)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.config = compile_config(threads=threads, precision=precision, cache_dir=self.cache_dir, streams=streams)
        self.streams = self.config["NUM_STREAMS"]
        self.threads, self.precision = threads, precision
        self.name = name or f"openvino-{precision}"
        self.device = torch.device("cpu")
        self.compiled = None
        self._requests: list = []  # one per stream
        self._single = None  # the one-stream request for calls of fewer rows than streams
        self._core = None
        self.effective_precision: str | None = None  # what OpenVINO runs the non-quantized math in
        self.loaded_from_cache: bool | None = None
        self.compile_seconds: float | None = None

    def _warn_if_weights_saturate(self) -> None:
        """On a CPU without VNNI / AMX, warn when the graph's export report (``<graph>.openvino.json``, if it is
        there and describes this file) says its weight codes exceed SAFE_WEIGHT_CODE: results then differ from
        the graph's semantics here (the export warned too, but maybe on another machine)."""
        isa = cpu_int8_isa()
        report = Path(f"{self.path}.openvino.json")
        if not pair_sums_saturate(isa) or not report.is_file():
            return
        try:
            doc = json.loads(report.read_text())
            stale = doc.get("onnx_sha256") != sha256_file(self.path)
        except (OSError, ValueError):
            return
        if not stale and doc.get("weight_code_max", 0) > SAFE_WEIGHT_CODE:
            log.warning("%s: this CPU has no VNNI / AMX (int8 instructions: %s) and the graph's weight codes reach %d: "
                        "OpenVINO's int8 sums can saturate, so outputs differ from the graph's semantics; export with "
                        "--weight-bits 7 for this CPU (docs/deployment.md, OpenVINO)", self.name, isa,
                        doc["weight_code_max"])

    def activate(self) -> None:
        ov = import_openvino()
        core = ov.Core()
        if self.cache_dir is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                if not self._default_cache:
                    raise ValueError(f"OpenVINO cache folder {self.cache_dir} cannot be created: {e}") from None
                log.warning("%s: no OpenVINO model cache (%s: %s); every start compiles the graph", self.name,
                            self.cache_dir, e.strerror or e)
                self.cache_dir = None
                self.config.pop("CACHE_DIR")
        self._core = core
        t0 = time.perf_counter()
        try:
            self.compiled = core.compile_model(str(self.path), "CPU", self.config)
        except RuntimeError as e:
            raise RuntimeError(f"{self.path}: OpenVINO could not compile the graph: {str(e).strip().splitlines()[-1]}") from e
        self.compile_seconds = time.perf_counter() - t0
        try:
            self.loaded_from_cache = bool(self.compiled.get_property("LOADED_FROM_CACHE"))
        except RuntimeError:  # older OpenVINO
            self.loaded_from_cache = None
        self.effective_precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string())
        if self.effective_precision != PRECISIONS[self.precision]:
            log.warning("%s: asked for %s, OpenVINO runs %s on this CPU (%s; native bf16 needs AVX512_BF16 or AMX)",
                        self.name, self.precision, self.effective_precision,
                        "/".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
        specs, graph_inputs = [], None
        for port in self.compiled.inputs:
            et = port.get_element_type().to_string()
            if et not in _DTYPES:
                raise ValueError(f"{self.path}: input {port.get_any_name()!r} has type {et}, which this runner does "
                                 f"not feed; accepted: {sorted(_DTYPES)}")
            shape = tuple(d.get_length() if d.is_static else "dynamic" for d in port.get_partial_shape())
            # a port carries every tensor name OpenVINO merged into it (a Cast right after an input, as in a one-graph
            # UNet, adds its own): the graph's input name is the one to feed and check against
            name = port.get_any_name()
            if len(port.get_names()) > 1:
                graph_inputs = graph_inputs or set(Signature.from_onnx(self.path).names)
                name = next((n for n in sorted(port.get_names()) if n in graph_inputs), name)
            specs.append(TensorSpec(name, _DTYPES[et], shape, name not in ("sample", "timestep")))
        self._signature = Signature(tuple(specs))
        if OUTPUT_NAME not in {n for o in self.compiled.outputs for n in o.get_names()}:
            raise ValueError(f"{self.path}: no output named {OUTPUT_NAME!r} (outputs: "
                             f"{[o.get_any_name() for o in self.compiled.outputs]}); export it with trt-dm")
        self._requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        self._single = self._requests[0] if self.streams == 1 else None
        self._warn_if_weights_saturate()
        log.info("%s: %s compiled in %.2f s (%s), math %s, %d stream(s)", self.name, self.path,
                 self.compile_seconds, "from cache" if self.loaded_from_cache else "no cache hit",
                 self.effective_precision, self.streams)

    def deactivate(self) -> None:
        self._requests, self._single = [], None
        self.compiled = self._core = None

    def _single_request(self):
        """The one-stream request (all threads) for calls too small to split; compiled on first use."""
        if self._single is None:
            cfg = {**self.config, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
            self._single = self._core.compile_model(str(self.path), "CPU", cfg).create_infer_request()
        return self._single

    @property
    def signature(self) -> Signature:
        if self.compiled is None:
            raise RuntimeError(f"{self.name} is not active: use it as `with runner:`")
        return self._signature

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {s.name: feed[s.name].detach().cpu().to(s.dtype).contiguous().numpy() for s in self._signature.inputs}
        rows = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        k = self.streams
        if k == 1 or len(rows) != 1 or next(iter(rows)) < k:  # one call on all threads
            request = self._single_request()
            request.infer(arrays)
            return {OUTPUT_NAME: torch.from_numpy(request.get_tensor(OUTPUT_NAME).data.copy()).float()}
        n = next(iter(rows))
        bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        for request, (a, b) in zip(self._requests, bounds):
            request.start_async({name: v[a:b] for name, v in arrays.items()})
        for request in self._requests:
            request.wait()
        # concatenate copies: each request reuses its output buffer
        out = np.concatenate([request.get_tensor(OUTPUT_NAME).data for request in self._requests])
        return {OUTPUT_NAME: torch.from_numpy(out).float()}
