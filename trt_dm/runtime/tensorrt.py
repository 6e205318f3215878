"""The TensorRT / TensorRT-RTX runner: an engine on one CUDA stream, with its bookkeeping kept apart from CUDA.

``BindingState`` decides, without touching CUDA, what each call must do: bind buffers for a new input shape,
run eagerly (warm-up), capture a CUDA graph, replay it, or stay eager for good after a failed capture. It is
tested on CPU (``tests/test_trt_runner_state.py``); ``TrtRunner`` only carries out its decisions with the
TensorRT and torch CUDA calls.

TensorRT-RTX specifics (its 1.7 bindings' docstrings; NVIDIA's TensorRT-RTX samples): kernels are compiled
just in time when a context is created, so a runtime cache file next to the plan (``<plan>.rtcache``) is
loaded before and saved after; dynamic-shape kernels are specialised lazily by default, so benchmarks and
tests ask for EAGER specialisation; CUDA graphs are RTX's own (``cuda_graph_strategy = WHOLE_GRAPH_CAPTURE``
in the runtime config), not a torch capture around ``execute_async_v3``. TensorRT-RTX targets only the GPUs of
its ``ComputeCapability`` enum (1.7: SM75, SM80, SM86, SM89, SM120, SM121): on others (e.g. an H200, SM90) the
runner refuses and says that full TensorRT is needed there.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from trt_dm.core.artifacts import Sidecar, check_sidecar
from trt_dm.core.flavour import EngineError, trt_module
from trt_dm.core.io import atomic_write
from trt_dm.core.signature import OUTPUT_NAME, Signature, TensorSpec
from trt_dm.runtime.base import Runner

log = logging.getLogger(__name__)


class BindingState:
    """What the next engine call must do, as a small state machine (no CUDA here).

    ``plan(shapes)`` -> "bind" when the input shapes differ from the bound ones (then ``bound`` or
    ``unbound``); ``action()`` -> "eager" (warm-up, or graphs off or failed), "capture" (after ``warmup`` eager
    calls of one shape) or "replay" (a captured graph for the bound shapes exists). A new shape drops the graph
    (its buffers moved); a refused shape leaves nothing bound, so the next call rebinds whatever it brings; a
    failed capture turns graphs off for good, said once.
    """

    def __init__(self, cuda_graph: bool, warmup: int = 1) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager call before a capture, got {warmup}")
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self.shapes: dict | None = None
        self.eager_calls = 0
        self.graph_ready = False
        self.capture_failed: str | None = None

    def needs_bind(self, shapes: dict) -> bool:
        return shapes != self.shapes

    def bound(self, shapes: dict) -> None:
        self.shapes, self.eager_calls, self.graph_ready = dict(shapes), 0, False

    def unbound(self) -> None:
        self.shapes, self.eager_calls, self.graph_ready = None, 0, False

    def action(self) -> str:
        if self.shapes is None:
            raise RuntimeError("no input shapes are bound")
        if self.graph_ready:
            return "replay"
        if self.cuda_graph and self.capture_failed is None and self.eager_calls >= self.warmup:
            return "capture"
        return "eager"

    def ran_eager(self) -> None:
        self.eager_calls += 1

    def captured(self) -> None:
        self.graph_ready = True

    def memory_moved(self) -> None:
        """The context's device memory moved (a shared block grew): a graph captured on the old block is dropped."""
        self.eager_calls, self.graph_ready = 0, False

    def failed_capture(self, why: str) -> None:
        if self.capture_failed is None:
            log.warning("CUDA graph capture failed, running eagerly from now on: %s", why)
        self.capture_failed, self.graph_ready = why, False


