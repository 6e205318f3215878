"""Ray Serve: a local Ray instance on this CPU, the service deployed with two replicas, served through Ray's HTTP
proxy. Concurrent requests with different seeds, steps and labels are answered by both replicas, each image equal
to `trt-dm sample`'s for its seed and label (same tolerance as the in-process service: uint8 rounding, <= 1);
the deployment options follow the flags; bad flags are refused before Ray starts."""
import base64
import io
import socket
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


def test_two_replicas_serve_the_sampled_images(tiny_cls_pipeline_dir, monkeypatch):
    import ray
    from ray import serve
    model = api.load(str(tiny_cls_pipeline_dir))
    jobs = [dict(n=2, steps=3 + i % 3, seed=10 * i, class_labels=[i % 10, (i + 3) % 10], guidance_scale=1.0 + i % 2)
            for i in range(10)]
    refs = []
    with api.open_denoiser(model, device="cpu") as den:
        for j in jobs:
            s = api.SampleSettings(steps=j["steps"], n=j["n"], seed=j["seed"], labels=tuple(j["class_labels"]),
                                   guidance_scale=j["guidance_scale"])
            refs.append(to_uint8(api.draw(model, den, s, progress=False)[0]))

    port = _free_port()
    for k, v in ray_app.PROXY_PATIENCE.items():  # as `trt-dm serve --ray` starts Ray: proxy start-up on loaded cores
        monkeypatch.setenv(k, v)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2 ** 20, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(cli_serve.build({"serve_args": f"--model {tiny_cls_pipeline_dir} --replicas 2 --max-rows 8 "
                                               f"--threads 1"}), name="trt-dm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=120) as client:
            assert client.get(f"{url}/health/ready").json() == {"status": "ready"}

            def generate(job):
                r = client.post(f"{url}/v1/generate", json={**job, "output": "json"})
                assert r.status_code == 200, r.text
                return r.headers["x-trt-dm-replica"], r.json()["images"]

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(generate, jobs))
            for (_, images), ref in zip(answers, refs):
                for i, b in enumerate(images):  # each PNG: images.make_grid's 2-px border around the image
                    got = np.array(Image.open(io.BytesIO(base64.b64decode(b))))[2:-2, 2:-2].astype(int)
                    assert np.abs(got - ref[i, ..., 0].astype(int)).max() <= 1
            assert len({replica for replica, _ in answers}) == 2  # Ray routed the load over both replicas
            info = client.get(f"{url}/v1/models").json()
            assert info["replica"] and info["model"] == model.name
            bad = client.post(f"{url}/v1/generate", json={"n": 1, "class_labels": [11]})
            assert bad.status_code == 422 and "class_labels" in bad.text
            metrics = client.get(f"{url}/metrics").text
            assert "trt_dm_unet_calls_total" in metrics
    finally:
        serve.shutdown()
        ray.shutdown()


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
