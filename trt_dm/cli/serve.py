"""`trt-dm serve`: the service built from its arguments, served by uvicorn or deployed with Ray Serve."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time

from trt_dm import api
from trt_dm.cli.parser import parse_serve_args
from trt_dm.cli.settings import UsageError, load_model_of, quant_settings, searched
from trt_dm.serve import ray_app
from trt_dm.serve.engine import Service
from trt_dm.serve.http import create_app


def open_service(args, stack, *, replica: str | None = None):
    """The service `trt-dm serve` runs, from its parsed arguments: model, denoiser (engines, ONNX / OpenVINO graphs,
    a recipe's fake-quant model or FP torch), the step scheduler and the FastAPI app. Shared by the uvicorn server
    and each Ray Serve replica (``trt_dm.serve.ray_app``); the denoiser stays active until ``stack`` closes."""
    api_key = args.api_key or os.environ.get("TRT_DM_API_KEY") or None
    loaded = load_model_of(args)
    ranges, qcfg, describe, weights = None, None, {}, None
    if args.recipe:
        quant = searched(args, loaded, quant_settings(args))
        res = api.calibrate(loaded, quant, progress=not args.no_progress)
        ranges, qcfg, describe = res.ranges, quant.qcfg, {"recipe": args.recipe, "ranges": str(res.ranges_path)}
        weights = res.weights_path
    den = stack.enter_context(api.open_denoiser(loaded, engines=args.engine or (), onnx=args.onnx or (),
                                                openvino=args.openvino or (), ov_precision=args.ov_precision,
                                                ov_streams=args.ov_streams, ranges=ranges, qcfg=qcfg,
                                                device=args.device, threads=args.threads, weights=weights,
                                                ort_spin=args.ort_spin))
    describe.update(den.describe)
    service = Service(loaded, den, max_rows=args.max_rows, max_queue=args.max_queue, describe=describe,
                      policy=args.batching)
    app = create_app(service, api_key=api_key, max_body=args.max_body, max_n=args.max_n, max_steps=args.max_steps,
                     timeout_s=args.timeout, replica=replica)
    return service, app, api_key


class ServiceFactory:
    """Builds the service of parsed `trt-dm serve` flags (kept as a plain dict, so that it pickles to Ray
    replicas): ``factory(stack, replica) -> (service, app)``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.options = dict(vars(args))

    def __call__(self, stack: contextlib.ExitStack, replica: str | None = None):
        service, app, _ = open_service(argparse.Namespace(**self.options), stack, replica=replica)
        return service, app


def build(args: dict):
    """Ray Serve application builder for `serve run` / `serve deploy` / KubeRay (``trt_dm.cli.serve:build``):
    ``args = {"serve_args": "--model ..."}``."""
    unknown = set(args) - {"serve_args"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; accepted: serve_args (the `trt-dm serve` flags)")
    parsed = parse_serve_args(args.get("serve_args", ""))
    return ray_app.application(ServiceFactory(parsed), parsed)


def run_ray(args: argparse.Namespace) -> int:
    """`trt-dm serve --ray`: calibrate once (a recipe), then deploy the service's replicas with Ray Serve."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise UsageError(f"trt-dm serve --ray needs the [ray] extra (pip install 'trt_dm[ray]'): {e}") from None
    try:
        app = ray_app.application(ServiceFactory(args), args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.recipe:  # calibrate once here, so that replicas on this machine find the ranges in the cache
        loaded = load_model_of(args)
        api.calibrate(loaded, searched(args, loaded, quant_settings(args)), progress=not args.no_progress)
    n = (f"{args.replicas}-{args.max_replicas} replicas (autoscaled)" if args.max_replicas else
         f"{args.replicas} replica{'s' * (args.replicas > 1)}")
    with ray_app.running(app, host=args.host, port=args.port, address=args.ray_address, verbose=args.verbose):
        print(f"serving {args.model} through Ray Serve on http://{args.host}:{args.port} with {n}; Ctrl-C or "
              f"SIGTERM stops and drains", flush=True)
        _wait_for_stop()
        print("trt-dm serve: draining replicas", file=sys.stderr, flush=True)
    return 0


def _wait_for_stop() -> None:
    """Return on SIGINT (Ctrl-C) or SIGTERM."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


@contextlib.contextmanager
def _engine_log_on_stderr():
    """The service engine's lifecycle lines ("stopped after draining; ...") on stderr as the command's own
    output (``trt-dm serve: ...``), whatever the logging level of the rest."""
    logger = logging.getLogger("trt_dm.serve.engine")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("trt-dm serve: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def cmd_serve(args) -> int:
    """`trt-dm serve`: the service on uvicorn (or, with --ray, Ray Serve replicas) until SIGINT / SIGTERM."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(f"trt-dm serve needs the [serve] extra (pip install 'trt_dm[serve]'): {e}") from None
    if args.max_rows < 2 or args.max_queue < 1 or args.max_n < 1 or args.max_steps < 1:
        raise UsageError("--max-rows must be >= 2, --max-queue, --max-n and --max-steps >= 1")
    if args.ray:
        return run_ray(args)
    if args.replicas != 1 or args.max_replicas is not None or args.ray_address is not None:
        raise UsageError("--replicas, --max-replicas and --ray-address need --ray")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_engine_log_on_stderr())
        service, app, api_key = open_service(args, stack)
        print(f"serving {service.loaded.name} ({service.describe.get('runner')}) on http://{args.host}:{args.port} "
              f"(max {args.max_rows} rows per UNet call, queue {args.max_queue}, API key {'on' if api_key else 'off'})")
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0