class SharedDeviceMemory:
    """One device-memory block for engines that never run at the same time (the K timestep-group engines of a
    ``groups=K`` recipe): each context uses it for its activations instead of holding its own, so K engines cost
    the memory of the largest. It grows to the largest need; ``version`` tells runners when it moved."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.version = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def ensure(self, nbytes: int) -> tuple[int, int]:
        """(address, version) of a block of at least ``nbytes`` (torch allocations are 512-byte aligned)."""
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device="cuda")
            self.version += 1
        return self.buffer.data_ptr(), self.version


def rtx_supports(trt, compute_capability: tuple[int, int]) -> tuple[bool, list[str]]:
    """(whether this TensorRT-RTX targets the GPU, the compute capabilities it targets)."""
    known = sorted(c for c in dir(trt.ComputeCapability) if c.startswith("SM"))
    return f"SM{compute_capability[0]}{compute_capability[1]}" in known, known


class TrtRunner(Runner):
    """A TensorRT or TensorRT-RTX engine (``engines/X.plan`` + its sidecar) on one CUDA stream.

    The sidecar is checked first: an engine built by another TensorRT version, for another GPU, or whose plan
    file is not the one built is refused with both sides named. Inputs and outputs live in static torch CUDA
    buffers bound once per shape; each call copies the feed in, runs ``execute_async_v3`` and returns a copy of
    the output. ``cuda_graph``: full TensorRT captures the enqueue into a torch CUDA graph after ``warmup`` eager
    calls (checking ``is_stream_capturable`` first) and replays it; TensorRT-RTX uses its own whole-graph
    capture. ``eager_kernels`` (RTX): specialise dynamic-shape kernels when the context is made, not lazily
    (use it for tests and benchmarks, so that no call runs a generic fallback kernel).
    """

    def __init__(self, plan, *, cuda_graph: bool = False, warmup: int = 1, name: str | None = None,
                 eager_kernels: bool = False, runtime_cache: bool = True,
                 shared_memory: SharedDeviceMemory | None = None) -> None:
        super().__init__()
        self.shared_memory = shared_memory
        self._mem_version: int | None = None
        self.plan = str(plan)
        self.cuda_graph = cuda_graph
        self.eager_kernels = eager_kernels
        self.runtime_cache = runtime_cache
        self.state = BindingState(cuda_graph, warmup)
        self.name = name or ("tensorrt-graph" if cuda_graph else "tensorrt")
        self.device = torch.device("cuda")
        self.engine = self.context = self.stream = None
        self._rt_cache = None

    @property
    def cache_path(self) -> Path:
        return Path(f"{self.plan}.rtcache")

    def activate(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"{self.name}: a TensorRT engine needs a CUDA GPU; none is visible to torch")
        trt, fl = trt_module(Sidecar.load(self.plan).flavour)
        self._trt, self._flavour = trt, fl
        self.sidecar = self._check_gpu()
        torch.zeros(1, device="cuda")  # a current CUDA context: RTX's runtime cache checks the environment against it
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self._deserialize()
        if fl.jit_runtime:
            self.context = self.engine.create_execution_context(self._runtime_config())
        elif self.shared_memory is not None:
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.plan}: could not create an execution context (out of GPU memory, or the "
                              "kernels failed to compile; see the TensorRT log above)")
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        if OUTPUT_NAME not in self._outputs:
            raise EngineError(f"{self.plan}: engine outputs {self._outputs}, expected {OUTPUT_NAME!r}")
        self._signature = Signature(tuple(
            TensorSpec(n, self._dtype(self.engine.get_tensor_dtype(n)),
                       tuple(d if d >= 0 else "dynamic" for d in self.engine.get_tensor_shape(n)),
                       n not in ("sample", "timestep"))
            for n in self._inputs))
        self.state.unbound()
        self._buffers: dict[str, torch.Tensor] = {}
        self._graph = None
        self._mem_version = None
        if self.shared_memory is not None:  # grow the block now, so the first calls of every runner see its size
            self.shared_memory.ensure(self.device_memory_bytes)

    def _check_gpu(self) -> Sidecar:
        """The plan's sidecar, checked against this runtime and GPU: a GPU outside the flavour's compute-capability
        targets is refused first (naming full TensorRT); an engine built on another GPU model of the same compute
        capability is only warned about."""
        trt, fl = self._trt, self._flavour
        cc = torch.cuda.get_device_capability()
        gpu = torch.cuda.get_device_name()
        if fl.compute_targets:
            ok, known = rtx_supports(trt, cc)
            if not ok:
                raise EngineError(f"{self.plan}: {fl.title} {trt.__version__} does not run on this GPU ({gpu}, "
                                  f"SM{cc[0]}{cc[1]}); it targets {', '.join(known)}. On this GPU build and run the "
                                  "engine with full TensorRT 10/11 (`trt-dm build --flavour tensorrt`)")
        sidecar = check_sidecar(self.plan, flavour=fl, trt_version=trt.__version__,
                                compute_capability=f"{cc[0]}.{cc[1]}")
        if not fl.compute_targets and sidecar.gpu and sidecar.gpu != gpu:
            log.warning("%s was built on %s, this GPU is %s (same compute capability): TensorRT engines are tuned "
                        "for the GPU model they were built on; rebuild for best speed", self.plan, sidecar.gpu, gpu)
        return sidecar

    def _deserialize(self):
        """The engine of the plan file; EngineError (with TensorRT-RTX's validity diagnostics) when it does not load."""
        blob = Path(self.plan).read_bytes()
        engine = self.runtime.deserialize_cuda_engine(blob)
        if engine is None:
            why = ""
            if hasattr(self.runtime, "get_engine_validity"):  # TensorRT-RTX says why a plan does not load
                validity, diagnostics = self.runtime.get_engine_validity(blob)
                why = f" (engine validity {validity}: {diagnostics})"
            raise EngineError(f"{self.plan}: {self._flavour.name} {self._trt.__version__} could not deserialize the "
                              f"engine{why}")
        return engine

    def _attach_memory(self) -> None:
        """Point a user-managed context at the shared block (again, when it moved)."""
        if self.shared_memory is None:
            return
        ptr, version = self.shared_memory.ensure(self.device_memory_bytes)
        if version != self._mem_version:
            self.context.set_device_memory(ptr, self.shared_memory.nbytes)
            self._mem_version, self._graph = version, None
            self.state.memory_moved()

    def _runtime_config(self):
        """TensorRT-RTX's runtime config: kernel specialisation, its own CUDA graphs, the runtime cache."""
        trt = self._trt
        cfg = self.engine.create_runtime_config()
        S = trt.DynamicShapesKernelSpecializationStrategy
        cfg.dynamic_shapes_kernel_specialization_strategy = S.EAGER if self.eager_kernels else S.LAZY
        if self.cuda_graph:
            cfg.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if self.shared_memory is not None:
            cfg.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.runtime_cache:
            self._rt_cache = cfg.create_runtime_cache()
            if self.cache_path.is_file() and not self._rt_cache.deserialize(self.cache_path.read_bytes()):
                log.info("%s: runtime cache %s is from another GPU / driver / version; recompiling", self.plan,
                         self.cache_path)
            cfg.set_runtime_cache(self._rt_cache)
        return cfg

    def _dtype(self, dt) -> torch.dtype:
        D = self._trt.DataType
        table = {D.FLOAT: torch.float32, D.HALF: torch.float16, D.INT32: torch.int32, D.INT64: torch.int64,
                 D.INT8: torch.int8, D.BOOL: torch.bool, D.BF16: torch.bfloat16}
        if dt not in table:
            raise TypeError(f"engine tensor type {dt} has no torch equivalent here")
        return table[dt]

    def deactivate(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        if self._rt_cache is not None:  # keep the JIT-compiled kernels for the next activation
            try:
                atomic_write(self.cache_path, memoryview(self._rt_cache.serialize()).tobytes())
            except OSError as e:
                log.warning("%s: could not save the runtime cache %s: %s", self.plan, self.cache_path, e)
        self._graph, self._buffers, self._rt_cache = None, {}, None
        self.state.unbound()
        self.context = self.engine = self.runtime = None

    @property
    def signature(self) -> Signature:
        if self.engine is None:
            raise RuntimeError(f"{self.name} is not active: use it as `with runner:`")
        return self._signature

    @property
    def device_memory_bytes(self) -> int:
        """Device memory the engine's context uses for activations (beyond torch's allocator)."""
        eng = self.engine
        return int(getattr(eng, "device_memory_size_v2", getattr(eng, "device_memory_size", 0)) or 0)

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """(Re)allocate static buffers for these input shapes and bind every tensor address."""
        self.stream.synchronize()
        self._graph = None
        self._buffers = {}
        self.state.unbound()  # a refused shape leaves nothing bound: the next call rebinds
        for n in self._inputs:
            if not self.context.set_input_shape(n, shapes[n]):
                raise ValueError(f"{self.name}: input {n!r} shape {shapes[n]} is outside the engine's "
                                 f"optimization profile {self.sidecar.inputs.get(n)}")
            self._buffers[n] = torch.empty(shapes[n], dtype=self._signature[n].dtype, device=self.device)
        for n in self._outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            self._buffers[n] = torch.empty(shape, dtype=self._dtype(self.engine.get_tensor_dtype(n)), device=self.device)
        for n, buf in self._buffers.items():
            self.context.set_tensor_address(n, buf.data_ptr())
        self.state.bound(shapes)

    @torch.no_grad()
    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(feed[n].shape) for n in self._inputs}
        if self.state.needs_bind(shapes):
            self._bind(shapes)
        self._attach_memory()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for n in self._inputs:
                self._buffers[n].copy_(feed[n], non_blocking=True)
            # TensorRT-RTX captures its own graphs (runtime config): every call is an enqueue for us
            action = "eager" if self._flavour.jit_runtime else self.state.action()
            if action == "replay":
                self._graph.replay()
            elif action == "capture" and self._capture():
                self._graph.replay()
            else:
                self._enqueue()
                self.state.ran_eager()
            out = self._buffers[OUTPUT_NAME].float().clone()
        torch.cuda.current_stream().wait_stream(self.stream)
        return {OUTPUT_NAME: out}

    def _capture(self) -> bool:
        """Capture the enqueue as a torch CUDA graph; on failure say why once and stay eager."""
        if not self.context.is_stream_capturable(self.stream.cuda_stream):
            self.state.failed_capture("the execution context reports the stream is not capturable")
            return False
        graph = torch.cuda.CUDAGraph()
        try:
            # thread-local mode: other threads' CUDA calls do not break (or get broken by) this capture
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._enqueue()
        except RuntimeError as e:
            self.state.failed_capture(str(e).splitlines()[0])
            return False
        self._graph = graph
        self.state.captured()
        return True

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log above)")
