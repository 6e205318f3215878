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

from trt_dm.core.ranges import group_index, split_by_group
from trt_dm.core.signature import OUTPUT_NAME, Signature

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


def as_denoiser(runner: Runner):
    """The sampler-facing callable ``denoiser(x, t, **extra) -> model_output`` over an active runner."""

    def denoiser(x: torch.Tensor, t: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        out = runner.infer({"sample": x, "timestep": t, **extra})[OUTPUT_NAME]
        return out.to(x.device, x.dtype)

    denoiser.runner = runner  # type: ignore[attr-defined]
    return denoiser


def switched_denoiser(denoisers: list, t_ranges: list[tuple[int, int]]):
    """One denoiser over K runners of a ``groups=K`` recipe (``t_ranges``: (t_max, t_min) per group): each row
    goes to the group whose [t_min, t_max] holds its timestep, else the nearest one. A batch whose rows all
    belong to one group is one call; rows of several groups are split, called per group and put back in order."""
    if len(denoisers) != len(t_ranges) or not denoisers:
        raise ValueError(f"{len(denoisers)} denoisers for {len(t_ranges)} timestep groups")

    def denoiser(x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        return split_by_group(x, t, extra, group_index(t, t_ranges), lambda k, *a, **kw: denoisers[k](*a, **kw))

    return denoiser


class SwitchedRunner(Runner):
    """K runners of a ``groups=K`` deployment (one graph / engine per timestep group) as one runner: each row goes
    to its group's runner through ``switched_denoiser`` (a batch of one group is one call, unsplit). Entering it
    activates all K; its signature is the first runner's."""

    def __init__(self, runners: list[Runner], t_ranges: list[tuple[int, int]], name: str | None = None) -> None:
        super().__init__()
        if len(runners) != len(t_ranges) or not runners:
            raise ValueError(f"{len(runners)} runners for {len(t_ranges)} timestep groups")
        self.runners, self.t_ranges = list(runners), [tuple(r) for r in t_ranges]
        self.name = name or f"{runners[0].name}-x{len(runners)}"
        self.device = runners[0].device
        self._switched = switched_denoiser([as_denoiser(r) for r in self.runners], self.t_ranges)

    def activate(self) -> None:
        entered = []
        try:
            for r in self.runners:
                r.__enter__()
                entered.append(r)
        except BaseException:  # one that cannot start: the ones started are freed again
            for r in entered:
                r.__exit__(None, None, None)
            raise

    def deactivate(self) -> None:
        for r in self.runners:
            r.__exit__(None, None, None)

    @property
    def signature(self) -> Signature:
        return self.runners[0].signature

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        extra = {k: v for k, v in feed.items() if k not in ("sample", "timestep")}
        return {OUTPUT_NAME: self._switched(feed["sample"], feed["timestep"], **extra)}
