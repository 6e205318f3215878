"""`trt-dm profile`: latency, sampling throughput, sampler overhead and peak memory of every runner here.

    trt-dm profile --arch default --arch ddpm-cifar10 --batches 1 8 32 --threads 2 --out-dir bench/

Runners (those the machine has): torch fp32 (CPU); ONNX Runtime fp32, int8 in ONNX Runtime's layout
(``trt_dm.ortcpu``: uint8 activations, Q/DQ around inputs and outputs; the recipe's layers, or all ops)
and int8 in the TensorRT layout
(Q/DQ on inputs only, what `make engine` deploys) on CPU; with OpenVINO installed, OpenVINO fp32 and bf16
(the unquantized graph; bf16 only on CPUs with native bf16, else a note says why it is missing) and int8 (the
same TensorRT-layout graph, FP32 math); on a GPU torch fp16, torch fp16 replayed as a
CUDA graph, and TensorRT FP16 / int8 engines (``--engine``). Speed does not depend on weight values, so
the benchmark architectures use random weights, and the int8 graphs get ranges from random inputs.

Per runner and batch: UNet-call latency (median, p90 and fastest of ``--iters`` calls after ``--warmup``),
the runners timed in interleaved rounds (an untimed call, then up to 3 timed ones, runner after runner) so
that changing load hits all of them alike; one sampling run (DDIM, ``--steps``) at the largest batch,
runner by runner: images/s, the share of time outside the UNet, and peak RSS during it (Linux VmHWM,
reset before it; all runners are loaded) and, on CUDA, peak GPU memory. Results: profile.json,
profile.md, profile.png in the output folder, with the machine described.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from trt_dm.core.cpu import cpu_int8_isa
from trt_dm.core.guidance import Guidance, cfg_denoiser
from trt_dm.core.io import atomic_write
from trt_dm.core.ranges import RangeGroup, RangeSet
from trt_dm.core.schedule import Schedule
from trt_dm.core.signature import Signature
from trt_dm.core.stages import rss_now_mb as _rss_now_mb
from trt_dm.core.stages import rss_peak_mb as _rss_peak_mb
from trt_dm.core.stages import rss_reset as _rss_reset
from trt_dm.export.onnx import export_onnx
from trt_dm.export.ort_int8 import export_ort_int8
from trt_dm.models.builders import build_arch
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.modules import activation_quantizers, apply_ranges, observing, quantize_model, quantized_layers
from trt_dm.quant.onegraph import one_graph
from trt_dm.quant.sensitivity import layer_macs
from trt_dm.runtime.base import Runner, SwitchedRunner, as_denoiser
from trt_dm.runtime.openvino import OpenVinoRunner
from trt_dm.runtime.ort import OrtRunner
from trt_dm.runtime.tensorrt import TrtRunner
from trt_dm.runtime.torch_runner import CudaGraphTorchRunner, TorchRunner
from trt_dm.sampling import sample

PROFILE_VERSION = 1


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    import onnxruntime
    flags = set()
    with contextlib.suppress(OSError):
        flags = set(Path("/proc/cpuinfo").read_text().split())
    try:
        import openvino
        ov_version = openvino.get_version().split("-")[0]
    except ImportError:
        ov_version = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_flags": sorted(flags & _ISA_FLAGS), "int8_isa": cpu_int8_isa(), "gpu": gpu, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": ov_version,
            "python": platform.python_version(), "platform": platform.platform()}


# what decides int8 / bf16 speed on a CPU: VNNI / AMX int8 dot products, native bf16
_ISA_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
              "amx_int8", "amx_tile"}


def feed_for(unet, batch: int, seed: int = 0, seq_len: int = 77, spread: int | None = None) -> dict[str, torch.Tensor]:
    """A seeded feed of ``batch`` rows from the UNet's signature, every row at t = 500, or with ``spread`` = T the
    rows' timesteps evenly over [0, T - 1] (a service's mixed batch: rows of every timestep group in one call)."""
    feed = Signature.from_unet(unet).example(batch, seed=seed, seq_len=seq_len, timestep=500)
    if spread:
        t = feed["timestep"]
        feed["timestep"] = torch.linspace(spread - 1, 0, t.numel()).round().reshape(t.shape).to(t.dtype)
    return feed


def cpu_runners(unet, tmp: Path, threads: int, calib_batches: int = 2, notes: list[str] | None = None,
                steps: int = 1000) -> dict[str, Callable[[], Runner]]:
    """Factories of the CPU runners for ``unet``: torch fp32, ORT fp32, ORT int8 (ORT layout), ORT int8
    (TensorRT layout), and with OpenVINO installed OpenVINO fp32, bf16 (CPUs with native bf16) and int8 (the
    TensorRT-layout graph). The int8 graphs are made here, with ranges from random inputs. Why a runner is
    missing is appended to ``notes``; ``steps``: the schedule's timesteps, which the group graphs divide."""
    import copy

    fp32 = export_onnx(unet, tmp / "fp32.onnx")
    feeds = [feed_for(unet, 2, seed=i) for i in range(calib_batches)]
    qcfg = QuantConfig()
    q = quantize_model(copy.deepcopy(unet), qcfg)
    apply_ranges(q, _observed_amax(q, feeds))
    trt_layout = export_onnx(q, tmp / "int8-trt-layout.onnx")
    onegraph, group_graphs, t_ranges = _group_layouts(unet, qcfg, feeds, tmp, steps=steps)
    ort_layout = export_ort_int8(unet, tmp / "int8-ort.onnx", feeds, layers=set(quantized_layers(q)))
    ort_all = export_ort_int8(unet, tmp / "int8-ort-all.onnx", feeds, layers=set(quantized_layers(q)), ops="all")
    out: dict[str, Callable[[], Runner]] = {
        "torch-fp32": lambda: TorchRunner(unet, device="cpu", dtype=torch.float32, name="torch"),
        "ort-fp32": lambda: OrtRunner(fp32, threads=threads, name="ort-fp32"),
        "ort-int8": lambda: OrtRunner(ort_layout, threads=threads, name="ort-int8"),
        "ort-int8-all-ops": lambda: OrtRunner(ort_all, threads=threads, name="ort-int8-all-ops"),
        "ort-int8-trt-layout": lambda: OrtRunner(trt_layout, threads=threads, name="ort-int8-trt-layout"),
    }
    out.update(openvino_runners(fp32, trt_layout, threads, notes if notes is not None else [], onegraph=onegraph,
                                groups=(group_graphs, t_ranges)))
    return out


