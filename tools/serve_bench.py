"""`make serve-bench`: step-level vs request-level vs no batching, same runner, same run, on loopback.

    python tools/serve_bench.py [--onnx engines/default-ptq4dm.ort-int8.onnx] [--clients 1 4 16] [--threads 2]
    python tools/serve_bench.py --openvino engines/default-ptq4dm.fp32.onnx --section openvino ...

Starts one `trt-dm serve` per batching policy (step: the service's continuous step-level batching; request:
whole requests batched as they arrive, Triton-style; none: one request at a time), all on 127.0.0.1 with the same
model and runner (by default the ONNX Runtime int8 graph of the default model, built with `trt-dm export --target
ort-cpu` when missing; with --openvino, the TensorRT-layout Q/DQ graph in OpenVINO, built with `trt-dm export
--target openvino --recipe ptq4dm` when missing). For each client count, the policies run one after another in
a rotating order, each under the same bounded load: every client sends --requests requests one after another,
the clients starting --stagger seconds apart (staggered arrivals), each request --n images of --steps DDIM steps
with its own seed (given several values, requests cycle through them: a mixed workload);
a hard --time-limit ends a run; each server first gets an untimed warm-up load. With --loads, each policy also
gets open-loop loads: --open-requests requests arriving as a Poisson process (exponential gaps from a fixed seed) at
each given fraction of the saturated runner's image-steps/s (below), each on its own connection, whatever the
server's state (arrivals do not wait for answers, so a load past the capacity shows as growing queues and latency,
not as fewer requests).

The yardstick is the runner itself: before the servers start, the same graph is opened in this process as `trt-dm
serve` opens it (same runner, threads, spinning) and timed alone at every batch size up to --max-rows; its best
image-steps/s is the *saturated* throughput. Reported per load and policy: image-steps/s served (images x steps
over the run's wall time) and **efficiency** = served / saturated, p50 / p99 request latency, p50 / p99
**admission latency** (arrival to the request's first UNet call: each answer's X-TRT-DM-Queue-Time header; its p99
also in UNet calls of that run), the mean rows per UNet call and the share of the wall time the server spent in UNet
calls (*busy*; both from the server's Prometheus metrics: an efficiency below busy means the calls themselves ran
slower than alone, at their batch size or from contention), and for a mixed workload the latency p99 of the
shortest requests (what step-level batching should keep low). Writes a Markdown section into BENCHMARKS.md
between the markers of its --section (`uniform`: every request alike; `mixed`: step counts and image counts vary,
as they do between real users) and the raw numbers to docs/bench/serve-<section>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
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


def start(policy: str, args) -> tuple[subprocess.Popen, str, dict]:
    """One `trt-dm serve --batching policy` on a free loopback port, once ready: (process, url, its /v1/models)."""
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
                return proc, url, httpx.get(f"{url}/v1/models", timeout=10).json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"trt-dm serve --batching {policy} was not ready in 300 s")


def load(url: str, clients: int, args) -> dict:
    """Bounded load: ``clients`` threads, each ``args.requests`` requests in a row, staggered starts."""
    before = httpx.get(f"{url}/metrics", timeout=10).text
    rec = _Record()
    t_end = time.monotonic() + args.time_limit

    def client(k: int) -> None:
        time.sleep(k * args.stagger)
        with httpx.Client(timeout=args.time_limit) as c:
            for r in range(args.requests):
                if time.monotonic() > t_end:
                    return
                i = k * args.requests + r
                rec.send(c, url, args, i, seed=1000 * k + 10 * r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return rec.summary(url, before, time.perf_counter() - t0) | {"clients": clients}


def open_loop(url: str, rate: float, args) -> dict:
    """Open-loop load: ``args.open_requests`` requests arriving as a Poisson process of ``rate`` requests/s (gaps
    drawn from a fixed seed, so every policy gets the same arrival times), each sent at its time on a connection of
    its own whatever the earlier ones' state; the run ends when all have answered or at --time-limit."""
    before = httpx.get(f"{url}/metrics", timeout=10).text
    rec = _Record()
    gaps = random.Random(int(rate * 1000)).expovariate
    arrivals, t = [], 0.0
    for _ in range(args.open_requests):
        arrivals.append(t)
        t += gaps(rate)
    t0 = time.perf_counter()

    def one(i: int) -> None:
        time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
        with httpx.Client(timeout=args.time_limit) as c:
            rec.send(c, url, args, i, seed=7000 + 10 * i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(arrivals))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(1.0, args.time_limit - (time.perf_counter() - t0)))
    return rec.summary(url, before, time.perf_counter() - t0) | {"rate": rate}


