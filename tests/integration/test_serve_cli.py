"""`trt-dm serve` as a process on loopback: answers, drains on SIGTERM."""
import pytest

pytest.importorskip("fastapi")


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


@pytest.mark.parametrize("kind", ["class", "unconditional", "text"])
def test_the_openapi_document_is_the_services_contract_schemathesis(tiny_cls_pipeline_dir, tiny_pipeline_dir,
                                                                      tiny_sd_pipeline_dir, tmp_path, kind):
    """Schemathesis (an outside fuzzer) against the real `trt-dm serve` on loopback, from the service's own OpenAPI
    document, with every check: valid bodies are served, invalid ones refused, and every response (status, media
    type, body, headers) is one the document describes. Bounded: its own seed, 15 examples per operation."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time

    import httpx
    st = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    if st is None:  # CI installs the [test] extra: there a missing fuzzer is a failure
        assert not os.environ.get("CI"), "schemathesis is not installed (pip install -e '.[test]')"
        pytest.skip("schemathesis is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = {"class": tiny_cls_pipeline_dir, "unconditional": tiny_pipeline_dir, "text": tiny_sd_pipeline_dir}[kind]
    proc = subprocess.Popen([sys.executable, "-m", "trt_dm.cli", "serve", "--model", str(model), "--port", str(port),
                             "--max-rows", "64", "--max-n", "4", "--max-queue", "8", "--max-steps", "20",
                             "--device", "cpu",
                             "--api-key", "k3y"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        run = subprocess.run([st, "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "15", "--seed",
                              "7", "--request-timeout", "60", "--max-response-time", "60",  # its 10 s default: a
                              "-H", "Authorization: Bearer k3y",  # timing check, which busy shared cores fail
                              "--report-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)  # its example database (.schemathesis/) stays out of the checkout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert run.returncode == 0, run.stdout[-6000:]
    assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]
