"""Ray Serve: a local Ray instance on this CPU, the service deployed with two replicas, served through Ray's HTTP
proxy. Concurrent requests with different seeds, steps and labels are answered by both replicas, each image equal
to `trt-dm sample`'s for its seed and label (same tolerance as the in-process service: uint8 rounding, <= 1);
a replica's process killed under load ends its requests with an error and is replaced; the deployment options
follow the flags; bad flags are refused before Ray starts."""
import base64
import contextlib
import io
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from trt_dm import api  # noqa: E402
from trt_dm.cli import serve as cli_serve  # noqa: E402
from trt_dm.cli.parser import parse_serve_args  # noqa: E402
from trt_dm.core.images import to_uint8  # noqa: E402
from trt_dm.serve import ray_app  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deployment_options_follow_the_flags(tiny_cls_pipeline_dir):
    args = parse_serve_args(f"--model {tiny_cls_pipeline_dir} --replicas 2 --max-rows 16 --max-queue 32")
    opts = ray_app.deployment_options(args)
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["max_ongoing_requests"] == 48 and opts["max_queued_requests"] == 32
    assert opts["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}
    auto = ray_app.deployment_options(parse_serve_args(
        f"--model {tiny_cls_pipeline_dir} --replicas 1 --max-replicas 3 --engine a.plan --threads 2"))
    assert auto["autoscaling_config"]["min_replicas"] == 1 and auto["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in auto and auto["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    with pytest.raises(ValueError, match="--max-replicas"):
        ray_app.deployment_options(parse_serve_args("--model x --replicas 3 --max-replicas 2"))
    with pytest.raises(ValueError, match="unknown application args"):
        cli_serve.build({"serve_args": "--model x", "replicas": 2})


def test_patient_proxy_env_keeps_what_the_user_set():
    env = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "7"}
    assert ray_app.patient_proxy_env(env) == {"RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}
    assert env == {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "7", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def _reference(model, den, job) -> np.ndarray:
    """`trt-dm sample`'s images for a request body (uint8)."""
    s = api.SampleSettings(steps=job["steps"], n=job["n"], seed=job["seed"], labels=tuple(job["class_labels"]),
                           guidance_scale=job.get("guidance_scale", 1.0))
    return to_uint8(api.draw(model, den, s, progress=False)[0])


def _same_images(pngs: list[str], ref: np.ndarray) -> bool:
    """Each PNG (images.make_grid's 2-px border around the image) equal to the reference within uint8 rounding."""
    return len(pngs) == len(ref) and all(
        np.abs(np.array(Image.open(io.BytesIO(base64.b64decode(b))))[2:-2, 2:-2].astype(int)
               - ref[i, ..., 0].astype(int)).max() <= 1 for i, b in enumerate(pngs))


@pytest.fixture(scope="module")
def ray_service(tiny_cls_pipeline_dir):
    """The tiny class-conditional model deployed with two replicas on a local Ray, behind Ray's HTTP proxy:
    (url, model). One deployment for the module's tests (Ray and two replicas take a minute to start here)."""
    import ray
    from ray import serve
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ray_app.PROXY_PATIENCE.items():  # as `trt-dm serve --ray` starts Ray: proxy start-up on busy cores
            mp.setenv(k, v)
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2 ** 20, logging_level="ERROR")
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(cli_serve.build({"serve_args": f"--model {tiny_cls_pipeline_dir} --replicas 2 --max-rows 8 "
                                                   f"--threads 1"}), name="trt-dm", route_prefix="/")
            yield f"http://127.0.0.1:{port}", api.load(str(tiny_cls_pipeline_dir))
        finally:
            serve.shutdown()
            ray.shutdown()


def test_two_replicas_serve_the_sampled_images(ray_service):
    url, model = ray_service
    jobs = [dict(n=2, steps=3 + i % 3, seed=10 * i, class_labels=[i % 10, (i + 3) % 10], guidance_scale=1.0 + i % 2)
            for i in range(10)]
    with api.open_denoiser(model, device="cpu") as den:
        refs = [_reference(model, den, j) for j in jobs]
    with httpx.Client(timeout=120) as client:
        assert client.get(f"{url}/health/ready").json() == {"status": "ready"}

        def generate(job):
            r = client.post(f"{url}/v1/generate", json={**job, "output": "json"})
            assert r.status_code == 200, r.text
            return r.headers["x-trt-dm-replica"], r.json()["images"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(generate, jobs))
        for (_, images), ref in zip(answers, refs):
            assert _same_images(images, ref)
        assert len({replica for replica, _ in answers}) == 2  # Ray routed the load over both replicas
        info = client.get(f"{url}/v1/models").json()
        assert info["replica"] and info["model"] == model.name
        bad = client.post(f"{url}/v1/generate", json={"n": 1, "class_labels": [11]})
        assert bad.status_code == 422 and "class_labels" in bad.text
        metrics = client.get(f"{url}/metrics").text
        assert "trt_dm_unet_calls_total" in metrics


def _replica_pids() -> dict[str, int]:
    """{replica id: its actor's process id} of the deployment's live replicas (Ray's named actors)."""
    import ray
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::trt-dm#trt-dm#"):
            with contextlib.suppress(ray.exceptions.RayActorError):
                handle = ray.get_actor(a["name"], namespace=a["namespace"])
                pid = handle.__ray_call__.remote(lambda _: os.getpid())
                out[a["name"].rsplit("#", 1)[1]] = ray.get(pid, timeout=60)
    return out


def test_a_killed_replica_ends_its_requests_and_is_replaced(ray_service):
    """Four clients send requests back to back (each 8 rows x 100 steps: a second or more per request here); once
    both replicas have answered, one replica's process is killed (SIGKILL). Every request ends: with its images
    (equal to `trt-dm sample`'s for its seed) or an explicit error status (Ray's proxy answers 500 for the requests
    the dead replica held: a request is deterministic in its seed, so a client may retry it); none hangs. Ray's
    controller starts a new replica, and the service answers from two replicas again."""
    from ray import serve
    url, model = ray_service
    jobs = [dict(n=8, steps=100, seed=1000 + c, class_labels=[(c + k) % 10 for k in range(8)]) for c in range(4)]
    with api.open_denoiser(model, device="cpu") as den:
        refs = [_reference(model, den, j) for j in jobs]
    pids = _replica_pids()
    assert len(pids) == 2
    stop, answers = threading.Event(), []

    def client(c: int) -> None:
        with httpx.Client(timeout=300) as http:
            while not stop.is_set():
                sent = time.monotonic()
                r = http.post(f"{url}/v1/generate", json={**jobs[c], "output": "json"})
                answers.append((c, r.status_code, r.headers.get("x-trt-dm-replica"),
                                r.json()["images"] if r.status_code == 200 else r.text, sent))

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client, c) for c in range(4)]
        deadline = time.monotonic() + 300
        while {a[2] for a in answers if a[1] == 200} != set(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {a[2] for a in answers if a[1] == 200} == set(pids), "both replicas should take the load"
        victim = sorted(pids)[0]
        # right after a replica's first answer it may hold nothing (seen under a loaded CPU: requests of 40-80 s, the
        # victim killed just after answering); a second lets that client's next request reach it (the proxy routes
        # to the replica with fewer requests in flight)
        time.sleep(1.0)
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(3)
        stop.set()
        for f in running:
            f.result(timeout=600)  # every client's requests ended: no hang, no connection error
    errors = [a for a in answers if a[1] != 200]
    assert errors and all(a[1] in (500, 503) for a in errors), [a[:2] for a in errors]  # the victim's in-flight ones
    # a dead process answers nothing: no image from the victim for a request sent after the kill
    assert not [a for a in answers if a[4] > killed_at and a[1] == 200 and a[2] == victim]
    for c, status, _, images, _ in answers:
        if status == 200:
            assert _same_images(images, refs[c])
    deadline = time.monotonic() + 600  # Ray's controller replaces the replica (model load + warm-up on busy cores)
    while time.monotonic() < deadline:
        states = serve.status().applications["trt-dm"].deployments["trt-dm"].replica_states
        if states.get("RUNNING") == 2 and len(now := _replica_pids()) == 2 and victim not in now:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced in 600 s: {states}")
    seen = set()
    with httpx.Client(timeout=120) as http:
        for i in range(40):
            r = http.post(f"{url}/v1/generate", json={"n": 1, "steps": 3, "seed": i, "class_labels": [i % 10]})
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-trt-dm-replica"])
            if seen == set(now):
                break
    assert seen == set(now)  # the survivor and the new replica both answer


def test_kuberay_manifest_is_a_valid_serve_config():
    """deploy/rayservice.yaml: serveConfigV2 passes Ray Serve's own schema, its import path is this module's builder
    and its serve_args parse as `trt-dm serve` flags into deployment options."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema
    manifest = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "trt_dm.cli.serve:build"
    args = parse_serve_args(app.args["serve_args"])
    assert args.engine and ray_app.deployment_options(args)["ray_actor_options"]["num_gpus"] == 1
    assert [d.name for d in app.deployments] == ["trt-dm"]