class _Record:
    """What one load run's requests got back: latency, admission latency (the answer's X-TRT-DM-Queue-Time),
    images and image-steps of the answered ones, errors of the others."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: list[float] = []
        self.by_steps: dict[int, list[float]] = {}  # latency per request step count (the mixed workload's classes)
        self.admission: list[float] = []
        self.images = self.image_steps = 0
        self.errors: list[str] = []

    def send(self, c: httpx.Client, url: str, args, i: int, seed: int) -> None:
        """Request ``i`` of the workload (image and step counts cycled as --n and --steps say)."""
        n, steps = args.n[i % len(args.n)], args.steps[(i // len(args.n)) % len(args.steps)]
        t0 = time.perf_counter()
        try:
            resp = c.post(f"{url}/v1/generate", json={"n": n, "steps": steps, "seed": seed, "output": "json"})
            ok = resp.status_code == 200
        except httpx.HTTPError as e:
            ok, resp = False, e
        with self.lock:
            if ok:
                self.latency.append(time.perf_counter() - t0)
                self.by_steps.setdefault(steps, []).append(self.latency[-1])
                self.admission.append(float(resp.headers["x-trt-dm-queue-time"]))
                self.images += n
                self.image_steps += n * steps
            else:
                self.errors.append(str(resp))

    def summary(self, url: str, before: str, wall: float) -> dict:
        after = httpx.get(f"{url}/metrics", timeout=10).text
        rows = _metric(after, "trt_dm_unet_batch_rows_sum") - _metric(before, "trt_dm_unet_batch_rows_sum")
        calls = _metric(after, "trt_dm_unet_batch_rows_count") - _metric(before, "trt_dm_unet_batch_rows_count")
        busy = _metric(after, "trt_dm_unet_call_seconds_sum") - _metric(before, "trt_dm_unet_call_seconds_sum")
        lat, adm = _quantiles(self.latency), _quantiles(self.admission)
        return {"requests": len(self.latency), "errors": len(self.errors), "wall_s": wall,
                "images_per_s": self.images / wall, "image_steps_per_s": self.image_steps / wall,
                "p50_s": lat(0.5), "p99_s": lat(0.99), "admission_p50_s": adm(0.5), "admission_p99_s": adm(0.99),
                "mean_rows": rows / calls if calls else 0.0, "unet_calls": calls,
                "seconds_per_call": wall / calls if calls else float("nan"),
                "busy_share": busy / wall, "rows_per_busy_s": rows / busy if busy else 0.0,
                "unet_call_s": busy / calls if calls else float("nan"),
                "p99_by_steps_s": {k: _quantiles(v)(0.99) for k, v in sorted(self.by_steps.items())}}


def _quantiles(values: list[float]):
    v = sorted(values)
    return lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))] if v else float("nan")


def saturated(args) -> dict:
    """The runner alone: the served graph opened in this process as `trt-dm serve` opens it (same runner, threads,
    spinning), timed at batch sizes 1, 2, 4, ... up to --max-rows (each >= --sat-seconds of calls after 3 untimed
    ones). Returns its image-steps/s per batch size and the best."""
    import torch

    from trt_dm import api
    loaded = api.load(args.model)
    graph = {"openvino": str(args.openvino)} if args.openvino else {"onnx": str(args.onnx)}
    curve: dict[int, float] = {}
    with api.open_denoiser(loaded, threads=args.threads, ort_spin=args.ort_spin, **graph) as den:
        b = 1
        while b <= args.max_rows:
            x = torch.randn(b, *loaded.sample_shape, generator=torch.Generator().manual_seed(b))
            t = torch.full((b,), 500, dtype=torch.long)
            for _ in range(3):
                den(x, t)
            calls, t0 = 0, time.perf_counter()
            while calls < 5 or time.perf_counter() - t0 < args.sat_seconds:
                den(x, t)
                calls += 1
            curve[b] = b * calls / (time.perf_counter() - t0)
            b *= 2
    best = max(curve, key=curve.get)
    return {"curve": curve, "best_batch": best, "image_steps_per_s": curve[best]}


def yardstick(before: dict, after: dict) -> dict:
    """The saturated throughput the service is measured by: per batch size the faster of the runner-alone runs
    before the servers start and after they stop (a shared machine's slow spell in one of them would otherwise
    flatter every efficiency), and the best of that curve."""
    curve = {b: max(before["curve"][b], after["curve"][b]) for b in before["curve"]}
    best = max(curve, key=curve.get)
    return {"curve": curve, "best_batch": best, "image_steps_per_s": curve[best], "before": before, "after": after}


def _alts(values: list[int]) -> str:
    return " / ".join(map(str, values))


def markdown(results: dict, args, sat: dict, served: dict) -> str:
    runner = (f"OpenVINO int8 (`{Path(args.openvino).name}`, default streams)" if args.openvino
              else f"ONNX Runtime (`{Path(args.onnx).name}`, threads {'spinning' if args.ort_spin else 'sleeping'} "
                   "between calls)")
    curve = ", ".join(f"{b}: {v:.0f}" for b, v in sat["curve"].items())
    mixed = len(args.steps) > 1
    short = min(args.steps)
    lines = [f"Model `{args.model}`, runner {runner}, {args.threads} threads; requests of {_alts(args.n)} image(s), "
             f"DDIM {_alts(args.steps)} steps{' (cycled per request)' if max(len(args.n), len(args.steps)) > 1 else ''}"
             f"; server max {args.max_rows} rows per UNet call. Closed loop: each client sends {args.requests} "
             f"requests one after another, clients {args.stagger} s apart; open loop: {args.open_requests} Poisson "
             "arrivals at the given share of the saturated throughput. Policies measured one after another per load, "
             "in a rotating order, in one run.",
             "", f"Saturated runner (the same graph alone in one process, image-steps/s by batch size, the faster of "
             f"{args.sat_seconds:g} s of calls before the servers start and after they stop): {curve}; best "
             f"**{sat['image_steps_per_s']:.0f} image-steps/s** at batch {sat['best_batch']}. Efficiency = served "
             "image-steps/s / that. Busy: the share of the run's wall time the server spent in UNet calls. "
             "Admission latency: arrival to the request's first UNet call, p99 also in mean UNet calls of that run."
             + (f" Short p99: the latency p99 of the {short}-step requests." if mixed else ""), "",
             "| load | batching | image-steps/s | efficiency | busy | p50 / p99 latency (s) | "
             + ("short p99 (s) | " if mixed else "") + "p50 / p99 admission (s) | p99 admission (calls) | "
             "rows per call | errors |",
             "|---|---|---:|---:|---:|---:|" + ("---:|" if mixed else "") + "---:|---:|---:|---:|"]
    for load_name, per in results.items():
        for policy in POLICIES:
            r = per[policy]
            eff = r["image_steps_per_s"] / sat["image_steps_per_s"]
            short_p99 = r["p99_by_steps_s"].get(short, float("nan"))
            lines.append(f"| {load_name} | {policy} | {r['image_steps_per_s']:.0f} | {eff:.2f} | "
                         f"{r['busy_share']:.2f} | {r['p50_s']:.2f} / {r['p99_s']:.2f} | "
                         + (f"{short_p99:.2f} | " if mixed else "")
                         + f"{r['admission_p50_s']:.3f} / {r['admission_p99_s']:.3f} | "
                         f"{r['admission_p99_s'] / r['unet_call_s']:.1f} | {r['mean_rows']:.1f} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--onnx", type=Path, default=ROOT / "engines" / "default-ptq4dm.ort-int8.onnx")
    ap.add_argument("--openvino", type=Path, default=None,
                    help="serve this Q/DQ graph in OpenVINO instead (e.g. engines/default-ptq4dm.fp32.onnx)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests", type=int, default=16, help="requests per client")
    ap.add_argument("--n", type=int, nargs="+", default=[1], help="images per request (several: cycled)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20], help="DDIM steps per request (several: cycled)")
    ap.add_argument("--section", default="uniform", help="which BENCHMARKS.md section (and json) to write")
    ap.add_argument("--stagger", type=float, default=0.05, help="seconds between client starts")
    ap.add_argument("--loads", type=float, nargs="*", default=[],
                    help="open-loop loads as fractions of the saturated runner's throughput (e.g. 0.5 0.8 1 1.25): "
                         "Poisson arrivals at that many image-steps/s")
    ap.add_argument("--open-requests", type=int, default=100, help="requests per open-loop load")
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--ort-spin", action="store_true", help="serve with ONNX Runtime's threads spinning between calls "
                                                             "(its default; trt-dm serve's is off)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sat-seconds", type=float, default=3.0,
                    help="seconds of calls per batch size when timing the runner alone (before and after the loads)")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds one load run may take at most")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    # a SIGTERM (kill, a CI timeout) ends the run through the `finally` below, which stops the servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.openvino and not args.openvino.exists():
        print(f"building {args.openvino} (trt-dm export --target openvino --recipe ptq4dm)")
        subprocess.check_call([sys.executable, "-m", "trt_dm.cli", "export", "--target", "openvino", "--recipe",
                               "ptq4dm", "--model", args.model, "--out-dir", str(args.openvino.parent), "--threads",
                               str(args.threads), "--no-progress"], cwd=ROOT)
    elif not args.openvino and not args.onnx.exists():
        print(f"building {args.onnx} (trt-dm export --target ort-cpu)")
        subprocess.check_call([sys.executable, "-m", "trt_dm.cli", "export", "--target", "ort-cpu", "--model",
                               args.model, "--out-dir", str(args.onnx.parent), "--threads", str(args.threads),
                               "--no-progress"], cwd=ROOT)
    sat = saturated(args)  # before the servers start: the runner alone on the cores (again after they stop)
    print(f"saturated runner (before): {sat['image_steps_per_s']:.0f} image-steps/s at batch {sat['best_batch']} "
          f"({sat['curve']})", flush=True)
    servers = {p: start(p, args) for p in POLICIES}
    served = {p: info for p, (_, _, info) in servers.items()}
    results: dict = {}
    per_request = sum(args.n[i % len(args.n)] * args.steps[(i // len(args.n)) % len(args.steps)]
                      for i in range(len(args.n) * len(args.steps))) / (len(args.n) * len(args.steps))
    rates = {f: f * sat["image_steps_per_s"] / per_request for f in args.loads}  # requests/s
    loads = [(f"{c} clients", lambda url, c=c: load(url, c, args)) for c in args.clients] + \
            [(f"open {f:g}x ({rate:.1f} req/s)", lambda url, rate=rate: open_loop(url, rate, args))
             for f, rate in rates.items()]
    try:
        for proc, url, _ in servers.values():  # untimed: first calls of a fresh session are slower
            load(url, 2, argparse.Namespace(**{**vars(args), "requests": 2}))
        for i, (name, run) in enumerate(loads):
            order = POLICIES[i % 3:] + POLICIES[:i % 3]
            results[name] = {}
            for policy in order:
                results[name][policy] = r = run(servers[policy][1])
                print(f"{name:>12s} {policy:8s}: {r['image_steps_per_s']:6.0f} image-steps/s "
                      f"(efficiency {r['image_steps_per_s'] / sat['image_steps_per_s']:.2f}, busy "
                      f"{r['busy_share']:.2f}), p50 {r['p50_s']:.2f} s, "
                      f"p99 {r['p99_s']:.2f} s, admission p99 {r['admission_p99_s']:.3f} s, "
                      f"{r['mean_rows']:.1f} rows per call, {r['errors']} errors", flush=True)
    finally:
        for proc, _, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in servers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    after = saturated(args)
    print(f"saturated runner (after): {after['image_steps_per_s']:.0f} image-steps/s at batch {after['best_batch']} "
          f"({after['curve']})", flush=True)
    sat = yardstick(sat, after)
    md = markdown(results, args, sat, served)
    print(md)
    out = ROOT / "docs" / "bench" / f"serve-{args.section}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": _machine(),
                               "saturated": sat, "served": served, "results": results}, indent=1) + "\n")
    text = args.out.read_text() if args.out.exists() else ""
    a, b = f"<!-- serve-bench:{args.section}:begin -->\n", f"<!-- serve-bench:{args.section}:end -->"
    section = f"### Workload: {args.section}\n\n{a}{md}{b}\n"
    if a in text and b in text:
        text = text[:text.index(a)] + a + md + text[text.index(b):]
    else:
        text = text.rstrip() + "\n\n" + section
    args.out.write_text(text)
    return 0


def _machine() -> dict:
    """The CPU and its int8 flags: numbers compare only within one run on one machine."""
    from trt_dm.eval.profile import machine
    m = machine()
    return {k: m[k] for k in ("cpu", "cpu_count", "cpu_flags", "int8_isa")}


if __name__ == "__main__":
    sys.exit(main())
