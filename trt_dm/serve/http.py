"""`trt-dm serve`: the HTTP front of the service engine (FastAPI; run by uvicorn or Ray Serve).

    POST /v1/generate   {"n", "steps", "sampler", "eta", "seed", "class_labels" | "classes" | "prompt",
                         "negative_prompt", "guidance_scale", "guidance_rescale",
                         "guidance_interval", "output": "png" | "json"}
                        -> a PNG grid, or base64 PNGs in JSON
    GET  /v1/models     what is served: model, runner, recipe / engine sidecar, signature
    GET  /health/live   the process answers;  GET /health/ready  ready after a warm-up UNet call
    GET  /metrics       Prometheus text: requests by status, latency and queue-time histograms, queue depth,
                        in-flight images, UNet calls, UNet rows per call, images generated

This module only translates HTTP to calls of the engine (``trt_dm.serve.engine.Service``: the scheduler thread,
backpressure, warm-up, metrics) and back. Backpressure: at most ``max_queue`` images waiting (then 429 with a
Retry-After from the measured admission rate; a request for more images than ``max_queue`` can never be queued:
422 naming "n"; 503 while stopping); a request that takes longer than ``timeout_s`` is cancelled (504); a client
that disconnects has its images dropped at the next tick; a runner error fails the requests in that call (500) and
the service goes on.
Validation errors are 422 naming the request field and what is accepted (the engine's ``InputError`` carries the
field and the message in the request's own names); unknown fields are refused. Security defaults: the CLI listens
on 127.0.0.1 unless told otherwise; an optional API key (``Authorization: Bearer`` or ``X-API-Key``, compared in
constant time; 401 without it); request bodies over ``max_body`` bytes are refused (413); no request field names a
file on the server.
"""
# (no `from __future__ import annotations`: FastAPI reads the request model from the handler annotation at runtime)

import asyncio
import base64
import hmac
import math
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal, NoReturn

from trt_dm.core.errors import InputError
from trt_dm.serve.engine import Generation, Job, QueueFull, Service, png


def create_app(service: Service, *, api_key: str | None = None, max_body: int = 64 * 1024, max_n: int = 64,
               max_steps: int = 1000, timeout_s: float = 300.0, warmup: bool = True, replica: str | None = None):
    """The FastAPI app over a (not yet started) ``Service``; its lifespan starts, warms up and drains it.
    ``replica`` (Ray Serve) names the replica in an ``X-TRT-DM-Replica`` header on every response and in
    /v1/models."""
    from fastapi import FastAPI

    app = FastAPI(title="trt_dm sampler service", lifespan=lifespan(service, warmup))
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, replica=replica)
    add_validation_errors(app, service)
    add_generate(app, service, request_model(service, max_n=max_n, max_steps=max_steps), timeout_s)
    add_info(app, service, replica)
    return app


def request_model(service: Service, *, max_n: int, max_steps: int):
    """The schema of a POST /v1/generate body for this service: limits from its settings and the model's schedule,
    guidance 7.5 by default for a text-conditional model (else 1); unknown fields are refused."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    T = service.scheduler.schedule.num_train_timesteps
    default_scale = 7.5 if service.loaded.text_conditioned else 1.0

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
        guidance_scale: float = Field(default_scale, ge=1.0, le=50.0)
        guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
        guidance_interval: list[Annotated[int, Field(ge=0, le=T - 1)]] | None = Field(
            None, min_length=2, max_length=2,
            description="[LO, HI]: guidance applies at timesteps LO <= t <= HI (default: the model's, "
                        f"{list(service.loaded.guidance_interval or (0, T - 1))})")
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

    return Generate


def add_validation_errors(app, service: Service) -> None:
    """422 for a body the schema refuses, as FastAPI's items (type, loc, msg) without the offending input: Python's
    JSON reader accepts NaN, Infinity and 1e400, which FastAPI's default body would echo and then fail to encode
    (500). Counted as invalid."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        service.count("invalid")
        items = [{"type": str(e.get("type", "value_error")), "loc": [p if isinstance(p, int) else str(p)
                                                                      for p in e.get("loc", ())],
                  "msg": str(e.get("msg", "invalid"))} for e in exc.errors()]
        return JSONResponse({"detail": items}, status_code=422)


def lifespan(service: Service, warmup: bool):
    """The app's lifespan: start the service (ready after a warm-up UNet call, or at once without ``warmup``);
    at shutdown (SIGTERM) stop admitting and finish what is in flight."""

    @asynccontextmanager
    async def run(app):
        service.start()
        if warmup:
            await asyncio.to_thread(service.warmup)
        else:
            service.ready = True
        yield
        await asyncio.to_thread(service.stop, True)

    return run


