"""The torch runners: a UNet module (FP or fake-quant) as a runner, its CUDA-graph variant for profiling, and
``unet_denoiser``, the one way a torch UNet becomes a denoiser callable (the runners call it too)."""
from __future__ import annotations

from typing import Callable

import torch

from trt_dm.core.signature import OUTPUT_NAME, Signature
from trt_dm.runtime.base import Runner


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
        self._call = unet_denoiser(unet)

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
            # a flow model's float time input stays fp32, as diffusers' pipelines pass it
            kwargs[k] = v.to(self.dtype) if v.is_floating_point() and k != "timestep" else v
        x = kwargs.pop("sample")
        t = kwargs.pop("timestep")
        return {OUTPUT_NAME: self._call(x, t, **kwargs)}


class CudaGraphTorchRunner(TorchRunner):
    """torch fp16 on CUDA, the UNet call captured once per input shape as a CUDA graph and replayed."""

    def __init__(self, unet, **kw) -> None:
        super().__init__(unet, device="cuda", dtype=torch.float16, name="torch-graph")
        self._graphs: dict = {}

    @torch.no_grad()
    def infer_impl(self, feed):
        key = tuple((k, tuple(v.shape)) for k, v in sorted(feed.items()))
        if key not in self._graphs:
            static = {k: (v.to("cuda", torch.float16) if v.is_floating_point() and k != "timestep"
                          else v.to("cuda")).clone()
                      for k, v in feed.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph requires
                self.unet(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.unet(**static).sample
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for k, v in feed.items():
            static[k].copy_(v)
        graph.replay()
        return {OUTPUT_NAME: out.float().clone()}


def unet_denoiser(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """A diffusers UNet module (FP or fake-quant) as a denoiser, computed as the module is (device, dtype)."""

    @torch.no_grad()
    def denoiser(x: torch.Tensor, t: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return unet(x, t, **extra).sample.float()

    return denoiser
