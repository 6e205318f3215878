"""The service engine: the step scheduler on its own thread, with backpressure, warm-up and Prometheus metrics.

``Service`` owns every thread, lock and event of serving: front ends (``trt_dm.serve.http``, Ray Serve replicas)
turn what a client asks (``Generation``) into a scheduler ``Request`` (``Service.prepare``: conditioning, text
encoding, guidance; typed ``InputError`` naming the request field on bad input), submit it (``Service.submit``:
``QueueFull`` beyond ``max_queue`` waiting images), wait for its ``Job`` to end, and take its images
(``Service.images``: a latent pipeline's VAE decodes them; ``png`` encodes). The scheduler itself
(``trt_dm.serve.scheduler``) stays plain data and arithmetic.
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from trt_dm.core.errors import InputError
from trt_dm.core.guidance import Guidance
from trt_dm.core.images import make_grid
from trt_dm.serve.scheduler import Handle, Request, StepScheduler

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """A request the service does not queue now: too many images waiting (HTTP 429), or it is stopping (503).
    ``retry_after``: seconds until it would fit, from the measured admission rate (None: the service is stopping)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


ADMISSION_WINDOW_S = 30.0  # the admission rate behind Retry-After is measured over this many recent seconds


@dataclass(frozen=True)
class Generation:
    """What a client asks for, independent of any transport: the fields of ``POST /v1/generate`` but ``output``."""
    n: int = 1
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    class_labels: Sequence[int] | None = None
    classes: str | None = None
    prompt: str | Sequence[str] | None = None
    negative_prompt: str = ""
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    guidance_interval: Sequence[int] | None = None  # None: the model's default


