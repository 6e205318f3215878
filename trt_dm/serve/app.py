"""`trt-dm serve`: an HTTP sampler service over the step scheduler (FastAPI; run by uvicorn).

    POST /v1/generate   {"n", "steps", "sampler", "eta", "seed", "class_labels" | "classes" | "prompt",
                         "negative_prompt", "guidance_scale", "guidance_rescale", "output": "png" | "json"}
                        -> a PNG grid, or base64 PNGs in JSON
    GET  /v1/models     what is served: model, runner, recipe / engine sidecar, signature
    GET  /health/live   the process answers;  GET /health/ready  ready after a warm-up UNet call
    GET  /metrics       Prometheus text: requests by status, latency and queue-time histograms, queue depth,
                        in-flight images, UNet calls, UNet rows per call, images generated

One thread runs the scheduler (``Service``); request handlers submit to it and wait. Backpressure: at most
``max_queue`` images waiting (then 429 with Retry-After); a request that takes longer than ``timeout_s`` is
cancelled (504); a client that disconnects has its images dropped at the next tick; a runner error fails the
requests in that call (500) and the service goes on. Validation
errors are 422 naming the field and what is accepted; unknown fields are refused. Security defaults: the CLI
listens on 127.0.0.1 unless told otherwise; an optional API key (``Authorization: Bearer`` or ``X-API-Key``,
compared in constant time; 401 without it); request bodies over ``max_body`` bytes are refused (413); no
request field names a file on the server.
"""
# (no `from __future__ import annotations`: FastAPI reads the request model from the handler annotation at runtime)

import asyncio
import base64
import hmac
import io
import logging
import math
import re
import sys
import threading
import time
from typing import Literal

import torch

