"""`trt-dm serve --ray`: the same service deployed with Ray Serve, one step scheduler per replica.

    trt-dm serve --ray --replicas 2 [--max-replicas 4] [--ray-address ADDRESS] <the usual `trt-dm serve` flags>

On a Ray cluster (KubeRay RayService, `serve run`, `serve deploy`) the application builder is
``trt_dm.cli.serve:build`` with ``args: {serve_args: "<the same flags>"}`` (see deploy/rayservice.yaml).

Each replica (a Ray actor) calls the factory it was deployed with (``trt_dm.cli.serve.ServiceFactory``: the parsed
flags, pickled), which loads the model and its denoiser and builds its own ``Service``: the service engine of
``trt_dm.serve.engine`` behind the FastAPI app of ``trt_dm.serve.http``, so step-level batching happens inside each
replica. This module knows nothing of the CLI: it takes the factory and the deployment's options (``running``
deploys; the command waits and reports). Ray's HTTP proxy routes requests between replicas (its router prefers the
replica with fewer ongoing requests of two it samples) and, with ``--max-replicas``, its autoscaler adds and
removes replicas on ongoing requests per replica. Ray runs the app's lifespan before it routes to a replica, so a replica takes traffic only
after its warm-up UNet call; stopping a replica runs the lifespan's shutdown: admission stops and what is in flight
drains (``graceful_shutdown_timeout_s`` = ``--timeout``). Every response names its replica
(``X-TRT-DM-Replica``); /metrics is the answering replica's own registry (Ray's metrics export has Ray Serve's
per-deployment metrics for the whole application).

Backpressure: a replica takes at most ``max_queue + max_rows`` requests at once (``max_ongoing_requests``); its
``Service`` answers 429 beyond ``--max-queue`` images, as without Ray; Ray queues at most ``--max-queue`` requests
itself when every replica is full, and answers 503 beyond that.

Faults (tests/serve/test_ray.py): when a replica's process dies (killed, OOM), the requests it held end at once with
Ray's proxy answering 500 (a request is deterministic in its seed, so a client may simply retry it), the proxy routes
new requests to the live replicas within about a second, and the controller starts a replacement (the model loads
and warms up again: about 20 s on this 2-core machine) after which both answer; no request hangs.

Start-up on a busy machine: Ray Serve's controller gives its HTTP proxy 5 s to report ready and kills it after three
misses; a proxy starting on loaded cores takes longer (measured: killed while two sampling jobs held both cores of
this 2-core VM), and `serve.start` then fails with "the actor never ran". When `trt-dm serve --ray` starts Ray
itself it gives the proxy ``PROXY_PATIENCE`` instead (unless those variables are set); a cluster's controller
reads them from its own nodes' environment.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

# Ray Serve's proxy readiness and health-check timeouts (seconds; Ray's defaults: 5 and 10), read by the controller
# process at its start, which inherits them from the process that starts Ray.
PROXY_PATIENCE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def patient_proxy_env(environ=os.environ) -> dict[str, str]:
    """Set ``PROXY_PATIENCE`` in ``environ`` where not set already (before a local `ray.init`); returns what it set."""
    added = {k: v for k, v in PROXY_PATIENCE.items() if k not in environ}
    environ.update(added)
    return added


class Replica:
    """One Ray Serve replica: the service built by ``factory(stack, replica_id) -> (service, app)`` (a picklable
    callable; the denoiser stays open until the replica stops)."""

    def __init__(self, factory: Callable) -> None:
        from ray import serve
        replica = serve.get_replica_context().replica_id.unique_id
        self._stack = contextlib.ExitStack()
        self.service, self._app = factory(self._stack, replica)

    def __serve_build_asgi_app__(self):  # Ray Serve asks for the ASGI app after the constructor
        return self._app

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose scheduler thread died is replaced."""
        thread = self.service.thread
        if self.service.running and (thread is None or not thread.is_alive()):
            raise RuntimeError("the step scheduler thread has stopped")


def deployment_options(args) -> dict:
    """Ray Serve deployment options from the `trt-dm serve` flags (an argparse namespace or anything with the same
    attributes: replicas, autoscaling, resources, backpressure, drain)."""
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise ValueError(f"--max-replicas ({args.max_replicas}) must be >= --replicas ({args.replicas})")
    gpu = bool(args.engine) or str(args.device or "").startswith("cuda")
    opts = dict(
        name="trt-dm",
        ray_actor_options={"num_cpus": args.replica_cpus if args.replica_cpus is not None else (args.threads or 1),
                           "num_gpus": args.replica_gpus if args.replica_gpus is not None else (1 if gpu else 0)},
        max_ongoing_requests=args.max_queue + args.max_rows,
        max_queued_requests=args.max_queue,
        graceful_shutdown_timeout_s=args.timeout,
        health_check_period_s=10,
    )
    if args.max_replicas is None:
        opts["num_replicas"] = args.replicas
    else:  # ongoing requests per replica the autoscaler aims at: a quarter of a full UNet call's rows
        opts["autoscaling_config"] = {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                                      "initial_replicas": args.replicas,
                                      "target_ongoing_requests": max(1, args.max_rows // 4)}
    return opts


def application(factory: Callable, args):
    """The Ray Serve application (not yet running): replicas built by ``factory``, deployed as ``args`` (the
    `trt-dm serve` flags) say."""
    from ray import serve
    deployment = serve.deployment(serve.ingress()(Replica))
    return deployment.options(**deployment_options(args)).bind(factory)


@contextlib.contextmanager
def running(app, *, host: str, port: int, address: str | None, verbose: bool):
    """Join (or start, with ``PROXY_PATIENCE``) Ray, start Serve's proxy on ``host``:``port`` and deploy ``app``;
    on leaving, shut Serve down (each replica drains) and disconnect from Ray."""
    import ray
    from ray import serve
    if address is None:
        patient_proxy_env()
    ray.init(address=address, include_dashboard=False, logging_level="WARNING" if not verbose else "INFO")
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="trt-dm", route_prefix="/")
        yield
        serve.shutdown()
    finally:
        ray.shutdown()
