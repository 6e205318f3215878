"""The HTTP service in-process (FastAPI's TestClient runs the app and its scheduler thread): generate as PNG and
JSON equal to `trt-dm sample`, validation 422, API key 401, body limit 413, queue limit 429, runner error 500
with the service still serving, health and Prometheus metrics."""
import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from trt_dm import api  # noqa: E402
from trt_dm.core.errors import InputError  # noqa: E402
from trt_dm.core.guidance import check_scale  # noqa: E402
from trt_dm.core.images import to_uint8  # noqa: E402
from trt_dm.serve.engine import Service  # noqa: E402
from trt_dm.serve.http import create_app  # noqa: E402
from trt_dm.serve.scheduler import Request  # noqa: E402


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
        interval = client.post("/v1/generate", json={"n": 3, "steps": 4, "seed": 5, "class_labels": [2, 8],
                                                     "guidance_scale": 2.0, "guidance_interval": [0, 30],
                                                     "output": "json"})
        assert interval.status_code == 200 and interval.json()["images"] != r.json()["images"]
        either = client.post("/v1/generate", json={"n": 3, "steps": 4, "seed": 5, "class_labels": [2, 8],
                                                   "guidance_scale": 2.0, "guidance_interval": [30, 0],
                                                   "output": "json"})  # its two timesteps in either order
        assert either.json()["images"] == interval.json()["images"]
        whole = client.post("/v1/generate", json={"n": 3.0, "steps": 4, "seed": 5.0, "class_labels": [2.0, 8],
                                                  "guidance_scale": 2, "output": "json"})  # JSON integers as 3.0
        assert whole.json()["images"] == r.json()["images"]
        png = client.post("/v1/generate", json={"n": 2, "steps": 2, "classes": "all"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        # each answer says how long it waited for its first UNet call (what the queue-time histogram sums)
        waits = [float(a.headers["x-trt-dm-queue-time"]) for a in (r, interval, either, whole, png)]
        assert all(w >= 0 for w in waits)
        models = client.get("/v1/models").json()
        assert models["model"] == model.name and models["null_class_label"] == 10
        metrics = client.get("/metrics").text
    assert 'trt_dm_requests_total{status="ok"} 5.0' in metrics and "trt_dm_unet_batch_rows_bucket" in metrics
    assert "trt_dm_images_generated_total 15.0" in metrics  # warm-up image + 3 + 3 + 3 + 3 + 2
    summed = next(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("trt_dm_queue_time_seconds_sum "))
    assert abs(summed - sum(waits)) < 1e-3 * len(waits)  # the warm-up is not counted: it has no answer
    value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line[:1] != "#"}
    # every UNet call's duration is recorded: what the runner was busy for, next to the call count
    assert value["trt_dm_unet_call_seconds_count"] == value["trt_dm_unet_calls_total"] > 0
    assert 0 < value["trt_dm_unet_call_seconds_sum"] < 60


@pytest.mark.parametrize("body,field,words", [
    ({"n": 0, "classes": "all"}, "n", ""),
    ({"steps": 5000, "classes": "all"}, "steps", ""),
    ({"class_labels": [11]}, "class_labels", "less than or equal to 9"),  # the schema holds the model's range
    ({}, "class_labels", 'give "class_labels" L [L ...] (0..9) or "classes" all'),  # a conditional model needs labels
    ({"classes": "all", "guidance_scale": 0.5}, "guidance_scale", ""),
    ({"classes": "all", "path": "/etc/passwd"}, "path", ""),  # unknown fields are refused
    ({"classes": "all", "class_labels": [1]}, "classes", "give class_labels or classes, not both"),
    ({"classes": "all", "guidance_interval": [0]}, "guidance_interval", ""),
    ({"classes": "all", "guidance_interval": [0, 100]}, "guidance_interval", ""),  # past the schedule's last t
    ({"classes": "all", "n": 1.5}, "n", ""),
    ({"classes": "all", "n": "2"}, "n", ""),  # JSON types exactly: no "2" for 2, no true for 1
    ({"classes": "all", "seed": True}, "seed", ""),
    ({"classes": "all", "seed": 2 ** 53}, "seed", ""),
])
def test_validation_errors_name_the_field(model, body, field, words):
    client, _ = _client(model)
    with client:
        r = client.post("/v1/generate", json=body)
        metrics = client.get("/metrics").text
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"][:2] == ["body", field] and words in detail["msg"]  # (+ the index of a bad list item)
    assert "--" not in detail["msg"], "the message names the request's fields, not the CLI's flags"
    if words:  # refused by the model, not by the schema: counted as invalid
        assert 'trt_dm_requests_total{status="invalid"} 1.0' in metrics


# (what raises, field, flag, the CLI's message, the request's): {m} is the model's name
INPUT_ERRORS = [
    (lambda m: m["cls"].conditioning_for(1, [13]), "class_labels", "--class-labels",
     "class labels [13] are out of range for {m}: accepted 0..9",
     "class labels [13] are out of range for {m}: accepted 0..9"),
    (lambda m: m["cls"].conditioning_for(1), "class_labels", "--class-labels",
     "{m} is class-conditional: give --class-labels L [L ...] (0..9) or --classes all",
     '{m} is class-conditional: give "class_labels" L [L ...] (0..9) or "classes" all'),
    (lambda m: m["cls"].conditioning_for(1, "some"), "classes", "--classes",
     "--classes takes 'all', got 'some'; or give --class-labels L [L ...]",
     '"classes" takes \'all\', got \'some\'; or give "class_labels" L [L ...]'),
    (lambda m: m["uncond"].conditioning_for(1, [1]), "class_labels", "--class-labels",
     "class labels were given, but {m} is an unconditional model (no class_labels input); drop --class-labels / "
     "--classes",
     'class labels were given, but {m} is an unconditional model (no class_labels input); drop "class_labels" / '
     '"classes"'),
    (lambda m: m["uncond"].guidance(3.0), "guidance_scale", "--guidance-scale",
     "--guidance-scale 3 needs a conditional model; {m} is unconditional",
     '"guidance_scale" 3 needs a conditional model; {m} is unconditional'),
    (lambda m: m["text"].conditioning_for(1), "prompt", "--prompt",
     "{m} is text-conditional: give --prompt TEXT, --prompts FILE or --embeddings FILE.safetensors",
     '{m} is text-conditional: give "prompt" TEXT'),  # no file-path alternatives over HTTP
    (lambda m: m["text"].conditioning_for(1, [1]), "prompt", "--prompt",
     "{m} is text-conditional: give --prompt / --prompts / --embeddings, not class labels",
     '{m} is text-conditional: give "prompt", not class labels'),
    (lambda m: check_scale(0.5), "guidance_scale", "--guidance-scale",
     "--guidance-scale must be a finite number >= 1 (1 = no guidance), got 0.5",
     '"guidance_scale" must be a finite number >= 1 (1 = no guidance), got 0.5'),
    (lambda m: api.schedule(m["cls"]).check_steps(2000, "--steps", "m"), "steps", "--steps",
     "--steps 2000 is more than the 100 timesteps 'm' was trained with; accepted: 1..100",
     "\"steps\" 2000 is more than the 100 timesteps 'm' was trained with; accepted: 1..100"),
    (lambda m: api.SampleSettings(n=0), "n", "--n", "--n must be >= 1, got 0", '"n" must be >= 1, got 0'),
]


@pytest.mark.parametrize("raises,field,flag,cli_msg,request_msg", INPUT_ERRORS)
def test_input_errors_name_their_field_in_cli_and_request_words(model, tiny_pipeline_dir, tiny_cond_unet_dir, raises,
                                                                 field, flag, cli_msg, request_msg):
    """Input errors are typed (``InputError``): the CLI prints its message with flags, the service answers with the
    error's field and its message in the request's own field names; both survive pickling (Ray)."""
    import pickle
    models = {"cls": model, "uncond": api.load(str(tiny_pipeline_dir)), "text": api.load(str(tiny_cond_unet_dir))}
    with pytest.raises(InputError) as info:
        raises(models)
    e = info.value
    name = next((repr(m.name) for m in models.values() if repr(m.name) in str(e)), None)
    assert (str(e), e.field, e.flag) == (cli_msg.format(m=name), field, flag)
    assert e.request_message == request_msg.format(m=name) and "--" not in e.request_message
    again = pickle.loads(pickle.dumps(e))
    assert (type(again), str(again), again.field, again.flag, again.request_message) == (
        InputError, str(e), e.field, e.flag, e.request_message)


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
        assert r.status_code == 422  # more images than the queue holds: never 429, waiting cannot help


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


@pytest.mark.parametrize("raw,field", [
    (b'{"classes": "all", "seed": 1e400}', "seed"),
    (b'{"classes": "all", "guidance_scale": NaN}', "guidance_scale"),
    (b'{"classes": "all", "guidance_scale": Infinity}', "guidance_scale"),
    (b'{"classes": "all", "eta": -Infinity}', "eta"),
    (b'{"classes": "all", "n": 1e400}', "n"),
    (b'{"classes": "all", "guidance_interval": [0, NaN]}', "guidance_interval"),
    (b'{"class_labels": [1e400]}', "class_labels"),
    (b'{"classes": "all", "steps": "four"}', "steps"),
    (b'{"classes": "all", "prompt": {"a": [[[1]]]}}', "prompt"),
])
def test_non_finite_and_malformed_numbers_are_422_naming_the_field(model, raw, field):
    """Python's JSON reader takes NaN, Infinity and 1e400: never a 500, always a 422 naming the field, its body
    valid JSON with FastAPI's item fields (type, loc, msg)."""
    client, _ = _client(model)
    with client:
        r = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        metrics = client.get("/metrics").text
    assert r.status_code == 422, r.text
    items = r.json()["detail"]
    assert any(i["loc"][:2] == ["body", field] for i in items) and all({"type", "loc", "msg"} <= set(i) for i in items)
    assert 'trt_dm_requests_total{status="invalid"} 1.0' in metrics


def test_malformed_bodies_are_never_500(model):
    client, _ = _client(model, max_body=64 * 1024)
    bodies = [b"[" * 20000 + b"]" * 20000, b'{"classes": "all", "n": \xff\xfe}', b'{"classes": "all"', b"",
              b'{"class_labels": [' + b"1," * 20000 + b"1]}"]
    with client:
        for raw in bodies:
            r = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text[:200])