from ..core.guidance import Guidance
from .scheduler import Handle, Request, StepScheduler

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class Service:
    """The scheduler on its own thread, with the metrics the app exports."""

    def __init__(self, loaded, denoiser, *, max_rows: int = 64, max_queue: int = 256, describe: dict | None = None,
                 registry=None, policy: str = "step") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from ..core.schedule import Schedule
        self.loaded, self.denoiser, self.describe = loaded, denoiser, describe or {}
        self.max_queue = max_queue
        self.scheduler = StepScheduler(self._timed, Schedule.from_config(loaded.scheduler_config), loaded.sample_shape,
                                       max_rows=max_rows, device=getattr(denoiser, "device", "cpu"), policy=policy)
        self.lock = threading.Condition()
        self.running = False
        self.ready = False
        self.thread: threading.Thread | None = None
        self._handles: list[Handle] = []
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.m_requests = Counter("trt_dm_requests", "Generate requests by final status", ["status"], registry=r)
        self.m_latency = Histogram("trt_dm_request_latency_seconds", "Time from submission to the last image",
                                   registry=r)
        self.m_queue_time = Histogram("trt_dm_queue_time_seconds", "Time from submission to the first UNet call",
                                      registry=r)
        self.m_queue = Gauge("trt_dm_queue_depth", "Images waiting for admission", registry=r)
        self.m_flight = Gauge("trt_dm_in_flight_images", "Images being denoised", registry=r)
        self.m_calls = Counter("trt_dm_unet_calls", "UNet calls", registry=r)
        self.m_rows = Histogram("trt_dm_unet_batch_rows", "Rows per UNet call", registry=r,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.m_images = Counter("trt_dm_images_generated", "Images generated", registry=r)

    def _timed(self, x, t, **cond):
        out = self.denoiser(x, t, **cond)
        self.m_calls.inc()
        self.m_rows.observe(len(t))
        return out

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="trt-dm-scheduler", daemon=True)
        self.thread.start()

    def warmup(self) -> None:
        """One real UNet call through the scheduler; the service is ready after it."""
        if self.loaded.text_conditioned:
            cond = self.loaded.conditioning_for(1, prompts=[""])
        else:
            cond = self.loaded.conditioning_for(1, "all" if self.loaded.class_labels_spec is not None else None)
        h = self.submit(Request(n=1, steps=1, conditioning=cond))
        h.event.wait()
        if h.error:
            raise RuntimeError(f"warm-up call failed: {h.error}")
        self.ready = True

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop admitting; with ``drain``, finish what is queued or in flight first."""
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

    def _loop(self) -> None:
        """Tick while there is work. The UNet call runs without the lock, so submissions (the HTTP handlers)
        never wait for it; bookkeeping and metrics are done under the lock."""
        while True:
            with self.lock:
                while self.running and self.scheduler.idle:
                    self.lock.wait(0.5)
                if not self.running:
                    return
            self.scheduler.tick()
            now = time.perf_counter()
            with self.lock:
                done = [h for h in self._handles if h.done]
                self._handles = [h for h in self._handles if not h.done]
                self.m_queue.set(self.scheduler.queued)
                self.m_flight.set(self.scheduler.in_flight)
            for h in done:
                if h.first_call is not None:
                    self.m_queue_time.observe(h.first_call - h.submitted)
                if h.error is None and not h.cancelled:
                    self.m_images.inc(h.request.n)
                    self.m_latency.observe(now - h.submitted)
                h.event.set()
                for callback in list(h.callbacks):
                    callback()

    def submit(self, request: Request) -> Handle:
        with self.lock:
            if not self.running:
                raise QueueFull("the service is stopping")
            queued = self.scheduler.queued
            if queued + request.n > self.max_queue:
                raise QueueFull(f"queue full ({queued} images waiting, limit {self.max_queue})")
            h = self.scheduler.submit(request)
            self._handles.append(h)
            self.m_queue.set(queued + request.n)
            self.lock.notify_all()
            return h


def _png(images: torch.Tensor) -> bytes:
    from ..images import make_grid
    buf = io.BytesIO()
    make_grid(images).save(buf, format="PNG")
    return buf.getvalue()


def _as_request_error(msg: str, fields) -> tuple[str, str]:
    """A conditioning error worded for the CLI (``--class-labels L [L ...]``) -> (the request field it is about,
    the message in the request's own field names: ``"class_labels"``). A flag that names no request field is
    dropped where it is one of a list of alternatives (``--prompt / --prompts FILE``: files are not accepted here)
    and kept elsewhere."""
    named = []

    def alternative(m: re.Match) -> str:
        return m.group(0) if m.group(1).replace("-", "_") in fields else ""

    msg = re.sub(r"(?:,\s*|\s*/\s*|\s+or\s+)--([a-z][a-z-]*)(?:\s+[A-Z][A-Za-z._]*)?", alternative, msg)

    def field(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        if name not in fields:
            return m.group(0)
        named.append(name)
        return f'"{name}"'

    msg = re.sub(r"--([a-z][a-z-]*)", field, msg)
    if named:
        return named[0], msg
    return ("guidance_scale" if "guidance" in msg else "prompt" if "prompt" in msg or "text" in msg
            else "class_labels"), msg


def create_app(service: Service, *, api_key: str | None = None, max_body: int = 64 * 1024, max_n: int = 64,
               max_steps: int = 1000, timeout_s: float = 300.0, warmup: bool = True, replica: str | None = None):
    """The FastAPI app over a (not yet started) ``Service``; its lifespan starts, warms up and drains it.
    ``replica`` (Ray Serve) names the replica in an ``X-TRT-DM-Replica`` header on every response and in
    /v1/models."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request as HttpRequest
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    loaded = service.loaded
    T = service.scheduler.schedule.num_train_timesteps

    class Generate(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int = Field(1, ge=1, le=max_n)
        steps: int = Field(50, ge=1, le=min(max_steps, T))
        sampler: Literal["ddim", "ddpm"] = "ddim"
        eta: float = Field(0.0, ge=0.0, le=1.0)
        seed: int = Field(0, ge=0, lt=2 ** 63)
        class_labels: list[int] | None = Field(None, min_length=1, max_length=max_n)
        classes: Literal["all"] | None = None
        prompt: str | list[str] | None = Field(None, description="text-to-image pipelines: prompt(s), cycled")
        negative_prompt: str = Field("", max_length=2000)
        guidance_scale: float = Field(7.5 if loaded.text_conditioned else 1.0, ge=1.0, le=50.0)
        guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
        output: Literal["png", "json"] = "png"

        @field_validator("prompt")
        @classmethod
        def prompts(cls, v):
            items = [v] if isinstance(v, str) else v
            if items is not None and (not items or len(items) > max_n or any(len(p) > 2000 for p in items)):
                raise ValueError(f"1..{max_n} prompts of at most 2000 characters each")
            return v

        @field_validator("guidance_scale", "guidance_rescale", "eta")
        @classmethod
        def finite(cls, v: float) -> float:
            if not math.isfinite(v):
                raise ValueError("must be a finite number")
            return v

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        if warmup:
            await asyncio.to_thread(service.warmup)
        else:
            service.ready = True
        yield
        await asyncio.to_thread(service.stop, True)  # SIGTERM: stop admitting, finish what is in flight
        print(f"trt-dm serve: stopped after draining; {service.scheduler.calls} UNet calls served", file=sys.stderr,
              flush=True)

    app = FastAPI(title="trt_dm sampler service", lifespan=lifespan)

    class Guard:
        """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the handlers):
        body-size limit (413; a POST must say its Content-Length, else 411) and the API key on /v1/ (401)."""

        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                size = headers.get("content-length")
                refusal = None
                if scope["method"] == "POST" and size is None:
                    refusal = (411, "a POST needs a Content-Length header")
                elif size is not None and (not size.isdigit() or int(size) > max_body):
                    refusal = (413, f"request body over {max_body} bytes")
                elif api_key is not None and scope["path"].startswith("/v1/"):
                    auth = headers.get("authorization", "")
                    given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
                    if not hmac.compare_digest(given.encode(), api_key.encode()):
                        refusal = (401, "missing or wrong API key")
                if refusal is not None:
                    return await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
                if replica is not None:
                    send = self._tagged(send)
            return await self.inner(scope, receive, send)

        @staticmethod
        def _tagged(send):
            async def tagged(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-trt-dm-replica", replica.encode("latin-1"))]}
                await send(message)
            return tagged

    app.add_middleware(Guard)

    def fail(status: int, detail, label: str, headers=None):
        service.m_requests.labels(label).inc()
        raise HTTPException(status_code=status, detail=detail, headers=headers)

    @app.post("/v1/generate")
    async def generate(body: Generate, http: HttpRequest):
        labels = tuple(body.class_labels) if body.class_labels is not None else body.classes
        if body.class_labels is not None and body.classes is not None:
            fail(422, [{"loc": ["body", "classes"], "msg": "give class_labels or classes, not both"}], "invalid")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        try:
            cond = await asyncio.to_thread(loaded.conditioning_for, body.n, labels, prompts=prompts)  # text: encodes
            guidance = await asyncio.to_thread(loaded.guidance, body.guidance_scale, body.guidance_rescale,
                                               negative_prompt=body.negative_prompt)
        except ValueError as e:
            field, msg = _as_request_error(str(e), Generate.model_fields)
            fail(422, [{"loc": ["body", field], "msg": msg}], "invalid")
        try:
            h = service.submit(Request(n=body.n, sampler=body.sampler, steps=body.steps, eta=body.eta, seed=body.seed,
                                       conditioning=cond, guidance=guidance if guidance.active else Guidance()))
        except QueueFull as e:
            fail(429, str(e), "rejected", headers={"Retry-After": "1"})
        loop, woken = asyncio.get_running_loop(), asyncio.Event()
        h.callbacks.append(lambda: loop.call_soon_threadsafe(woken.set))
        if h.event.is_set():
            woken.set()
        deadline = time.monotonic() + timeout_s
        while not h.event.is_set():  # woken when it ends; every 0.25 s: has the client gone, is time up?
            try:
                await asyncio.wait_for(woken.wait(), timeout=0.25)
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:  # the server cancelled the handler (Ray Serve: the client went away)
                h.cancel()
                service.m_requests.labels("disconnected").inc()
                raise
            if h.event.is_set():
                break
            if await http.is_disconnected():  # a client that went away frees its rows at the next tick
                h.cancel()
                service.m_requests.labels("disconnected").inc()
                return Response(status_code=499)
            if time.monotonic() > deadline:
                h.cancel()
                fail(504, f"not finished within {timeout_s:g} s; cancelled", "timeout")
        if h.error is not None:
            fail(500, f"the UNet call failed: {h.error}", "error")
        service.m_requests.labels("ok").inc()
        images = await asyncio.to_thread(loaded.decode, h.images) if loaded.text is not None else h.images  # VAE
        if body.output == "png":
            return Response(_png(images), media_type="image/png")
        return {"seeds": [body.seed + i for i in range(body.n)],
                "images": [base64.b64encode(_png(images[i:i + 1])).decode() for i in range(body.n)]}

    @app.get("/v1/models")
    async def models():
        return {"model": loaded.name, "kind": loaded.kind, "fingerprint": loaded.fingerprint(),
                "batching": service.scheduler.policy,
                "schedule_fingerprint": loaded.schedule_fingerprint(), "signature": loaded.signature.to_dict(),
                "null_class_label": loaded.null_class_label, "num_classes": loaded.num_classes,
                "text_pipeline": loaded.text.describe() if loaded.text is not None else None,
                "max_rows": service.scheduler.max_rows, "replica": replica, **service.describe}

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if not service.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    return app
