"""`make serve-bench`: step-level vs request-level vs no batching, same runner, same run, on loopback.

    python tools/serve_bench.py [--onnx engines/default-ptq4dm.ort-int8.onnx] [--clients 1 4 16] [--threads 2]
    python tools/serve_bench.py --openvino engines/default-ptq4dm.fp32.onnx --section openvino ...

Starts one `trt-dm serve` per batching policy (step: the service's continuous step-level batching; request:
whole requests batched as they arrive, Triton-style; none: one request at a time), all on 127.0.0.1 with the same
model and runner (by default the ONNX Runtime int8 graph of the default model, built with `trt-dm export --target
ort-cpu` when missing; with --openvino, the TensorRT-layout Q/DQ graph in OpenVINO, built with `trt-dm export
--target openvino --recipe ptq4dm` when missing). For each client count, the policies run one after another in a rotating order, each
under the same bounded load: every client sends --requests requests one after another, the clients starting
--stagger seconds apart (staggered arrivals), each request --n images of --steps DDIM steps with its own seed
(given several values, requests cycle through them: a mixed workload);
a hard --time-limit ends a run; each server first gets an untimed warm-up load. Reported: images/s (images over the run's wall time), p50 / p99 request latency,
and the mean rows per UNet call (from the server's Prometheus metrics). Writes a Markdown section into
BENCHMARKS.md between the markers of its --section (`uniform`: every request alike; `mixed`: step counts and
image counts vary, as they do between real users) and the raw numbers to docs/bench/serve-<section>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("step", "request", "none")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def start(policy: str, args) -> tuple[subprocess.Popen, str]:
    port = _port()
    graph = ["--openvino", str(args.openvino)] if args.openvino else ["--onnx", str(args.onnx)]
    cmd = [sys.executable, "-m", "trt_dm.cli", "serve", "--model", args.model, *graph,
           "--batching", policy, "--port", str(port), "--max-rows", str(args.max_rows), "--max-queue", "100000",
           "--threads", str(args.threads), "--timeout", str(args.time_limit),
           *(["--ort-spin"] if args.ort_spin else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"trt-dm serve --batching {policy} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"trt-dm serve --batching {policy} was not ready in 300 s")


def load(url: str, clients: int, args) -> dict:
    """Bounded load: ``clients`` threads, each ``args.requests`` requests in a row, staggered starts."""
    before = httpx.get(f"{url}/metrics", timeout=10).text
    latencies: list[float] = []
    errors: list[str] = []
    images: list[int] = []
    lock = threading.Lock()
    t_end = time.monotonic() + args.time_limit

    def client(k: int) -> None:
        time.sleep(k * args.stagger)
        with httpx.Client(timeout=args.time_limit) as c:
            for r in range(args.requests):
                if time.monotonic() > t_end:
                    return
                i = k * args.requests + r
                n, steps = args.n[i % len(args.n)], args.steps[(i // len(args.n)) % len(args.steps)]
                body = {"n": n, "steps": steps, "seed": 1000 * k + 10 * r, "output": "json"}
                t0 = time.perf_counter()
                try:
                    resp = c.post(f"{url}/v1/generate", json=body)
                    ok = resp.status_code == 200
                except httpx.HTTPError as e:
                    ok, resp = False, e
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                        images.append(n)
                    else:
                        errors.append(str(resp))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/metrics", timeout=10).text
    rows = _metric(after, "trt_dm_unet_batch_rows_sum") - _metric(before, "trt_dm_unet_batch_rows_sum")
    calls = _metric(after, "trt_dm_unet_batch_rows_count") - _metric(before, "trt_dm_unet_batch_rows_count")
    lat = sorted(latencies)
    q = (lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan"))  # noqa: E731
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "wall_s": wall,
            "images_per_s": sum(images) / wall, "p50_s": statistics.median(lat) if lat else float("nan"),
            "p99_s": q(0.99), "mean_rows": rows / calls if calls else 0.0, "unet_calls": calls}


def _alts(values: list[int]) -> str:
    return " / ".join(map(str, values))


def markdown(results: dict, args) -> str:
    runner = (f"OpenVINO int8 (`{Path(args.openvino).name}`, default streams)" if args.openvino
              else f"ONNX Runtime (`{Path(args.onnx).name}`, threads {'spinning' if args.ort_spin else 'sleeping'} "
                   "between calls)")
    lines = [f"Model `{args.model}`, runner {runner}, {args.threads} threads; each client "
             f"sends {args.requests} requests of {_alts(args.n)} image(s), DDIM {_alts(args.steps)} steps"
             f"{' (cycled per request)' if len(args.n) > 1 or len(args.steps) > 1 else ''}, clients {args.stagger} s "
             f"apart; server max {args.max_rows} rows per UNet call. Policies measured one after another per client "
             "count, in a rotating order, in one run.", "",
             "| clients | batching | images/s | p50 latency (s) | p99 latency (s) | mean rows per UNet call | step vs this |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for c, per in results.items():
        step = per["step"]["images_per_s"]
        for policy in POLICIES:
            r = per[policy]
            ratio = "" if policy == "step" else f"{step / r['images_per_s']:.2f}x"
            lines.append(f"| {c} | {policy} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                         f"{r['mean_rows']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--onnx", type=Path, default=ROOT / "engines" / "default-ptq4dm.ort-int8.onnx")
    ap.add_argument("--openvino", type=Path, default=None,
                    help="serve this Q/DQ graph in OpenVINO instead (e.g. engines/default-ptq4dm.fp32.onnx)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--n", type=int, nargs="+", default=[1], help="images per request (several: cycled)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20], help="DDIM steps per request (several: cycled)")
    ap.add_argument("--section", default="uniform", help="which BENCHMARKS.md section (and json) to write")
    ap.add_argument("--stagger", type=float, default=0.05, help="seconds between client starts")
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--ort-spin", action="store_true", help="serve with ONNX Runtime's threads spinning between calls "
                                                             "(its default; trt-dm serve's is off)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds one load run may take at most")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    if args.openvino and not args.openvino.exists():
        print(f"building {args.openvino} (trt-dm export --target openvino --recipe ptq4dm)")
        subprocess.check_call([sys.executable, "-m", "trt_dm.cli", "export", "--target", "openvino", "--recipe",
                               "ptq4dm", "--model", args.model, "--out-dir", str(args.openvino.parent), "--threads",
                               str(args.threads), "--no-progress"], cwd=ROOT)
    elif not args.openvino and not args.onnx.exists():
        print(f"building {args.onnx} (trt-dm export --target ort-cpu)")
        subprocess.check_call([sys.executable, "-m", "trt_dm.cli", "export", "--target", "ort-cpu", "--model", args.model,
                               "--out-dir", str(args.onnx.parent), "--threads", str(args.threads), "--no-progress"],
                              cwd=ROOT)
    servers = {p: start(p, args) for p in POLICIES}
    results: dict = {}
    try:
        for proc, url in servers.values():  # untimed: first calls of a fresh session are slower
            load(url, 2, argparse.Namespace(**{**vars(args), "requests": 2}))
        for i, c in enumerate(args.clients):
            order = POLICIES[i % 3:] + POLICIES[:i % 3]
            results[c] = {}
            for policy in order:
                results[c][policy] = r = load(servers[policy][1], c, args)
                print(f"clients {c:3d} {policy:8s}: {r['images_per_s']:6.2f} images/s, p50 {r['p50_s']:.2f} s, "
                      f"p99 {r['p99_s']:.2f} s, {r['mean_rows']:.1f} rows per call, {r['errors']} errors", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    md = markdown(results, args)
    print(md)
    out = ROOT / "docs" / "bench" / f"serve-{args.section}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1) + "\n")
    text = args.out.read_text() if args.out.exists() else ""
    a, b = f"<!-- serve-bench:{args.section}:begin -->\n", f"<!-- serve-bench:{args.section}:end -->"
    section = f"### Workload: {args.section}\n\n{a}{md}{b}\n"
    if a in text and b in text:
        text = text[:text.index(a)] + a + md + text[text.index(b):]
    else:
        text = text.rstrip() + "\n\n" + section
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