def test_a_request_that_can_never_be_queued_is_422_and_a_full_queue_429_with_a_measured_retry_after(model):
    """n > --max-queue can never succeed: 422 naming "n" and the limit, on an idle server too. A request that only
    has to wait gets 429 with Retry-After from the measured admission rate (images admitted per second)."""
    client, service = _client(model, max_queue=2)
    with client:
        r = client.post("/v1/generate", json={"classes": "all", "n": 3, "steps": 1})
        assert r.status_code == 422
        item = r.json()["detail"][0]  # the schema holds the limit: n <= min(--max-n, --max-queue)
        assert item["loc"] == ["body", "n"] and "less than or equal to 2" in item["msg"]
        schema = client.get("/openapi.json").json()["components"]["schemas"]["Generate"]["properties"]["n"]
        assert schema["maximum"] == 2
    cond = model.conditioning_for(3, "all")
    with pytest.raises(InputError, match="can never be queued here: the service holds at most 2 waiting images"):
        service.submit(Request(n=3, steps=1, conditioning=cond))  # the engine's own check (API users, Ray)
    # a full queue: 2 images in flight (max_rows 2), 2 waiting; one more image waits for admission -> 429
    slow = _flaky(lambda n: False)
    sleepy = lambda x, t, **c: (time.sleep(0.02), slow(x, t, **c))[1]  # noqa: E731
    sleepy.device = slow.device
    client, service = _client(model, denoiser=sleepy, max_rows=2, max_queue=2)
    with client:
        body = {"classes": "all", "n": 2, "steps": 100}
        workers = [threading.Thread(target=client.post, args=("/v1/generate",), kwargs={"json": body})
                   for _ in range(2)]
        deadline = time.monotonic() + 10
        for w, ready in zip(workers, (lambda: service.scheduler.in_flight == 2, lambda: service.scheduler.queued == 2)):
            w.start()  # the first fills the batch, then the second waits in the queue
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert service.scheduler.in_flight == 2 and service.scheduler.queued == 2
        time.sleep(0.3)  # some ticks: an admission rate to measure (nothing admitted while the batch is full)
        r = client.post("/v1/generate", json={"classes": "all", "n": 1, "steps": 1})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "retry in" in r.json()["detail"]
        for w in workers:
            w.join()
        with service.lock:
            service._admissions.clear()
            service._admissions.extend([(100.0, 10), (104.0, 30)])  # measured: 5 images admitted per second
            assert service.retry_after(12) == 3 and service.retry_after(1) == 1 and service.retry_after(10 ** 6) == 600
            service._admissions.clear()
            assert service.retry_after(50) == 1  # nothing measured yet
