"""Step-level batching: every tick, ONE UNet call over images of any in-flight requests, each at its own step.

A UNet call does not care which request or timestep each row belongs to (the timestep input is per row), so
the scheduler batches *steps*, not requests: each tick it takes up to ``max_rows`` rows from the images in
flight (oldest request first; a guided image takes two rows, its conditional and its null row, the null row
left out of the call at steps outside the image's guidance interval), runs the
denoiser once, advances every image with its own sampler step (``trt_dm.core.schedule``: per-row timesteps, the
image's own generator for the noise), retires finished images and admits new ones into the freed rows.

An image served equals the image ``trt-dm sample`` draws for the same seed, label and settings: the same noise
draws in the same order from the image's own generator, the same step arithmetic; only the other rows of a
UNet call differ, which moves float rounding (~1e-6, times the guidance scale). A runner error fails the
requests with an image in that call (``Handle.error``) and the scheduler goes on. Plain data and arithmetic, no
threads, locks or events, independent of HTTP: the service engine (``trt_dm.serve.engine``) drives ``tick`` from
its own thread and tells waiters when a request has ended.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from trt_dm.core.guidance import Guidance, combine
from trt_dm.core.schedule import (
    Schedule,
    make_generators,
    randn_per_sample,
    sampler_rule,
)

log = logging.getLogger(__name__)
# "step": continuous step-level batching (the service's); "request": whole requests batched as they arrive, a new
# batch only when the previous one is finished; "none": one request at a time. The last two are benchmark baselines.
POLICIES = ("step", "request", "none")


@dataclass(frozen=True)
class Request:
    """One generation request: ``n`` images, image i with seed ``seed + i`` and its conditioning row i."""
    n: int = 1
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    seed: int = 0
    conditioning: dict = field(default_factory=dict)  # {input: (n, ...)}; {} for unconditional models
    guidance: Guidance = field(default_factory=Guidance)

    def __post_init__(self) -> None:
        sampler_rule(self.sampler)  # an unknown sampler is refused, naming the accepted ones
        if self.n < 1 or self.steps < 1 or not self.eta >= 0:
            raise ValueError(f"need n >= 1, steps >= 1, eta >= 0; got n={self.n}, steps={self.steps}, eta={self.eta}")
        bad = {k: tuple(v.shape) for k, v in self.conditioning.items() if v.shape[0] != self.n}
        if bad:
            raise ValueError(f"conditioning rows {bad} do not match n={self.n}")


class Handle:
    """A submitted request's state in the scheduler: ``done``, ``images`` (n, C, H, W) float32 CPU when done, or
    ``error``; its timings (``submitted``, ``first_call``, ``finished``: ``time.perf_counter`` seconds)."""

    def __init__(self, rid: int, request: Request, shape) -> None:
        self.id, self.request = rid, request
        self.images = torch.empty((request.n, *shape), dtype=torch.float32)
        self.remaining = request.n
        self.error: str | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.finished: float | None = None
        self.first_call: float | None = None  # when its first image joined a UNet call (set by the scheduler)

    @property
    def done(self) -> bool:
        return self.remaining == 0 or self.error is not None or self.cancelled

    def cancel(self) -> None:
        """Free this request's rows at the next tick (a client that went away)."""
        self.cancelled = True


class _Image:
    """One image in flight: its request, sample, own generator, timesteps and position."""

    def __init__(self, handle: Handle, index: int, schedule: Schedule, shape) -> None:
        r = handle.request
        self.handle, self.index = handle, index
        (self.gen,) = make_generators([r.seed + index])
        self.x = randn_per_sample([self.gen], shape)[0]  # x_T, as the sampling loops draw it
        self.ts = schedule.timesteps(r.steps)
        self.prev = schedule.prev_timesteps(r.sampler, self.ts)
        self.i = 0
        self.cond = {k: v[index] for k, v in r.conditioning.items()}

    @property
    def rows(self) -> int:
        return self.handle.request.guidance.calls_per_image