class Job:
    """A request submitted to the service: its scheduler ``handle`` and the wake-up of whoever waits for it
    (``ended`` is set, then the ``on_end`` callbacks run, on the scheduler thread)."""

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.ended = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def error(self) -> str | None:
        return self.handle.error

    def cancel(self) -> None:
        """Free the job's rows at the next tick (a client that went away, a request over its time)."""
        self.handle.cancel()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the job has ended (at once, here, if it has already)."""
        with self._lock:
            if not self.ended.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def _end(self) -> None:
        with self._lock:
            self.ended.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a waiter that is gone (its event loop closed) must not stop the scheduler thread
                log.warning("a waiter's wake-up failed", exc_info=True)


class Metrics:
    """The service's Prometheus metrics in their own registry (their names are part of the service's interface)."""

    def __init__(self, registry=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("trt_dm_requests", "Generate requests by final status", ["status"], registry=r)
        self.latency = Histogram("trt_dm_request_latency_seconds", "Time from submission to the last image",
                                 registry=r)
        self.queue_time = Histogram("trt_dm_queue_time_seconds", "Time from submission to the first UNet call",
                                    registry=r)
        self.queue = Gauge("trt_dm_queue_depth", "Images waiting for admission", registry=r)
        self.flight = Gauge("trt_dm_in_flight_images", "Images being denoised", registry=r)
        self.calls = Counter("trt_dm_unet_calls", "UNet calls", registry=r)
        self.rows = Histogram("trt_dm_unet_batch_rows", "Rows per UNet call", registry=r,
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.call_time = Histogram("trt_dm_unet_call_seconds", "Duration of each UNet call (the runner busy)",
                                   registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.images = Counter("trt_dm_images_generated", "Images generated", registry=r)

    def ended(self, handle: Handle, now: float) -> None:
        """Record a request that has ended (served, failed or cancelled)."""
        if handle.first_call is not None:
            self.queue_time.observe(handle.first_call - handle.submitted)
        if handle.error is None and not handle.cancelled:
            self.images.inc(handle.request.n)
            self.latency.observe(now - handle.submitted)


class Service:
    """The step scheduler on its own thread: submission with backpressure, warm-up, drain, metrics.

    ``loaded``: the model (a ``LoadedModel``: conditioning, guidance, VAE decode, schedule); ``denoiser``: its
    runner. ``max_rows``: rows per UNet call; ``max_queue``: images allowed to wait; ``describe``: what /v1/models
    adds about the runner and recipe; ``policy``: the scheduler's batching policy."""

    def __init__(self, loaded, denoiser, *, max_rows: int = 64, max_queue: int = 256, describe: dict | None = None,
                 registry=None, policy: str = "step") -> None:
        self.loaded, self.denoiser, self.describe = loaded, denoiser, describe or {}
        self.max_queue = max_queue
        self.metrics = Metrics(registry)
        self.scheduler = StepScheduler(self._timed, loaded.schedule(), loaded.sample_shape,
                                       max_rows=max_rows, device=getattr(denoiser, "device", "cpu"), policy=policy)
        self.lock = threading.Condition()
        self.running = False
        self.ready = False
        self.thread: threading.Thread | None = None
        self._jobs: list[Job] = []
        self._admissions: deque[tuple[float, int]] = deque()  # (time, images admitted so far) after each tick

    @property
    def registry(self):
        """The Prometheus registry of the service's metrics (what /metrics exports)."""
        return self.metrics.registry

    def count(self, status: str) -> None:
        """Count a generate request by its final status ("ok", "invalid", "rejected", "timeout", "error", ...)."""
        self.metrics.requests.labels(status).inc()

    def _timed(self, x, t, **cond):
        t0 = time.perf_counter()
        out = self.denoiser(x, t, **cond)
        self.metrics.call_time.observe(time.perf_counter() - t0)
        self.metrics.calls.inc()
        self.metrics.rows.observe(len(t))
        return out

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler thread (the service admits requests from now on)."""
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="trt-dm-scheduler", daemon=True)
        self.thread.start()

    def warmup(self) -> None:
        """One real UNet call through the scheduler; the service is ready after it."""
        if self.loaded.text_conditioned:
            cond = self.loaded.conditioning_for(1, prompts=[""])
        else:
            cond = self.loaded.conditioning_for(1, "all" if self.loaded.class_labels_spec is not None else None)
        job = self.submit(Request(n=1, steps=1, conditioning=cond))
        job.ended.wait()
        if job.error:
            raise RuntimeError(f"warm-up call failed: {job.error}")
        self.ready = True

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop admitting; with ``drain``, finish what is queued or in flight first (at most ``timeout`` s)."""
        self.ready = False
        deadline = time.monotonic() + timeout
        while drain and time.monotonic() < deadline:
            with self.lock:
                if self.scheduler.idle:
                    break
            time.sleep(0.01)
        with self.lock:
            self.running = False
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=5)
        log.info("stopped%s; %d UNet calls served", " after draining" if drain else "", self.scheduler.calls)

    def _loop(self) -> None:
        """Tick while there is work. The UNet call runs without the lock, so submissions (the HTTP handlers)
        never wait for it; bookkeeping and metrics are done under the lock, wake-ups after it."""
        while True:
            with self.lock:
                while self.running and self.scheduler.idle:
                    self.lock.wait(0.5)
                if not self.running:
                    return
            self.scheduler.tick()
            now = time.perf_counter()
            with self.lock:
                self._admissions.append((time.monotonic(), self.scheduler.admitted))
                while self._admissions and self._admissions[0][0] < time.monotonic() - ADMISSION_WINDOW_S:
                    self._admissions.popleft()
                ended = [j for j in self._jobs if j.handle.done]
                self._jobs = [j for j in self._jobs if not j.handle.done]
                self.metrics.queue.set(self.scheduler.queued)
                self.metrics.flight.set(self.scheduler.in_flight)
            for job in ended:
                self.metrics.ended(job.handle, now)
                job._end()

    # ---- requests -----------------------------------------------------------------------------------------------
    def prepare(self, g: Generation) -> Request:
        """The scheduler request of ``g``: its conditioning (a text model encodes the prompts here) and guidance.
        Raises ``InputError`` naming the request field for input the model cannot take."""
        if g.class_labels is not None and g.classes is not None:
            raise InputError("give class_labels or classes, not both", field="classes")
        labels = tuple(g.class_labels) if g.class_labels is not None else g.classes
        prompts = [g.prompt] if isinstance(g.prompt, str) else g.prompt
        cond = self.loaded.conditioning_for(g.n, labels, prompts=prompts, guidance_scale=g.guidance_scale)
        guidance = self.loaded.guidance(g.guidance_scale, g.guidance_rescale, negative_prompt=g.negative_prompt,
                                        interval=g.guidance_interval)
        try:
            self.scheduler.schedule.check_sampler(g.sampler, g.eta)
        except ValueError as e:
            raise InputError(f"sampler {e}", field="sampler", request_message=f'"sampler": {e}') from None
        return Request(n=g.n, sampler=g.sampler, steps=g.steps, eta=g.eta, seed=g.seed, conditioning=cond,
                       guidance=guidance if guidance.active else Guidance())

    def submit(self, request: Request) -> Job:
        """Queue ``request``; ``InputError`` (field ``n``) for one that can never be queued (more images than
        ``max_queue``), ``QueueFull`` with a Retry-After when the service is stopping or the queue is full now."""
        if request.n > self.max_queue:
            why = (f"{request.n} images can never be queued here: the service holds at most {self.max_queue} waiting "
                   f"images (--max-queue); send at most {self.max_queue} per request")
            raise InputError(f"n {why}", field="n", request_message=f'"n" {why}')
        with self.lock:
            if not self.running:
                raise QueueFull("the service is stopping")
            queued = self.scheduler.queued
            if queued + request.n > self.max_queue:
                wait = self.retry_after(queued + request.n - self.max_queue)
                raise QueueFull(f"queue full ({queued} images waiting, limit {self.max_queue}); retry in {wait} s",
                                wait)
            job = Job(self.scheduler.submit(request))
            self._jobs.append(job)
            self.metrics.queue.set(queued + request.n)
            self.lock.notify_all()
            return job

    def retry_after(self, excess: int) -> int:
        """Seconds until ``excess`` more waiting images have been admitted, at the admission rate of the last
        ``ADMISSION_WINDOW_S`` seconds (1 s until a rate has been measured; at most 600 s). Call under the lock."""
        if len(self._admissions) >= 2:
            (t0, a0), (t1, a1) = self._admissions[0], self._admissions[-1]
            if a1 > a0 and t1 > t0:
                return max(1, min(600, math.ceil(excess / ((a1 - a0) / (t1 - t0)))))
        return 1

    def images(self, job: Job) -> torch.Tensor:
        """The images of a job served: (n, C, H, W) in the model's range (a latent pipeline's VAE decodes here)."""
        return self.loaded.decode(job.handle.images)

    def model_info(self, replica: str | None = None) -> dict:
        """What is served: model, fingerprints, signature, conditioning, batching, the replica (Ray Serve) and the
        runner's description."""
        loaded = self.loaded
        return {"model": loaded.name, "kind": loaded.kind, "fingerprint": loaded.fingerprint(),
                "batching": self.scheduler.policy,
                "schedule_fingerprint": loaded.schedule_fingerprint(), "signature": loaded.signature.to_dict(),
                "null_class_label": loaded.null_class_label, "num_classes": loaded.num_classes,
                "guidance_interval": list(loaded.guidance_interval) if loaded.guidance_interval else None,
                "text_pipeline": loaded.text.describe() if loaded.text is not None else None,
                "vae": loaded.vae.describe() if loaded.vae is not None else None,
                "max_rows": self.scheduler.max_rows, "replica": replica, **self.describe}


def png(images: torch.Tensor) -> bytes:
    """Images (N, C, H, W) in [-1, 1] -> one PNG of their grid (``trt_dm.core.images.make_grid``)."""
    buf = io.BytesIO()
    make_grid(images).save(buf, format="PNG")
    return buf.getvalue()
