"""The HTTP service in-process (FastAPI's TestClient runs the app and its scheduler thread): generate as PNG and
JSON equal to `trt-dm sample`, validation 422, API key 401, body limit 413, queue limit 429, runner error 500
with the service still serving, health and Prometheus metrics."""
import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from trt_dm import api  # noqa: E402
from trt_dm.images import to_uint8  # noqa: E402
from trt_dm.serve.app import Service, create_app  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_cls_pipeline_dir):
    return api.load(str(tiny_cls_pipeline_dir))


def _client(model, denoiser=None, **kw):
    den = denoiser
    ctx = None
    if den is None:
        ctx = api.open_denoiser(model, device="cpu")
        den = ctx.__enter__()
    app_kw = {k: kw.pop(k) for k in ("api_key", "max_body", "timeout_s") if k in kw}
    service = Service(model, den, **kw)
    service.denoiser_context = ctx  # keeps the runner active for the service's life
    return TestClient(create_app(service, **app_kw)), service


def test_generate_png_and_json_equal_sampled_images(model):
    client, service = _client(model, max_rows=8)
    settings = api.SampleSettings(steps=4, n=3, seed=5, labels=(2, 8), guidance_scale=2.0)
    with api.open_denoiser(model, device="cpu") as den:
        ref = to_uint8(api.draw(model, den, settings, progress=False)[0])
    with client:
        assert client.get("/health/ready").json() == {"status": "ready"}
        r = client.post("/v1/generate", json={"n": 3, "steps": 4, "seed": 5, "class_labels": [2, 8],
                                              "guidance_scale": 2.0, "output": "json"})
        assert r.status_code == 200, r.text
        got = [np.array(Image.open(io.BytesIO(base64.b64decode(b)))) for b in r.json()["images"]]
        assert r.json()["seeds"] == [5, 6, 7]
        for i in range(3):  # PNG of one image: images.make_grid's 2-px white border around it
            img = got[i][2:-2, 2:-2]
            assert np.abs(img.astype(int) - ref[i, ..., 0].astype(int)).max() <= 1  # uint8 rounding of ~1e-5 diffs
        png = client.post("/v1/generate", json={"n": 2, "steps": 2, "classes": "all"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        models = client.get("/v1/models").json()
        assert models["model"] == model.name and models["null_class_label"] == 10
        metrics = client.get("/metrics").text
    assert 'trt_dm_requests_total{status="ok"} 2.0' in metrics and "trt_dm_unet_batch_rows_bucket" in metrics
    assert "trt_dm_images_generated_total 6.0" in metrics  # warm-up image + 3 + 2


@pytest.mark.parametrize("body,field", [
    ({"n": 0, "classes": "all"}, "n"),
    ({"steps": 5000, "classes": "all"}, "steps"),
    ({"class_labels": [11]}, "class_labels"),
    ({}, "class_labels"),  # a conditional model needs labels
    ({"classes": "all", "guidance_scale": 0.5}, "guidance_scale"),
    ({"classes": "all", "path": "/etc/passwd"}, "path"),  # unknown fields are refused
    ({"classes": "all", "class_labels": [1]}, "classes"),
])
def test_validation_errors_name_the_field(model, body, field):
    client, _ = _client(model)
    with client:
        r = client.post("/v1/generate", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", field]
    assert "--" not in detail["msg"], "the message names the request's fields, not the CLI's flags"


@pytest.mark.parametrize("cli_msg,field,msg", [
    ("'m' is text-conditional: give --prompt TEXT, --prompts FILE or --embeddings FILE.safetensors", "prompt",
     "'m' is text-conditional: give \"prompt\" TEXT"),  # no file-path alternatives over HTTP
    ("'m' is text-conditional: give --prompt / --prompts / --embeddings, not class labels", "prompt",
     "'m' is text-conditional: give \"prompt\", not class labels"),
    ("--guidance-scale 3 needs a conditional model; 'm' is unconditional", "guidance_scale",
     "\"guidance_scale\" 3 needs a conditional model; 'm' is unconditional"),
    ("class labels [13] are out of range for 'm': accepted 0..9", "class_labels",
     "class labels [13] are out of range for 'm': accepted 0..9"),
])
def test_conditioning_errors_are_worded_for_the_request(cli_msg, field, msg):
    from trt_dm.serve.app import _as_request_error
    fields = {"n", "class_labels", "classes", "prompt", "negative_prompt", "guidance_scale"}
    assert _as_request_error(cli_msg, fields) == (field, msg)


def test_api_key_body_limit_and_queue_limit(model):
    client, service = _client(model, api_key="s3cret", max_body=200, max_queue=2)
    with client:
        assert client.post("/v1/generate", json={"classes": "all", "steps": 1}).status_code == 401
        ok = client.post("/v1/generate", json={"classes": "all", "steps": 1}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/health/live").status_code == 200  # health needs no key
        big = client.post("/v1/generate", content=b"{" + b" " * 300 + b"}", headers={"X-API-Key": "s3cret",
                                                                                     "content-type": "application/json"})
        assert big.status_code == 413
        r = client.post("/v1/generate", json={"classes": "all", "n": 3, "steps": 1}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"


def _flaky(fails):
    """A denoiser (zeros) whose n-th call raises when ``fails(n)``; thread-safe call count."""
    state, lock = {"calls": 0}, threading.Lock()

    def flaky(x, t, **c):
        with lock:
            state["calls"] += 1
            n = state["calls"]
        if fails(n):
            raise RuntimeError(f"injected fault {n}")
        return torch.zeros_like(x)

    flaky.device = torch.device("cpu")
    return flaky


def test_a_runner_error_is_500_and_the_service_keeps_serving(model):
    client, _ = _client(model, denoiser=_flaky(lambda n: n == 2))  # the first call after the warm-up fails
    with client:
        bad = client.post("/v1/generate", json={"classes": "all", "steps": 2})
        good = client.post("/v1/generate", json={"classes": "all", "steps": 2})
        metrics = client.get("/metrics").text
    assert bad.status_code == 500 and "injected fault" in bad.json()["detail"]
    assert good.status_code == 200
    assert 'trt_dm_requests_total{status="error"} 1.0' in metrics


def test_trt_dm_serve_on_loopback_answers_and_drains_on_sigterm(tiny_cls_pipeline_dir, tmp_path):
    """The real command: `trt-dm serve` on 127.0.0.1, ready after its warm-up, concurrent requests served, SIGTERM
    stops it after draining. Bounded: a few requests, 120 s at most."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "trt_dm.cli", "serve", "--model", str(tiny_cls_pipeline_dir),
                             "--port", str(port), "--max-rows", "8", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.3)
        else:
            pytest.fail("the service did not get ready in 120 s")
        bodies = [{"classes": "all", "n": 2, "steps": 3, "seed": s, "output": "json"} for s in range(4)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/generate", json=b, timeout=60), bodies))
        assert [a.status_code for a in answers] == [200] * 4
        assert [a.json()["seeds"] for a in answers] == [[s, s + 1] for s in range(4)]
        assert "trt_dm_unet_calls_total" in httpx.get(f"{url}/metrics", timeout=5).text
        # a client that gives up: its request is dropped (counted as disconnected), the service goes on
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/generate", json={"classes": "all", "n": 32, "steps": 100}, timeout=0.3)
        for _ in range(100):
            if 'trt_dm_requests_total{status="disconnected"} 1.0' in httpx.get(f"{url}/metrics", timeout=5).text:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the disconnected request was not dropped")
        assert httpx.post(f"{url}/v1/generate", json=bodies[0], timeout=60).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # uvicorn shuts down gracefully (the app drains in its lifespan) and then re-raises the signal, as it should
    assert rc in (0, -signal.SIGTERM)
    assert "stopped after draining" in proc.stderr.read()


def test_every_accepted_request_ends_with_images_or_an_error_under_concurrent_load_with_faults(model):
    """8 concurrent clients, 24 requests of different sizes and steps, a UNet call failing every 5th time: every
    request ends (200 with its images, or 500 naming the fault), none hangs, and the metrics add up."""
    from concurrent.futures import ThreadPoolExecutor
    client, _ = _client(model, denoiser=_flaky(lambda n: n > 1 and n % 5 == 0), max_rows=6)
    bodies = [{"classes": "all", "n": 1 + i % 3, "steps": 2 + i % 4, "seed": i, "output": "json",
               "guidance_scale": 1.0 + (i % 2)} for i in range(24)]
    with client:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: client.post("/v1/generate", json=b), bodies))
        metrics = client.get("/metrics").text
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 500} and codes.count(200) >= 1 and codes.count(500) >= 1
    for a, b in zip(answers, bodies):
        if a.status_code == 200:
            assert len(a.json()["images"]) == b["n"]
        else:
            assert "injected fault" in a.json()["detail"]
    ok = float(metrics.split('trt_dm_requests_total{status="ok"} ')[1].split()[0])
    err = float(metrics.split('trt_dm_requests_total{status="error"} ')[1].split()[0])
    assert ok == codes.count(200) and err == codes.count(500)