def _group_layouts(unet, qcfg, feeds: list[dict], tmp: Path, groups: int = 4, steps: int = 1000
                   ) -> tuple[Path, list[Path], list[tuple[int, int]]]:
    """The two deployments of a ``groups``-range-set recipe in the TensorRT layout, ranges from the random ``feeds``
    run at each group's middle timestep: its one-graph form (one graph, a per-row input scale looked up by timestep;
    ``trt_dm.onegraph``: what the default recipe deploys to TensorRT) and its ``groups`` plain graphs, one per group
    (``--group-engines``: switched by timestep at run time). Returns (one graph, the group graphs, their t ranges);
    each group graph costs what the plain graph costs, so the one graph's cost against it is the lookup's price."""
    import copy

    q = quantize_model(copy.deepcopy(unet), qcfg)
    sets = []
    for k in range(groups):
        t_max, t_min = steps - 1 - k * steps // groups, steps - (k + 1) * steps // groups
        at_t = [{**f, "timestep": torch.full_like(f["timestep"], (t_max + t_min) // 2)} for f in feeds]
        sets.append(RangeGroup(_observed_amax(q, at_t), t_max=t_max, t_min=t_min))
    paths = []
    for k, g in enumerate(sets):
        apply_ranges(q, g.amax)
        paths.append(export_onnx(q, tmp / f"int8-trt-g{k}.onnx"))
    one = export_onnx(one_graph(q, RangeSet(tuple(sets))), tmp / "int8-trt-onegraph.onnx")
    return one, paths, [(g.t_max, g.t_min) for g in sets]


def _observed_amax(q, feeds: list[dict]) -> dict[str, float]:
    """{activation quantizer: abs-max of its input over ``feeds``} (1.0 where it saw none or only zeros), from the
    full-precision pass of the fake-quant model ``q``."""
    amax: dict[str, float] = {}
    with observing(q, lambda n, x: amax.__setitem__(n, max(amax.get(n, 0.0), float(x.abs().max())))), torch.no_grad():
        for f in feeds:
            q(**f)
    return {n: amax.get(n, 1.0) or 1.0 for n in activation_quantizers(q)}


def openvino_runners(fp32: Path, int8: Path, threads: int, notes: list[str], onegraph: Path | None = None,
                     groups: tuple[list[Path], list[tuple[int, int]]] | None = None) -> dict[str, Callable[[], Runner]]:
    """OpenVINO fp32 and bf16 on the unquantized graph ``fp32``, int8 on the TensorRT-layout graph ``int8`` (FP32
    math, and on CPUs with native bf16 also bf16 math: ``ov-int8-bf16``), on its one-graph form ``onegraph`` and on
    its K group graphs ``groups`` (paths, t ranges; ``ov-int8-groups``: switched by each row's timestep) when given,
    each with the runner's default streams and compiled into a cache beside its graph; with >= 2 threads also int8
    in one stream (``ov-int8-1stream``); none without OpenVINO, no bf16 math without native bf16."""
    try:
        import openvino as ov
    except ImportError:
        notes.append("OpenVINO rows: openvino is not installed (pip install 'trt_dm[openvino]')")
        return {}

    def ov_runner(graph: Path, name: str, precision: str = "fp32", **kw) -> Callable[[], Runner]:
        return lambda: OpenVinoRunner(graph, threads=threads, precision=precision, name=name, **kw)

    def ov_groups(name: str, precision: str = "fp32") -> Callable[[], Runner]:
        paths, t_ranges = groups
        return lambda: SwitchedRunner([OpenVinoRunner(p, threads=threads, precision=precision, name=f"{name}-g{k}")
                                       for k, p in enumerate(paths)], t_ranges, name=name)

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    bf16 = "BF16" in caps
    out = {"ov-fp32": ov_runner(fp32, "ov-fp32")}
    if bf16:
        out["ov-bf16"] = ov_runner(fp32, "ov-bf16", "bf16")
    else:  # OpenVINO does not emulate bf16: asked for it, it compiles f32, and the row would be ov-fp32 again
        notes.append(f"ov-bf16, ov-int8-bf16: this CPU has no native bf16 (OpenVINO's capabilities: "
                     f"{', '.join(caps)}); OpenVINO runs f32 when asked for bf16, so the rows are left out")
    out["ov-int8"] = ov_runner(int8, "ov-int8")
    if bf16:
        out["ov-int8-bf16"] = ov_runner(int8, "ov-int8-bf16", "bf16")
    if threads >= 2:  # the rows above split a call over 2 streams; this one runs it as one request on all threads
        out["ov-int8-1stream"] = ov_runner(int8, "ov-int8-1stream", streams=1)
    if onegraph is not None:
        out["ov-int8-onegraph"] = ov_runner(onegraph, "ov-int8-onegraph")
    if groups is not None:
        out["ov-int8-groups"] = ov_groups("ov-int8-groups")
        if bf16:
            out["ov-int8-groups-bf16"] = ov_groups("ov-int8-groups-bf16", "bf16")
    return out


def gpu_runners(unet, engines: list[str]) -> dict[str, Callable[[], Runner]]:
    """GPU runners; each torch one gets its own copy of the UNet (a TorchRunner moves its module to its device
    and dtype, and the CPU fp32 row must keep the original)."""
    import copy
    out: dict[str, Callable[[], Runner]] = {
        "torch-fp16": lambda: TorchRunner(copy.deepcopy(unet), device="cuda", dtype=torch.float16),
        "torch-fp16-graph": lambda: CudaGraphTorchRunner(copy.deepcopy(unet)),
    }
    for plan in engines:
        out[f"trt-{Path(plan).stem}"] = lambda plan=plan: TrtRunner(plan, cuda_graph=True, eager_kernels=True)
    return out


def _time_interleaved(active: dict[str, Runner], feed: dict, warmup: int, iters: int, *, block: int = 3,
                      settle: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every runner, timed in rounds: each round gives every runner (rotating the order)
    ``settle`` untimed calls and then up to ``block`` timed ones, until each has ``iters`` timings. Load
    that changes during the run then affects every runner alike and cancels in the ratios. The untimed
    calls matter: ONNX Runtime's worker threads keep spinning for a while after a call (its default), and
    measured here they slowed the next runner's first call up to 4-8x; one call absorbs that tail."""
    def call(r: Runner) -> float:
        sync = torch.cuda.synchronize if r.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        r.infer(feed)
        sync()
        return time.perf_counter() - t0

    for r in active.values():
        for _ in range(warmup):
            call(r)
    names = list(active)
    times: dict[str, list[float]] = {n: [] for n in names}
    rnd = 0
    while any(len(v) < iters for v in times.values()):
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:
            k = min(block, iters - len(times[n]))
            for _ in range(settle if k else 0):
                call(active[n])
            times[n] += [call(active[n]) for _ in range(k)]
        rnd += 1
    return times


def _sampling_run(runner: Runner, unet, schedule_config: dict, batch: int, steps: int, guidance_scale: float = 1.0
                  ) -> dict:
    """One DDIM run of ``batch`` images; with ``guidance_scale`` > 1 (class-conditional UNets) every step is one
    guided call of 2 x batch rows (the null label: the last class embedding, as tools/train_default.py trains)."""
    den = as_denoiser(runner)
    unet_time = [0.0]
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    extra = {k: v for k, v in feed_for(unet, batch).items() if k not in ("sample", "timestep")}

    def timed(x, t, **kw):
        sync()
        t0 = time.perf_counter()
        out = den(x, t, **kw)
        sync()
        unet_time[0] += time.perf_counter() - t0
        return out

    guided = timed
    if guidance_scale != 1.0:
        spec = Signature.from_unet(unet)
        if "class_labels" not in spec or spec["class_labels"].num_values is None:
            raise ValueError(f"--guidance-scale {guidance_scale:g} needs a class-conditional architecture")
        null = torch.tensor([spec["class_labels"].num_values - 1])
        guided = cfg_denoiser(timed, Guidance(guidance_scale, null={"class_labels": null}))
    shape = tuple(feed_for(unet, 1)["sample"].shape[1:])
    t0 = time.perf_counter()
    sample(guided, Schedule.from_config(schedule_config), range(batch), shape, steps=steps, extra_args=extra,
           disable=True, device=runner.device)
    total = time.perf_counter() - t0
    return {"batch": batch, "steps": steps, "seconds": total, "images_per_s": batch / total,
            "outside_unet_share": max(0.0, 1 - unet_time[0] / total), "guidance_scale": guidance_scale}


def profile(arch: str, batches: list[int], *, threads: int, steps: int, warmup: int, iters: int,
            runners: list[str] | None = None, engines: list[str] | None = None, guidance_scale: float = 1.0,
            spread: bool = False, progress=print) -> dict:
    """Profile one architecture: {arch, params, runners: {name: {latency: [...], sampling, peak_rss_mb}}}; with
    ``spread`` the latency feeds' rows have timesteps spread over the schedule (``feed_for``)."""
    torch.set_num_threads(threads)
    unet, sched_cfg = build_arch(arch)
    train_steps = int(sched_cfg.get("num_train_timesteps", 1000))
    one = feed_for(unet, 1)
    macs = sum(layer_macs(unet, one.pop("sample"), one.pop("timestep"), one).values())
    # the convolutions' and linear layers' multiply-accumulates of one image: with each runner's latency, the MAC
    # rate it reaches (how far from the hardware's int8 / bf16 peak a runner is)
    res = {"arch": arch, "params": sum(p.numel() for p in unet.parameters()), "threads": threads, "runners": {},
           "notes": [], "macs_per_image": macs, "timesteps": "spread" if spread else "same"}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        factories = cpu_runners(unet, Path(tmp), threads, notes=res["notes"], steps=train_steps)
        res["export_seconds"] = round(time.perf_counter() - t0, 1)
        if torch.cuda.is_available():
            factories.update(gpu_runners(unet, engines or []))
        chosen = {n: f for n, f in factories.items() if not runners or n in runners}
        with contextlib.ExitStack() as stack:
            active = {name: stack.enter_context(make()) for name, make in chosen.items()}
            rows: dict[str, dict] = {name: {"latency": []} for name in active}
            for b in batches:
                times = _time_interleaved(active, feed_for(unet, b, spread=train_steps if spread else None), warmup,
                                          iters)
                for name, raw in times.items():
                    ts = sorted(raw)
                    p90 = ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]
                    rows[name]["latency"].append({"batch": b, "median_ms": 1e3 * statistics.median(ts),
                                                  "p90_ms": 1e3 * p90, "min_ms": 1e3 * ts[0],
                                                  "images_per_s": b / statistics.median(ts),
                                                  "gmac_per_s": macs * b / statistics.median(ts) / 1e9,
                                                  "times_ms": [round(1e3 * t, 3) for t in raw]})
                    last = rows[name]["latency"][-1]
                    progress(f"  {arch:13s} {name:20s} batch {b:4d}: {last['median_ms']:9.2f} ms median, "
                             f"{last['gmac_per_s']:7.1f} GMAC/s")
            for name, r in active.items():  # sampling runs one runner at a time: peak memory per runner
                _rss_reset()
                rows[name]["rss_before_mb"] = _rss_now_mb()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                if steps:
                    rows[name]["sampling"] = _sampling_run(r, unet, sched_cfg, max(batches), steps, guidance_scale)
                rows[name]["peak_rss_mb"] = _rss_peak_mb()
                if torch.cuda.is_available():  # torch's allocator, plus what a TensorRT context holds itself
                    rows[name]["peak_gpu_mb"] = (torch.cuda.max_memory_allocated()
                                                 + getattr(r, "device_memory_bytes", 0)) / 2**20
        res["runners"] = rows
    return res


def ratios(res: dict, base: str = "ort-fp32", key: str = "median_ms") -> dict[str, dict[int, float]]:
    """Speed-up of every runner over ``base`` per batch, measured in the same run: the ratio of median
    latencies, or with key="min_ms" of the fastest calls (on a shared machine other load only ever adds
    time, so the fastest calls are the least disturbed estimate of what each runner costs)."""
    b = {r["batch"]: r[key] for r in res["runners"].get(base, {}).get("latency", [])}
    return {name: {r["batch"]: b[r["batch"]] / r[key] for r in row["latency"] if r["batch"] in b}
            for name, row in res["runners"].items()}


def markdown(results: list[dict], mach: dict) -> str:
    isa = ", ".join(mach.get("cpu_flags") or []) or "not read"
    lines = [f"Machine: {mach['cpu']} ({mach['cpu_count']} CPUs; {isa}; int8 dot products: "
             f"{mach.get('int8_isa', 'unknown')}), torch threads {mach['torch_threads']}, "
             f"GPU: {mach['gpu'] or 'none'}; torch {mach['torch']}, onnxruntime {mach['onnxruntime']}"
             + (f", openvino {mach['openvino']}" if mach.get("openvino") else "")
             + ". Absolute times are this machine's; ratios are measured side by side in one run.", ""]
    for res in results:
        macs = res.get("macs_per_image")
        lines += [f"### {res['arch']} ({res['params'] / 1e6:.1f} M parameters, {res['threads']} threads"
                  + (f", {macs / 1e9:.3f} GMAC per image in convolutions and linear layers" if macs else "")
                  + (", rows' timesteps spread over the schedule" if res.get("timesteps") == "spread" else "")
                  + ")", "",
                  "| runner | batch | median ms | p90 ms | images/s (UNet call) | GMAC/s | speed-up vs ort-fp32 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        rat = ratios(res)
        for name, row in res["runners"].items():
            for r in row["latency"]:
                sp = rat.get(name, {}).get(r["batch"])
                gmac = f"{r['gmac_per_s']:.1f}" if "gmac_per_s" in r else ""
                lines.append(f"| {name} | {r['batch']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                             f"{r['images_per_s']:.1f} | {gmac} | {'' if sp is None else f'{sp:.2f}x'} |")
        sampled = {name: row for name, row in res["runners"].items() if row.get("sampling")}
        if sampled:  # (none with --steps 0)
            lines += ["", "| runner | sampling run | images/s | time outside the UNet | peak RSS MB (before) |",
                      "|---|---|---:|---:|---:|"]
        for name, row in sampled.items():
            s = row["sampling"]
            lines.append(f"| {name} | DDIM {s['steps']} steps, batch {s['batch']} | {s['images_per_s']:.2f} | "
                         f"{100 * s['outside_unet_share']:.1f}% | {row['peak_rss_mb'] or 0:.0f} "
                         f"({row['rss_before_mb'] or 0:.0f}) |")
        lines.append("")
        lines += [f"Note: {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for name, row in res["runners"].items():
            xs = [r["batch"] for r in row["latency"]]
            ax.plot(xs, [r["images_per_s"] for r in row["latency"]], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("images / s per UNet call")
        ax.set_title(f"{res['arch']} ({res['params'] / 1e6:.1f} M, {res['threads']} threads)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(results: list[dict], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    mach = machine()
    doc = {"profile_version": PROFILE_VERSION, "machine": mach, "results": results}
    atomic_write(out_dir / "profile.json", (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write(out_dir / "profile.md", (markdown(results, mach) + "\n").encode())
    return {"json": out_dir / "profile.json", "md": out_dir / "profile.md", "png": plot(results, out_dir / "profile.png")}
