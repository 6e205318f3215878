"""`trt-dm serve`: the HTTP front of the service engine (FastAPI; run by uvicorn or Ray Serve).

    POST /v1/generate   {"n", "steps", "sampler", "eta", "seed", "class_labels" | "classes" | "prompt",
                         "negative_prompt", "guidance_scale", "guidance_rescale",
                         "guidance_interval", "output": "png" | "json"}
                        -> a PNG grid, or base64 PNGs in JSON
    GET  /v1/models     what is served: model, runner, recipe / engine sidecar, signature
    GET  /health/live   the process answers;  GET /health/ready  ready after a warm-up UNet call
    GET  /metrics       Prometheus text: requests by status, latency and queue-time histograms, queue depth,
                        in-flight images, UNet calls, UNet rows per call, images generated
    GET  /openapi.json  the contract: the body schema of THIS model and service (its class range, prompt or labels,
                        guidance fields only where it can be guided, the limits), every response with its media type,
                        body and headers (Retry-After, X-TRT-DM-Replica); Schemathesis checks it in the test suite

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
    errors = error_responses(api_key is not None, replica)
    add_generate(app, service, request_model(service, max_n=max_n, max_steps=max_steps), timeout_s, errors)
    add_info(app, service, replica, errors)
    return app


def request_model(service: Service, *, max_n: int, max_steps: int):
    """The schema of a POST /v1/generate body for this service's model, as strict as what the service accepts (the
    OpenAPI document is a contract: a body it calls valid is served): limits from the service's settings and the
    model's schedule; class labels in the model's range, ``class_labels`` or ``classes`` (one of them) for a
    class-conditional model, ``prompt`` for a text model, guidance fields only where the model can be guided
    (7.5 by default for a text model, else 1); JSON types exactly (no "4" for 4, no true for 1); unknown fields
    refused. ``guidance_interval`` takes its two timesteps in either order."""
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

    # JSON Schema's integer is any number with no fractional part (2.0 too); strict otherwise (no "2", no true)
    whole = BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)

    def Int(lo: int, hi: int):  # noqa: N802 (a type)
        return Annotated[int, Field(ge=lo, le=hi), whole]

    loaded = service.loaded
    T = service.scheduler.schedule.num_train_timesteps
    default_scale = 7.5 if loaded.text_conditioned else 1.0
    most = max(1, min(max_n, service.max_queue))
    labels = loaded.class_labels_spec
    n_labels = None if labels is None else (loaded.num_classes or labels.num_values)
    try:
        guidable = loaded.guidance(2.0).active
    except ValueError:
        guidable = False
    fields: dict = {}
    if n_labels is not None:
        # optional but never null (absent is the default): the schema says so, and one of the two is required
        fields["class_labels"] = (list[Int(0, n_labels - 1)],
                                  Field(None, min_length=1, max_length=most))
        fields["classes"] = (Literal["all"], None)
    if loaded.text_conditioned:
        text = Annotated[str, Field(max_length=2000)]
        fields["prompt"] = (text | Annotated[list[text], Field(min_length=1, max_length=most)],
                            Field(None, description="prompt(s), cycled over the images (required)"))
        fields["negative_prompt"] = (str, Field("", max_length=2000))
    if guidable:
        fields["guidance_scale"] = (float, Field(default_scale, ge=1.0, le=50.0))
        fields["guidance_rescale"] = (float, Field(0.0, ge=0.0, le=1.0))
        fields["guidance_interval"] = (list[Int(0, T - 1)], Field(
            None, min_length=2, max_length=2,
            description="two timesteps, in either order: guidance applies at LO <= t <= HI (default: the model's, "
                        f"{list(loaded.guidance_interval or (0, T - 1))})"))
    # required in the document; missing, the service's own check answers 422 naming the field (as the CLI does)
    one_of = {"oneOf": [{"required": ["class_labels"]}, {"required": ["classes"]}]} if n_labels is not None else {}
    if loaded.text_conditioned:
        one_of = {"required": ["prompt"]}

    samplers = Literal[tuple(loaded.schedule().samplers)]  # ddim, ddpm; a flow-matching model: ddim, euler

    class Base(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=one_of)
        n: Int(1, most) = 1
        steps: Int(1, min(max_steps, T)) = 50
        sampler: samplers = "ddim"
        eta: float = Field(0.0, ge=0.0, le=1.0)
        seed: Int(0, SEED_MAX) = 0
        output: Literal["png", "json"] = "png"

        @field_validator("guidance_interval", check_fields=False)
        @classmethod
        def ordered(cls, v):
            return sorted(v) if v is not None else v

        @field_validator("guidance_scale", "guidance_rescale", "eta", check_fields=False)
        @classmethod
        def finite(cls, v: float) -> float:
            if not math.isfinite(v):
                raise ValueError("must be a finite number")
            return v

    return create_model("Generate", __base__=Base, **fields)


# JavaScript's largest safe integer: a double holds it and every integer below exactly, so a client comparing as JSON
# numbers (doubles) and the service comparing integers agree on every seed
SEED_MAX = 2 ** 53 - 1


def error_responses(api_key: bool, replica: str | None) -> dict:
    """The OpenAPI ``responses`` every route shares: the refusals before a handler (401 with an API key, 411, 413),
    as ``{"detail": message}``; with ``replica``, the ``X-TRT-DM-Replica`` header on each."""
    detail = {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}},
                                              "required": ["detail"]}}}
    out = {411: {"description": "a POST without Content-Length", "content": detail},
           413: {"description": "a body over the size limit", "content": detail}}
    if api_key:
        out[401] = {"description": "a missing or wrong API key (routes under /v1/)", "content": detail}
    if replica is not None:
        for r in out.values():
            r["headers"] = REPLICA_HEADER
    return out


REPLICA_HEADER = {"X-TRT-DM-Replica": {"description": "the Ray Serve replica that answered",
                                       "schema": {"type": "string"}}}


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


def _documented(errors: dict, responses: dict) -> dict:
    """``responses`` with the shared ``errors``; every response with the replica header when ``errors`` has it."""
    out = {**errors, **responses}
    headers = next((r["headers"] for r in errors.values() if "headers" in r), None)
    if headers:
        for r in out.values():
            r["headers"] = {**r.get("headers", {}), **headers}
    return out


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


_DETAIL = _json({"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]})
_RETRY = {"Retry-After": {"description": "seconds until the request would be admitted (measured admission rate)",
                          "schema": {"type": "integer", "minimum": 1}}}
# On every 200: how long the request waited for its first UNet call (its admission latency, what `make serve-bench`
# reports per request; the same value goes into the trt_dm_queue_time_seconds histogram).
QUEUE_TIME_HEADER = "X-TRT-DM-Queue-Time"
_QUEUE_TIME = {QUEUE_TIME_HEADER: {"description": "seconds from the request's admission to the queue to its first "
                                                  "UNet call (admission latency)",
                                   "schema": {"type": "number", "minimum": 0}}}


def add_generate(app, service: Service, Generate, timeout_s: float, errors: dict) -> None:
    """POST /v1/generate: the body (``Generate``, from ``request_model``) to the engine, its images back."""
    from fastapi import Request as HttpRequest
    from fastapi.responses import Response

    images = {"type": "object", "required": ["seeds", "images"], "properties": {
        "seeds": {"type": "array", "items": {"type": "integer"}},
        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}}}}
    responses = _documented(errors, {
        200: {"description": "the images: one PNG grid (output png) or base64 PNGs with their seeds (output json)",
              "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}, **_json(images)},
              "headers": _QUEUE_TIME},
        400: {"description": "a body that cannot be read as JSON text (e.g. not UTF-8)", "content": _DETAIL},
        429: {"description": "the queue is full now; retry after Retry-After seconds", "content": _DETAIL,
              "headers": _RETRY},
        503: {"description": "the service is stopping", "content": _DETAIL, "headers": _RETRY},
        504: {"description": "not finished within the service's time limit; cancelled", "content": _DETAIL},
        500: {"description": "the UNet call failed (the service goes on)", "content": _DETAIL}})

    @app.post("/v1/generate", response_class=Response, responses=responses)
    async def generate(body: Generate, http: HttpRequest):
        job = await _submit(service, body)
        if not await _wait(service, job, http, timeout_s):
            return Response(status_code=499)  # the client went away
        if job.error is not None:
            _refuse(service, 500, f"the UNet call failed: {job.error}", "error")
        service.count("ok")
        images = await asyncio.to_thread(service.images, job)  # a latent pipeline's VAE decodes
        answer = _answer(body.output, body.seed, images)
        answer.headers[QUEUE_TIME_HEADER] = f"{job.handle.first_call - job.handle.submitted:.6f}"
        return answer


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
    from fastapi.responses import JSONResponse, Response

    if output == "png":
        return Response(png(images), media_type="image/png")
    return JSONResponse({"seeds": [seed + i for i in range(len(images))],
                         "images": [base64.b64encode(png(images[i:i + 1])).decode() for i in range(len(images))]})


def _refuse(service: Service, status: int, detail, label: str, headers=None) -> NoReturn:
    """Count the request under ``label`` and answer ``status`` with ``detail``."""
    from fastapi import HTTPException

    service.count(label)
    raise HTTPException(status_code=status, detail=detail, headers=headers)


def add_info(app, service: Service, replica: str | None, errors: dict) -> None:
    """GET /v1/models, /health/live, /health/ready and /metrics."""
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    plain = {k: v for k, v in errors.items() if k != 401}  # the API key guards /v1/ only
    status = _json({"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]})

    @app.get("/v1/models", responses=_documented(errors, {200: {"description": "what is served",
                                                                 "content": _json({"type": "object"})}}))
    async def models():
        return service.model_info(replica)

    @app.get("/health/live", responses=_documented(plain, {200: {"description": "live", "content": status}}))
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", responses=_documented(plain, {
            200: {"description": "ready (after the warm-up call)", "content": status},
            503: {"description": "not ready yet, or stopping", "content": status}}))
    async def ready():
        if not service.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse, responses=_documented(plain, {
            200: {"description": "Prometheus text exposition",
                  "content": {"text/plain": {"schema": {"type": "string"}}}}}))
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)