class Guard:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the handlers):
    body-size limit (413; a POST must say its Content-Length, else 411), the API key on /v1/ (401), and with
    ``replica`` an ``X-TRT-DM-Replica`` header on every response."""

    def __init__(self, app, *, api_key: str | None, max_body: int, replica: str | None = None) -> None:
        self.app, self.api_key, self.max_body, self.replica = app, api_key, max_body, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                from fastapi.responses import JSONResponse
                return await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            if self.replica is not None:
                send = self._tagged(send)
        return await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, detail) of a request refused before it reaches a handler, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        size = headers.get("content-length")
        if scope["method"] == "POST" and size is None:
            return 411, "a POST needs a Content-Length header"
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return 413, f"request body over {self.max_body} bytes"
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return 401, "missing or wrong API key"
        return None

    def _tagged(self, send):
        tag = (b"x-trt-dm-replica", self.replica.encode("latin-1"))

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), tag]}
            await send(message)
        return tagged


def add_generate(app, service: Service, Generate, timeout_s: float) -> None:
    """POST /v1/generate: the body (``Generate``, from ``request_model``) to the engine, its images back."""
    from fastapi import Request as HttpRequest
    from fastapi.responses import Response

    @app.post("/v1/generate")
    async def generate(body: Generate, http: HttpRequest):
        job = await _submit(service, body)
        if not await _wait(service, job, http, timeout_s):
            return Response(status_code=499)  # the client went away
        if job.error is not None:
            _refuse(service, 500, f"the UNet call failed: {job.error}", "error")
        service.count("ok")
        images = await asyncio.to_thread(service.images, job)  # a latent pipeline's VAE decodes
        return _answer(body.output, body.seed, images)


async def _submit(service: Service, body) -> Job:
    """The body's request prepared (off the event loop: a text model encodes prompts) and submitted; 422 naming
    the request field for input the model cannot take or a request that can never be queued, 429 (Retry-After) when
    the queue is full now, 503 while the service stops."""
    generation = Generation(**body.model_dump(exclude={"output"}))
    try:
        request = await asyncio.to_thread(service.prepare, generation)
    except InputError as e:
        _refuse(service, 422, _invalid(e), "invalid")
    try:
        return service.submit(request)
    except InputError as e:  # can never be queued here (more images than the queue holds)
        _refuse(service, 422, _invalid(e), "invalid")
    except QueueFull as e:
        _refuse(service, 429 if e.retry_after else 503, str(e), "rejected",
                headers={"Retry-After": str(e.retry_after or 1)})


def _invalid(e: InputError) -> list[dict]:
    """A 422 body's ``detail`` for an ``InputError``: FastAPI's validation-error items (type, loc, msg)."""
    return [{"type": "value_error", "loc": ["body", e.field], "msg": e.request_message}]


async def _wait(service: Service, job: Job, http, timeout_s: float) -> bool:
    """Wait until ``job`` ends (True); False for a client that went away (its rows are freed at the next tick).
    A job not ended within ``timeout_s`` is cancelled (504)."""
    loop, woken = asyncio.get_running_loop(), asyncio.Event()
    job.on_end(lambda: loop.call_soon_threadsafe(woken.set))
    deadline = time.monotonic() + timeout_s
    while not job.ended.is_set():  # woken when it ends; every 0.25 s: has the client gone, is time up?
        try:
            await asyncio.wait_for(woken.wait(), timeout=0.25)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:  # the server cancelled the handler (Ray Serve: the client went away)
            job.cancel()
            service.count("disconnected")
            raise
        if job.ended.is_set():
            break
        if await http.is_disconnected():
            job.cancel()
            service.count("disconnected")
            return False
        if time.monotonic() > deadline:
            job.cancel()
            _refuse(service, 504, f"not finished within {timeout_s:g} s; cancelled", "timeout")
    return True


def _answer(output: str, seed: int, images):
    """The response of served images: one PNG grid ("png"), or JSON with the seeds and a base64 PNG each."""
    from fastapi.responses import Response

    if output == "png":
        return Response(png(images), media_type="image/png")
    return {"seeds": [seed + i for i in range(len(images))],
            "images": [base64.b64encode(png(images[i:i + 1])).decode() for i in range(len(images))]}


def _refuse(service: Service, status: int, detail, label: str, headers=None) -> NoReturn:
    """Count the request under ``label`` and answer ``status`` with ``detail``."""
    from fastapi import HTTPException

    service.count(label)
    raise HTTPException(status_code=status, detail=detail, headers=headers)


def add_info(app, service: Service, replica: str | None) -> None:
    """GET /v1/models, /health/live, /health/ready and /metrics."""
    from fastapi.responses import JSONResponse, Response

    @app.get("/v1/models")
    async def models():
        return service.model_info(replica)

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
