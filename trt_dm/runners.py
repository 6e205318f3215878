"""Runners: one small interface over every way to evaluate the UNet (Polygraphy's runner shape).

    with TorchRunner(unet) as r:
        out = r.infer({"sample": x, "timestep": t})["out_sample"]

``Runner.infer`` is a template method: it checks that the runner is active and that the feed fits the
runner's input ``signature`` (``trt_dm.core.signature``), then calls the subclass's ``infer_impl``, so no
backend can forget the checks. ``as_denoiser(runner)`` turns a runner into the callable the samplers take,
so a sampler cannot tell torch FP, torch fake-quant, ONNX Runtime, OpenVINO or TensorRT apart; ``switched_denoiser``
puts K runners of a ``groups=K`` recipe behind one callable, splitting a batch by each row's timestep.
Inputs and outputs are torch tensors; a runner casts to the precision it computes in and returns float32.

This is the runtime: it imports only ``trt_dm.core`` (never the engine builder, the exporters or modelopt),
so a process that only runs engines or graphs does not load them.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch

from .core.artifacts import group_index, split_by_group  # noqa: F401
from .core.signature import OUTPUT_NAME, Signature, TensorSpec

log = logging.getLogger(__name__)


class Runner(ABC):
    """Base class: ``activate``/``deactivate`` allocate and free; ``infer`` maps input dict -> output dict."""

    name: str = "runner"
    device: torch.device = torch.device("cpu")

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
    def signature(self) -> Signature:
        """The inputs this runner takes (available once active for file-backed runners)."""

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check the feed against ``signature``, then run ``infer_impl``."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active: use it as `with runner:` before infer()")
        self.signature.check(feed, self.name)
        return self.infer_impl(feed)

    @abstractmethod
    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


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
        self._signature = Signature.from_unet(unet)

    @property
    def signature(self) -> Signature:
        return self._signature

    def activate(self) -> None:
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast even when nothing must stay fp32
        torch.nn.Module.to(self.unet, self.device, self.dtype).eval()

    @torch.no_grad()
    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    """An ONNX model in ONNX Runtime (CPU; CUDA provider when present and asked for).

    ``spin``: ONNX Runtime's worker threads busy-wait for the next work item after each call (its default: the
    fastest for calls back to back, as in sampling). False lets them sleep, for a process that does other work
    between calls: `trt-dm serve`, whose HTTP and PNG work the spinning threads otherwise slow (BENCHMARKS.md)."""

    _DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
               "tensor(int32)": torch.int32}

    def __init__(self, path, *, providers: list[str] | None = None, threads: int | None = None,
                 name: str = "onnxruntime", spin: bool = True) -> None:
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
        self.spin = spin
        self.device = torch.device("cpu")
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not self.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.path, opts, providers=self.providers)
        unknown = [i for i in self.session.get_inputs() if i.type not in self._DTYPES]
        if unknown:
            raise ValueError(f"{self.path}: inputs {[(i.name, i.type) for i in unknown]} have types this runner "
                             f"does not feed; accepted: {sorted(self._DTYPES)}")
        self._signature = Signature(tuple(
            TensorSpec(i.name, self._DTYPES[i.type], tuple(d if isinstance(d, int) else (d or "dynamic") for d in i.shape),
                       i.name not in ("sample", "timestep"))
            for i in self.session.get_inputs()))

    def deactivate(self) -> None:
        self.session = None

    @property
    def signature(self) -> Signature:
        if self.session is None:
            raise RuntimeError(f"{self.name} is not active: use it as `with runner:`")
        return self._signature

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {s.name: feed[s.name].detach().cpu().to(s.dtype).numpy() for s in self._signature.inputs}
        out = self.session.run([OUTPUT_NAME], arrays)[0]
        return {OUTPUT_NAME: torch.from_numpy(out).float()}


def __getattr__(name: str):
    # TrtRunner lives in trt_runner.py (its CUDA calls and bookkeeping); importing it lazily keeps this module light
    if name in ("TrtRunner", "BindingState"):
        from . import trt_runner
        return getattr(trt_runner, name)
    if name == "OpenVinoRunner":  # ov_runner.py imports OpenVINO only when a runner is activated
        from . import ov_runner
        return ov_runner.OpenVinoRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def switched_denoiser(denoisers: list, t_ranges: list[tuple[int, int]]):
    """One denoiser over K runners of a ``groups=K`` recipe (``t_ranges``: (t_max, t_min) per group): each row
    goes to the group whose [t_min, t_max] holds its timestep, else the nearest one. A batch whose rows all
    belong to one group is one call; rows of several groups are split, called per group and put back in order."""
    if len(denoisers) != len(t_ranges) or not denoisers:
        raise ValueError(f"{len(denoisers)} denoisers for {len(t_ranges)} timestep groups")

    def denoiser(x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        return split_by_group(x, t, extra, group_index(t, t_ranges), lambda k, *a, **kw: denoisers[k](*a, **kw))

    return denoiser
