"""The Q/DQ export pipeline the TensorRT and OpenVINO targets share: calibrated fake-quant UNet -> per timestep
segment, one graph for all timestep groups or one per group -> checked Q/DQ ONNX (FP32, and FP16 when asked) and
its report.

Files, for model M and recipe R (``groups=K`` recipes with ``group_engines`` give K of each, ``.g0`` ..
``.g<K-1>``; one graph for all groups is ``.onegraph``; ``fp_from_t`` segments add ``.t<t_max>-<t_min>``)::

    M-R.fp32.onnx   Q/DQ, all math FP32: ONNX Runtime and OpenVINO on CPU, the layer-by-layer comparison
    M-R.onnx        Q/DQ, non-quantized math FP16 (strongly typed TensorRT / TensorRT-RTX input)
    M-R.onnx.json   export report: checks, int8-code flip rates vs torch, recipe, calibration, signature

The checks themselves (``check_qdq``, ``check_layers``, ``weight_code_ranges``; ``compare_layers``) stay in
``trt_dm.export.onnx`` (and ``.compare``): they are rules on and readers of the ONNX graph, sharing its readers (``constants``,
``layer_of``) with the writer, and other parts (the CLI, evaluation) use them without this pipeline; this module
orders them into one export.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trt_dm.core.artifacts import ExportReport
from trt_dm.core.stages import require_memory, stage
from trt_dm.export.compare import compare_layers
from trt_dm.export.fp8 import export_fp8
from trt_dm.export.fp16 import to_fp16
from trt_dm.export.job import Exported, ExportJob, graph_stem
from trt_dm.export.onnx import (
    check_layers,
    check_qdq,
    export_onnx,
    onnx_files,
    weight_code_ranges,
)
from trt_dm.quant.calib.ranges import get_recipe, parse_merge
from trt_dm.quant.modules import apply_ranges, quantized_layers, weights_on_int8_grid
from trt_dm.quant.onegraph import one_graph

# The report's target: the layout's own (TensorRT's), whichever target exported it (OpenVINO runs the same graph).
REPORT_TARGET = "tensorrt"
# Measured on sd15-unet (3.44 GB fp32 Q/DQ graph, 2 cores): the layer comparison's ONNX Runtime session and the
# two torch runs raised the process's resident memory by 11.6 GB before the kernel killed it at 22.2 GB, i.e.
# about 3.4x the graph's tensor bytes.
COMPARISON_MEMORY_PER_GRAPH_BYTE = 3.4
_SKIP_COMPARISON = "pass --no-layer-comparison to skip it (the Q/DQ conformance and coverage checks still run)"
_SKIPPED = {"skipped": "--no-layer-comparison"}
# The FP16 conversion (trt_dm.export.fp16: ModelOpt's autocast with the streamed reference run) on sd15-unet (3.44 GB
# Q/DQ graph, 2026-12-08): peak 17.2 GB resident from 0.4 GB, 4.9x the graph (ModelOpt holds two copies of the graph;
# the reference run's mapped weights' pages count in the peak). ModelOpt's own reference run, which kept every tensor,
# was killed by the kernel above 4.3x on sd15-unet, 5.5x on dit-xl-2 and 6.3x on pixart-sigma.
FP16_MEMORY_PER_GRAPH_BYTE = 5.0
# The TensorRT(-RTX) build holds the parsed graph and its weights. Measured on sdxl-unet (9.58 GiB FP32 graphs, the
# torch weights released before the builds): the int8 Q/DQ graph's build raised the process by 13.2 GiB (1.4x); the
# unquantized FP32 baseline's was killed by the kernel 17.4 GiB above the process (so at least 1.8x).
BUILD_MEMORY_PER_GRAPH_BYTE = {"quantized": 1.4, "unquantized": 1.8}


class ExportCheckError(RuntimeError):
    """An exported graph fails a TensorRT conformance or coverage check (the files stay for inspection)."""


def check_settings(qcfg, recipe, options: dict | None = None) -> None:
    """Raise ValueError, before any work, for what the Q/DQ graph cannot express (``recipe``: a Recipe;
    ``options``: the export job's)."""
    if qcfg.uses_fp8 and qcfg.quantize_attention:
        raise ValueError("--format fp8 with --quantize-attention: the FP8 export of attention matmul quantizers is not "
                         "written (their ONNX form is not checked here); quantize the Conv / Linear layers only")
    if qcfg.shortcut_split:
        raise ValueError("--shortcut-split uses per-channel activation ranges, which TensorRT does not accept; "
                         "it is a fake-quant study only")
    opts = options or {}
    if opts.get("one_graph") and opts.get("group_engines"):
        raise ValueError("--one-graph and --group-engines exclude each other: one graph for all timestep groups, "
                         "or one graph per group")
    kind, k = parse_merge(recipe.merge)
    grouped = kind == "groups" and k >= 2
    if opts.get("one_graph") and not grouped:
        raise ValueError(f"--one-graph needs a groups=K recipe (K >= 2); {recipe.name!r} has one range set")
    if grouped and qcfg.quantize_attention and not opts.get("group_engines"):
        raise ValueError(f"{recipe.name!r} goes into one graph, which has no form for quantized attention "
                         "matmuls (trt_dm.onegraph): add --group-engines (one graph per timestep group) or use a "
                         "one-range recipe such as ptq4dm")


def probe_inputs(loaded, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs for the layer-by-layer comparison: x_t at timesteps spread over the schedule, made by
    noising seeded smooth images (so low-t inputs look like images, not like noise); conditioning inputs
    drawn from the signature (valid labels, normal embeddings of 8 tokens)."""
    sched = loaded.schedule()
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *loaded.sample_shape)
    x0 = torch.nn.functional.avg_pool2d(torch.rand(shape, generator=g) * 2 - 1, 3, 1, 1).clamp(-1, 1)
    noise = torch.randn(shape, generator=g)
    t = sched.probe_timesteps(batch)
    feed = {"sample": sched.add_noise(x0, noise, t).float(), "timestep": t}
    extra = loaded.signature.example(batch, seed=seed + 1, seq_len=8)
    feed.update({k: v for k, v in extra.items() if k not in feed})
    return feed


def flip_summary(rows: list[dict]) -> dict:
    """Totals of ``compare_layers``: per-layer flips (each layer from identical quantized inputs) and
    end-to-end flips (free runs, flips spread downstream), with the worst layer of each."""
    n = sum(r["n"] for r in rows)
    out = {"layers": len(rows), "codes": n}
    for key in ("", "_e2e"):
        flips = sum(r[f"flips{key}"] for r in rows)
        worst = max(rows, key=lambda r: r[f"flip_rate{key}"]) if rows else None
        out.update({f"flips{key}": flips, f"flip_rate{key}": flips / n if n else 0.0,
                    f"max_code_diff{key}": max((r[f"max_diff{key}"] for r in rows), default=0),
                    f"worst_layer{key}": worst and {k: worst[k]
                                                     for k in ("layer", f"flip_rate{key}", f"max_diff{key}")}})
    return out


def check_graph(path: Path, quantized: set[str]) -> list[str]:
    """The violations of the graph at ``path``: the ONNX checker (raises), Q/DQ conformance, and Q/DQ on exactly
    the ``quantized`` layers."""
    import onnx
    onnx.checker.check_model(str(path))  # by path: a graph over 2 GB cannot be serialized to bytes
    return check_qdq(path).violations + check_layers(path, quantized)  # (weights read only where looked at)


def check_codes(codes: dict[str, tuple[int, int]], qcfg, quantized: set[str]) -> list[str]:
    """W<bits>A8 on the int8 grid: every quantized layer's weight codes within its own width's integers
    [-2^(b-1), 2^(b-1) - 1], b = ``qcfg.weight_bits_of(layer)`` (8 for the layers ``w8_layers`` names)."""
    problems = []
    for layer, (a, b) in sorted(codes.items()):
        bits = qcfg.weight_bits_of(layer)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if a < lo or b > hi:
            problems.append(f"{layer}: weight int8 codes span [{a}, {b}], outside the {bits}-bit integers [{lo}, {hi}]")
    missing = sorted(quantized - set(codes))
    if missing:
        problems.append(f"{len(missing)} quantized layers have no per-channel weight Q/DQ: {missing[:5]}")
    return problems


def require_graph_memory(path: Path, per_byte: float, what: str, alternative: str, at_least: bool = False,
                         measured_on: str = "sd15-unet") -> None:
    """Refuse a stage on the graph at ``path`` before it starts when ``per_byte`` x its size (data file included) is
    more memory than is available; the message names the measured ratio and ``alternative``."""
    size = sum(p.stat().st_size for p in onnx_files(path))
    require_memory(per_byte * size / 2**20, f"{what} of {path.name}",
                   f"{'at least ' if at_least else ''}{per_byte}x its {size / 2**30:.2f} GiB, measured on "
                   f"{measured_on}; " + alternative)


def export_qdq(job: ExportJob, progress: Callable[[str], None] = print) -> list[Exported]:
    """Export the calibrated fake-quant UNet (a groups=K recipe: one graph, or one per timestep group with the
    ``group_engines`` option; with ``fp_from_t``, that per timestep segment, ``.t<t_max>-<t_min>`` in the names),
    run every check, write reports.
    Raises ``ExportCheckError`` listing the violations when a check fails (the ONNX files stay)."""
    # (here, not at the top: quant.fakequant loads the runtime's torch runner, which a target never imports)
    from trt_dm.quant.fakequant import segment_unets
    if job.precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32, got {job.precision!r}")
    check_settings(job.qcfg, get_recipe(job.recipe), job.options)
    loaded, calib = job.loaded, job.calib
    feed = probe_inputs(loaded)
    stem = graph_stem(loaded.name, job.recipe, job.qcfg)
    out = []
    # one segment, or with --keep-fp-from-t two (the noisy steps' without the kept layers' Q/DQ): each its graphs
    for seg in segment_unets(loaded, job.qcfg, calib.ranges, weights=calib.weights_path, share_weights=True):
        out += _export_segment(job, seg, stem, feed, progress)
    return out


@dataclass(frozen=True)
class _Graph:
    """One graph of a segment: its fake-quant UNet and quantized layers, and the timestep group it is for (``k``,
    ``group``), or all of the segment's groups (``one``)."""
    name: str
    seg: object            # trt_dm.quant.fakequant.Segment
    qunet: nn.Module
    quantized: set
    one: bool
    k: int
    group: object          # one of the segment's RangeSet groups


def _export_segment(job: ExportJob, seg, stem: str, feed: dict, progress) -> list[Exported]:
    """The graphs of one timestep segment: one for all its range groups, or one per group."""
    ranges, qunet = seg.ranges, seg.unet
    if job.qcfg.weight_bits < 8:
        _weights_on_grid(job.qcfg, qunet, progress)
    # groups=K ranges go into ONE graph unless asked for K: per-row input scaling by the timestep's group
    one = ranges.is_grouped and len(ranges.groups) >= 2 and not (job.options or {}).get("group_engines")
    if one:
        qunet = one_graph(qunet, ranges)
    quantized = set(quantized_layers(qunet))
    part = "" if seg.t_range is None else f".t{seg.t_range[0]}-{seg.t_range[1]}"
    out = []
    for k, group in enumerate(ranges.groups[:1] if one else ranges.groups):
        suffix = part + (".onegraph" if one else f".g{k}" if ranges.is_grouped else "")
        if ranges.is_grouped and not one:
            apply_ranges(qunet, ranges.amax(k))
        out.append(_export_graph(job, _Graph(f"{stem}{suffix}", seg, qunet, quantized, one, k, group), feed, progress))
    return out


def _weights_on_grid(qcfg, qunet: nn.Module, progress) -> None:
    """W<bits>A8 with bits < 8: the weights' codes stored on the int8 grid (no int4 convolution in TensorRT; W7 for
    CPUs without VNNI), said in one line."""
    converted = weights_on_int8_grid(qunet)
    wide = sum(qcfg.weight_bits_of(n) == 8 for n in quantized_layers(qunet))
    progress(f"W{qcfg.weight_bits}A8: {converted} layers' weights stored on the int8 grid, "
             f"{converted - wide} with {qcfg.weight_bits}-bit codes (per-channel step amax / "
             f"{2 ** (qcfg.weight_bits - 1) - 1})" + (f", {wide} at 8 bits (--w8-layers)" if wide else ""))


def _export_graph(job: ExportJob, g: _Graph, feed: dict, progress) -> Exported:
    """One checked graph and its report: FP32 Q/DQ (and its FP16 version when asked), each checked and compared
    layer by layer with the torch model; ExportCheckError when a check fails (after the report is written)."""
    t0 = time.perf_counter()
    compare = (job.options or {}).get("layer_comparison", True)
    fp32, problems, codes = _fp32_graph(job, g)
    rows = _layer_rows(g, fp32, feed, compare, "fp32")
    report = _graph_report(job, g, fp32, rows, compare, codes)
    target = fp32
    if job.precision == "fp16":
        target, fp16_problems, report.layer_comparison_fp16 = _fp16_graph(g, fp32, feed, compare)
        problems += fp16_problems
    report.onnx, report.violations = target.name, problems
    report.export_seconds = round(time.perf_counter() - t0, 1)
    report.save(target)
    if problems:
        raise ExportCheckError(f"{target}: {len(problems)} TensorRT conformance problems:\n  "
                               + "\n  ".join(problems[:20]))
    progress(_checked_line(job, target, report, compare))
    return Exported(target, report)


def _fp32_graph(job: ExportJob, g: _Graph) -> tuple[Path, list[str], dict | None]:
    """(the FP32 Q/DQ graph, its violations, its weight codes per layer when the weights are below 8 bits)."""
    with stage(f"export {g.name}: ONNX (fp32 Q/DQ)"):
        fp32 = job.out_dir / f"{g.name}.fp32.onnx"
        if job.qcfg.uses_fp8:  # an FP8 model or a mix with FP8 layers: standard opset-19 Q/DQ of both formats
            export_fp8(g.qunet, fp32)
        else:
            export_onnx(g.qunet, fp32)
    codes = None
    with stage(f"export {g.name}: checks"):
        problems = check_graph(fp32, g.quantized)
        if job.qcfg.weight_bits < 8:
            codes = weight_code_ranges(fp32)
            problems += check_codes(codes, job.qcfg, g.quantized)
    return fp32, problems, codes


def _layer_rows(g: _Graph, path: Path, feed: dict, compare: bool, what: str) -> list[dict]:
    """The layer-by-layer comparison of the graph at ``path`` (``what``: fp32 / fp16) with the torch model, refused
    before it starts when it would not fit in memory; [] when skipped."""
    if compare:
        require_graph_memory(path, COMPARISON_MEMORY_PER_GRAPH_BYTE, "the layer comparison", _SKIP_COMPARISON)
    with stage(f"export {g.name}: layer comparison ({what})"):
        return compare_layers(g.qunet, path, feed) if compare else []


def _fp16_graph(g: _Graph, fp32: Path, feed: dict, compare: bool) -> tuple[Path, list[str], dict]:
    """(the FP16 version of ``fp32``, its violations, its layer comparison's summary), the conversion refused before it
    starts when it would not fit in memory."""
    require_graph_memory(fp32, FP16_MEMORY_PER_GRAPH_BYTE, "the FP16 conversion", "--precision fp32 builds the "
                         "checked FP32 Q/DQ graph instead (non-quantized math in FP32)")
    with stage(f"export {g.name}: FP16 conversion + checks"):
        target = to_fp16(fp32, fp32.with_name(f"{g.name}.onnx"), feed)
        problems = check_graph(target, g.quantized)
    rows = _layer_rows(g, target, feed, compare, "fp16")
    return target, problems, flip_summary(rows) if compare else _SKIPPED


def report_for(loaded, onnx_name: str, int8: bool, **kw) -> ExportReport:
    """An export report of ``loaded``'s graph ``onnx_name``: the model, its fingerprints and signature, and ``kw``."""
    return ExportReport(onnx=onnx_name, target=REPORT_TARGET, int8=int8, model=str(loaded.source),
                        model_fingerprint=loaded.fingerprint(), schedule_fingerprint=loaded.schedule_fingerprint(),
                        signature=loaded.signature.to_dict(), **kw)


def _graph_report(job: ExportJob, g: _Graph, fp32: Path, rows: list[dict], compare: bool,
                  codes: dict | None) -> ExportReport:
    """The report of a quantized graph: recipe, calibration, quantization, the FP32 layer comparison, and what
    part of the run it serves (its weight codes, timestep group or segment) in ``extra``."""
    loaded, calib, ranges = job.loaded, job.calib, g.seg.ranges
    report = report_for(loaded, fp32.name, True, recipe=job.recipe, ranges=str(calib.ranges_path),
                        calibration=f"{loaded.data_key()[:16]}/{calib.stats_dir.name}", quant=job.qcfg.to_dict(),
                        quantized_layers=len(g.quantized), precision=job.precision, fp32_onnx=fp32.name,
                        guidance_scale=job.spec.guidance_scale if loaded.signature.conditioning else None,
                        text_pipeline=loaded.text.describe() if loaded.text is not None else None,
                        layer_comparison_fp32=flip_summary(rows) if compare else _SKIPPED,
                        layer_comparison_rows=rows)
    if codes is not None:
        report.extra["weight_codes"] = _weight_codes(job.qcfg, codes)
    if g.one:
        report.extra["one_graph"] = {"groups": len(ranges.groups), "t_ranges": ranges.t_ranges}
    elif ranges.is_grouped:
        report.group, report.groups, report.t_range = g.k, len(ranges.groups), [g.group.t_max, g.group.t_min]
    seg = g.seg
    if seg.t_range is not None:  # this graph's part of the run: the runners switch graphs by it
        report.t_range = report.t_range or list(seg.t_range)
        kept = [p for p in seg.qcfg.exclude if p not in job.qcfg.exclude]
        report.extra["precision_by_t"] = {"t_range": list(seg.t_range), "quantized_layers": len(g.quantized),
                                          "fp_layers": kept}
    return report


def _weight_codes(qcfg, codes: dict[str, tuple[int, int]]) -> dict:
    """The report's summary of the below-8-bit weight codes: their width, layers and extremes."""
    low = {k: v for k, v in codes.items() if qcfg.weight_bits_of(k) < 8}
    return {"bits": qcfg.weight_bits, "layers": len(low),
            "min": min((lo for lo, _ in low.values()), default=None),
            "max": max((hi for _, hi in low.values()), default=None),
            **({"layers_8bit": len(codes) - len(low)} if qcfg.w8_layers else {})}


def _checked_line(job: ExportJob, target: Path, report: ExportReport, compare: bool) -> str:
    """The progress line of a checked graph: its checks, and its int8 codes' flip rates vs torch."""
    fl = report.layer_comparison_fp32
    return (f"  {target} ({report.export_seconds} s): ONNX checker, Q/DQ conformance and per-layer coverage "
            + (f"OK; {dict(fp8='E4M3').get(job.qcfg.precision, job.qcfg.precision)} codes vs torch fake-quant, layer by layer: "
               f"{fl['flip_rate']:.1e} flipped (max diff "
               f"{fl['max_code_diff']}; end to end {fl['flip_rate_e2e']:.1e})"
               + (f", FP16 graph {report.layer_comparison_fp16['flip_rate']:.1e}" if job.precision == "fp16" else "")
               if compare else "OK; layer comparison with ONNX Runtime skipped (--no-layer-comparison)"))