class StepScheduler:
    """Continuous step-level batching over one denoiser (``denoiser(x, t, **conditioning) -> model output``).

    ``max_rows``: the most rows of one UNet call (the engine's max batch). ``shape``: (C, H, W) of an image.
    """

    def __init__(self, denoiser: Callable, schedule: Schedule, shape, *, max_rows: int = 64,
                 device: torch.device | str = "cpu", policy: str = "step") -> None:
        if max_rows < 2:
            raise ValueError(f"max_rows must be >= 2 (a guided image takes 2 rows), got {max_rows}")
        if policy not in POLICIES:
            raise ValueError(f"unknown batching policy {policy!r}; accepted: {POLICIES}")
        self.policy = policy
        self.denoiser, self.schedule, self.shape = denoiser, schedule, tuple(shape)
        self.max_rows, self.device = max_rows, torch.device(device)
        self._ids = itertools.count()
        self._waiting: deque[tuple[Handle, int]] = deque()  # (request, next image index) not yet admitted
        self._flight: list[_Image] = []
        self.calls = 0
        self.admitted = 0  # images admitted so far (the service's Retry-After measures its rate)
        self.rows_per_call: deque[int] = deque(maxlen=10_000)  # the latest calls' sizes (bounded: servers run long)

    # ---- submission ------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        """Queue ``request`` (admitted at a later tick, first come, first served); its handle."""
        handle = Handle(next(self._ids), request, self.shape)
        self._waiting.append((handle, 0))
        return handle

    @property
    def in_flight(self) -> int:
        """Images being denoised."""
        return len(self._flight)

    @property
    def queued(self) -> int:
        """Images waiting for admission."""
        return sum(h.request.n - i for h, i in self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing in flight."""
        return not self._flight and not self._waiting

    # ---- one tick --------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Fill free rows first come, first served: images in flight keep their rows until done, and the oldest
        waiting request's next image comes first, so no request waits behind later ones. Policies "request" and
        "none" (the baselines of the serving benchmark) admit only into an empty batch: waiting requests as they
        fit (whole-request batching, as Triton-style servers do), or one request at a time."""
        self._flight = [im for im in self._flight if not im.handle.done]
        while self._waiting and (self._waiting[0][0].done):
            self._waiting.popleft()
        if self.policy != "step" and self._flight:
            return
        first = self._waiting[0][0] if self._waiting else None
        used = sum(im.rows for im in self._flight)
        while self._waiting:
            handle, i = self._waiting[0]
            if self.policy == "none" and handle is not first:
                break
            need = handle.request.guidance.calls_per_image
            if used + need > self.max_rows:
                break
            self._flight.append(_Image(handle, i, self.schedule, self.shape))
            self.admitted += 1
            used += need
            if i + 1 < handle.request.n:
                self._waiting[0] = (handle, i + 1)
            else:
                self._waiting.popleft()

    def tick(self) -> int:
        """Admit, run one UNet call over every image in flight, advance each; returns the rows of the call."""
        self._admit()
        batch = list(self._flight)
        if not batch:
            return 0
        now = time.perf_counter()
        for im in batch:
            if im.handle.first_call is None:
                im.handle.first_call = now
        x = torch.stack([im.x for im in batch]).to(self.device)
        t = torch.tensor([im.ts[im.i] for im in batch], dtype=self.schedule.time_dtype)
        guided = [k for k, im in enumerate(batch)  # guided at this step (a guidance interval leaves some out)
                  if im.rows == 2 and bool(im.handle.request.guidance.applies(t[k:k + 1]))]
        names = sorted({n for im in batch for n in im.cond})
        rows_x = torch.cat([x, x[guided]]) if guided else x
        rows_t = torch.cat([t, t[guided]]) if guided else t
        cond = {}
        for n in names:  # conditional rows for every image, then the null rows of the guided ones
            null = [batch[k].handle.request.guidance.null[n][0] for k in guided]
            cond[n] = torch.stack([im.cond[n] for im in batch] + null)
        try:
            out = self.denoiser(rows_x, rows_t.to(self.device), **cond).to(x.dtype)
        except Exception as e:  # fail the requests in this call only; the scheduler goes on
            why = f"{type(e).__name__}: {e}"
            log.error("UNet call failed (%d rows): %s", len(rows_t), why)
            for im in batch:
                im.handle.error = im.handle.error or why
            self._flight = []
            return len(rows_t)
        self.calls += 1
        self.rows_per_call.append(len(rows_t))
        b = len(batch)
        eps = out[:b].clone()
        for j, k in enumerate(guided):  # per image: its own guidance scale and rescale
            g = batch[k].handle.request.guidance
            eps[k] = combine(torch.stack([out[k], out[b + j]]), g.scale, g.rescale)[0]
        self._step(batch, x, t, eps)
        return len(rows_t)

    def _step(self, batch: list[_Image], x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> None:
        """Advance each image by its own sampler, grouped by (sampler, eta); noise from each image's generator."""
        groups: dict[tuple, list[int]] = {}
        for k, im in enumerate(batch):
            groups.setdefault((im.handle.request.sampler, im.handle.request.eta), []).append(k)
        for (sampler, eta), ks in groups.items():
            idx = torch.tensor(ks)
            tt = t[idx]
            prev = torch.tensor([batch[k].prev[batch[k].i] for k in ks], dtype=self.schedule.time_dtype)
            rule = sampler_rule(sampler)
            noisy = {k for k in ks if rule.draws_noise(batch[k].ts[batch[k].i], eta)}
            noise = None
            if noisy:  # rows without noise get zeros (ignored by the step); draws only from the noisy images
                noise = torch.zeros((len(ks), *self.shape), dtype=x.dtype)
                for j, k in enumerate(ks):
                    if k in noisy:
                        noise[j] = randn_per_sample([batch[k].gen], self.shape)[0]
            xs, outs = x[idx.to(x.device)], out[idx.to(out.device)]
            res = rule.run(self.schedule, outs, xs, tt, prev, noise, eta)
            for j, k in enumerate(ks):
                im = batch[k]
                im.x = res.prev_sample[j].float().cpu()
                im.i += 1
                if im.i == len(im.ts):
                    h = im.handle
                    h.images[im.index] = im.x
                    h.remaining -= 1
                    if h.remaining == 0:
                        h.finished = time.perf_counter()
        self._flight = [im for im in self._flight if im.i < len(im.ts)]

    def run_until_idle(self, max_ticks: int = 1_000_000) -> int:
        """Tick until nothing is waiting or in flight; returns the ticks run."""
        ticks = 0
        while not self.idle and ticks < max_ticks:
            self.tick()
            ticks += 1
        return ticks
