"""Runners: one small interface over every way to evaluate the UNet (Polygraphy's shape).

    with TorchRunner(unet) as r:
        out = r.infer({"sample": x, "timestep": t})["out_sample"]

``as_denoiser(runner)`` turns a runner into the callable the samplers take, so a sampler cannot tell
torch FP, torch fake-quant, ONNX Runtime or TensorRT apart. Inputs and outputs are torch tensors;
a runner casts to the precision it computes in and returns float32.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "class_labels")
OUTPUT_NAME = "out_sample"


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]  # -1 marks a dynamic dimension (batch, sequence length)


class Runner(ABC):
    """Base class: ``activate``/``deactivate`` allocate and free; ``infer`` maps input dict -> output dict."""

    name: str = "runner"

    def __init__(self) -> None:
        self.is_active = False

    def __enter__(self) -> "Runner":
        if not self.is_active:
            self.activate()
            self.is_active = True
        return self

    def __exit__(self, *exc) -> None:
        if self.is_active:
            self.deactivate()
            self.is_active = False

    def activate(self) -> None:  # allocate sessions, engines, buffers
        pass

    def deactivate(self) -> None:  # free them
        pass

    @property
    @abstractmethod
    def input_metadata(self) -> dict[str, TensorMeta]: ...

    @abstractmethod
    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def _check_feed(self, feed: dict[str, torch.Tensor]) -> None:
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active: use it as `with runner:` before infer()")
        meta = self.input_metadata
        missing = [k for k in meta if k not in feed]
        extra = [k for k in feed if k not in meta]
        if missing or extra:
            raise ValueError(f"{self.name}: inputs {sorted(feed)} do not match the model's "
                             f"{sorted(meta)} (missing {missing}, unexpected {extra})")
        for k, m in meta.items():
            shape = tuple(feed[k].shape)
            if len(shape) != len(m.shape) or any(e not in (-1, s) for e, s in zip(m.shape, shape)):
                raise ValueError(f"{self.name}: input {k!r} has shape {shape}, expected {m.shape} "
                                 f"(-1 = any)")


class TorchRunner(Runner):
    """A torch ``nn.Module`` UNet (FP or fake-quant). Default precision: fp32 on CPU, fp16 on CUDA."""

    def __init__(self, unet: torch.nn.Module, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, name: str = "torch") -> None:
        super().__init__()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("fp16 on CPU is not supported by TorchRunner; use float32 (or bfloat16)")
        self.unet = unet
        self.name = f"{name}-{self.device.type}-{str(self.dtype).removeprefix('torch.')}"
        cfg = getattr(unet, "config", {})
        c, h = cfg.get("in_channels", -1), cfg.get("sample_size", -1)
        h, w = (h, h) if isinstance(h, int) else tuple(h)
        meta = {"sample": TensorMeta(torch.float32, (-1, c, h, w)),
                "timestep": TensorMeta(torch.int64, (-1,))}
        if cfg.get("cross_attention_dim") is not None and type(unet).__name__ == "UNet2DConditionModel":
            meta["encoder_hidden_states"] = TensorMeta(torch.float32, (-1, -1, cfg["cross_attention_dim"]))
        if cfg.get("num_class_embeds") is not None:
            meta["class_labels"] = TensorMeta(torch.int64, (-1,))
        self._meta = meta

    @property
    def input_metadata(self) -> dict[str, TensorMeta]:
        return self._meta

    def activate(self) -> None:
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast even when nothing must stay fp32
        torch.nn.Module.to(self.unet, self.device, self.dtype).eval()

    @torch.no_grad()
    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_feed(feed)
        kwargs = {}
        for k, v in feed.items():
            v = v.to(self.device)
            kwargs[k] = v.to(self.dtype) if v.is_floating_point() else v
        x = kwargs.pop("sample")
        t = kwargs.pop("timestep")
        out = self.unet(x, t, **kwargs).sample
        return {OUTPUT_NAME: out.float()}


def as_denoiser(runner: Runner):
    """The sampler-facing callable ``denoiser(x, t, **extra) -> model_output`` over an active runner."""

    def denoiser(x: torch.Tensor, t: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        out = runner.infer({"sample": x, "timestep": t, **extra})[OUTPUT_NAME]
        return out.to(x.device, x.dtype)

    denoiser.runner = runner  # type: ignore[attr-defined]
    return denoiser


class OrtRunner(Runner):
    """An ONNX model in ONNX Runtime (CPU; CUDA provider when present and asked for)."""

    _DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
               "tensor(int32)": torch.int32}

    def __init__(self, path, *, providers: list[str] | None = None, threads: int | None = None,
                 name: str = "onnxruntime") -> None:
        super().__init__()
        import onnxruntime as ort
        self.path = str(path)
        self.providers = providers or ["CPUExecutionProvider"]
        unknown = [p for p in self.providers if p not in ort.get_available_providers()]
        if unknown:
            raise ValueError(f"ONNX Runtime providers {unknown} are not available here; available: "
                             f"{ort.get_available_providers()}")
        self.threads = threads
        self.name = name
        self.device = torch.device("cpu")
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(self.path, opts, providers=self.providers)
        self._meta = {i.name: TensorMeta(self._DTYPES.get(i.type, torch.float32),
                                         tuple(d if isinstance(d, int) else -1 for d in i.shape))
                      for i in self.session.get_inputs()}

    def deactivate(self) -> None:
        self.session = None

    @property
    def input_metadata(self) -> dict[str, TensorMeta]:
        if self.session is None:
            raise RuntimeError(f"{self.name} is not active: use it as `with runner:`")
        return self._meta

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_feed(feed)
        arrays = {k: feed[k].detach().cpu().to(self._meta[k].dtype).numpy() for k in self._meta}
        out = self.session.run([OUTPUT_NAME], arrays)[0]
        return {OUTPUT_NAME: torch.from_numpy(out).float()}


class TrtRunner(Runner):
    """A TensorRT or TensorRT-RTX engine (``engines/X.plan`` + its sidecar) on one CUDA stream.

    The sidecar is checked first: an engine built by another TensorRT version, for another GPU, or whose
    plan file is not the one built is refused with both sides named. Inputs and outputs live in static
    torch CUDA buffers bound once per shape; each call copies the feed in, runs ``execute_async_v3`` and
    returns a copy of the output. With ``cuda_graph=True`` the enqueue is captured into a CUDA graph after
    ``warmup`` eager calls and replayed; a new shape reallocates the buffers and drops the graph, so a graph
    never replays against freed or moved memory.
    """

    def __init__(self, plan, *, cuda_graph: bool = False, warmup: int = 1, name: str | None = None) -> None:
        super().__init__()
        self.plan = str(plan)
        self.cuda_graph = cuda_graph
        self.warmup = warmup
        self.name = name or ("tensorrt-graph" if cuda_graph else "tensorrt")
        self.device = torch.device("cuda")
        self.engine = self.context = self.stream = None

    def activate(self) -> None:
        from pathlib import Path

        from .engine import EngineError, check_sidecar, load_sidecar, trt_module
        if not torch.cuda.is_available():
            raise RuntimeError(f"{self.name}: a TensorRT engine needs a CUDA GPU; none is visible to torch")
        trt, flavour = trt_module(load_sidecar(self.plan)["flavour"])
        major, minor = torch.cuda.get_device_capability()
        self.sidecar = check_sidecar(self.plan, flavour=flavour, trt_version=trt.__version__,
                                     compute_capability=f"{major}.{minor}")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(self.plan).read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.plan}: {flavour} {trt.__version__} could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        if OUTPUT_NAME not in self._outputs:
            raise EngineError(f"{self.plan}: engine outputs {self._outputs}, expected {OUTPUT_NAME!r}")
        self._meta = {n: TensorMeta(self._dtype(self.engine.get_tensor_dtype(n)), tuple(self.engine.get_tensor_shape(n)))
                      for n in self._inputs}
        self._shapes: dict | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._graph = None
        self._eager_calls = 0

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
        self._graph = None
        self._buffers = {}
        self.context = self.engine = self.runtime = None

    @property
    def input_metadata(self) -> dict[str, TensorMeta]:
        if self.engine is None:
            raise RuntimeError(f"{self.name} is not active: use it as `with runner:`")
        return self._meta

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """(Re)allocate static buffers for these input shapes and bind every tensor address."""
        self.stream.synchronize()
        self._graph, self._eager_calls = None, 0
        self._buffers = {}
        for n in self._inputs:
            if not self.context.set_input_shape(n, shapes[n]):
                raise ValueError(f"{self.name}: input {n!r} shape {shapes[n]} is outside the engine's "
                                 f"optimization profile {self.sidecar.get('inputs', {}).get(n)}")
            self._buffers[n] = torch.empty(shapes[n], dtype=self._meta[n].dtype, device=self.device)
        for n in self._outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            self._buffers[n] = torch.empty(shape, dtype=self._dtype(self.engine.get_tensor_dtype(n)), device=self.device)
        for n, buf in self._buffers.items():
            self.context.set_tensor_address(n, buf.data_ptr())
        self._shapes = shapes

    @torch.no_grad()
    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_feed(feed)
        shapes = {n: tuple(feed[n].shape) for n in self._inputs}
        if shapes != self._shapes:
            self._bind(shapes)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for n in self._inputs:
                self._buffers[n].copy_(feed[n], non_blocking=True)
            if self._graph is not None:
                self._graph.replay()
            elif self.cuda_graph and self._eager_calls >= self.warmup:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._enqueue()
                self._graph = graph
                graph.replay()
            else:
                self._enqueue()
                self._eager_calls += 1
            out = self._buffers[OUTPUT_NAME].float().clone()
        torch.cuda.current_stream().wait_stream(self.stream)
        return {OUTPUT_NAME: out}

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log above)")


def switched_denoiser(denoisers: list, t_ranges: list[tuple[int, int]]):
    """One denoiser over K (runners for K timestep groups, groups=K recipes): each call goes to the group
    whose [t_min, t_max] contains t, else the nearest one. ``t_ranges`` holds (t_max, t_min) per group."""
    if len(denoisers) != len(t_ranges) or not denoisers:
        raise ValueError(f"{len(denoisers)} denoisers for {len(t_ranges)} timestep groups")

    def denoiser(x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        return denoisers[group_of(t, t_ranges)](x, t, **extra)

    return denoiser


def group_of(t: torch.Tensor, t_ranges: list[tuple[int, int]]) -> int:
    """Index of the (t_max, t_min) group holding the batch's timestep (one timestep per batch), else the nearest."""
    t0 = int(t.flatten()[0])
    if not bool((t == t0).all()):
        raise ValueError("timestep groups need one timestep per batch")
    return min(range(len(t_ranges)), key=lambda i: max(t_ranges[i][1] - t0, t0 - t_ranges[i][0], 0))
