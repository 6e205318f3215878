"""The TensorRT target (TensorRT 10/11 and TensorRT-RTX): calibrated model -> checked Q/DQ ONNX -> engines.

Files, for model M and recipe R (``groups=K`` recipes give K of each, ``.g0`` .. ``.g<K-1>``)::

    engines/M-R.fp32.onnx   Q/DQ, all math FP32: ONNX Runtime on CPU, the layer-by-layer comparison
    engines/M-R.onnx        Q/DQ, non-quantized math FP16 (strongly typed TensorRT / TensorRT-RTX input)
    engines/M-R.onnx.json   export report: checks, int8-code flip rates vs torch, recipe, calibration, signature
    engines/M-R.plan(.json) the engine and its sidecar
    engines/M-fp16.onnx / .plan   the unquantized FP16 baseline
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..core.artifacts import ExportReport
from ..core.stages import stage
from .base import ExportJob, Exported, Target, graph_stem


class ExportCheckError(RuntimeError):
    """An exported graph fails a TensorRT conformance or coverage check (the files stay for inspection)."""


def probe_inputs(loaded, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs for the layer-by-layer comparison: x_t at timesteps spread over the schedule, made by
    noising seeded smooth images (so low-t inputs look like images, not like noise); conditioning inputs
    drawn from the signature (valid labels, normal embeddings of 8 tokens)."""
    from ..sampling import Schedule
    sched = Schedule.from_config(loaded.scheduler_config)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *loaded.sample_shape)
    x0 = torch.nn.functional.avg_pool2d(torch.rand(shape, generator=g) * 2 - 1, 3, 1, 1).clamp(-1, 1)
    noise = torch.randn(shape, generator=g)
    T = sched.num_train_timesteps
    t = torch.linspace(T - 1, 0, batch).round().long()
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    feed = {"sample": ab.sqrt() * x0 + (1 - ab).sqrt() * noise, "timestep": t}
    extra = loaded.signature.example(batch, seed=seed + 1, seq_len=8)
    feed.update({k: v for k, v in extra.items() if k not in feed})
    return feed


def _flip_summary(rows: list[dict]) -> dict:
    """Totals of ``compare_layers``: per-layer flips (each layer from identical quantized inputs) and
    end-to-end flips (free runs, flips spread downstream), with the worst layer of each."""
    n = sum(r["n"] for r in rows)
    out = {"layers": len(rows), "codes": n}
    for key in ("", "_e2e"):
        flips = sum(r[f"flips{key}"] for r in rows)
        worst = max(rows, key=lambda r: r[f"flip_rate{key}"]) if rows else None
        out.update({f"flips{key}": flips, f"flip_rate{key}": flips / n if n else 0.0,
                    f"max_code_diff{key}": max((r[f"max_diff{key}"] for r in rows), default=0),
                    f"worst_layer{key}": worst and {k: worst[k] for k in ("layer", f"flip_rate{key}", f"max_diff{key}")}})
    return out


def _check(path: Path, quantized: set[str]) -> list[str]:
    import onnx

    from ..export import check_layers, check_qdq
    onnx.checker.check_model(str(path))  # by path: a graph over 2 GB cannot be serialized to bytes
    return check_qdq(path).violations + check_layers(path, quantized)  # (weights read only where looked at)


# Measured on sd15-unet (3.44 GB fp32 Q/DQ graph, 2 cores): the layer comparison's ONNX Runtime session and the
# two torch runs raised the process's resident memory by 11.6 GB before the kernel killed it at 22.2 GB, i.e.
# about 3.4x the graph's tensor bytes.
COMPARISON_MEMORY_PER_GRAPH_BYTE = 3.4
_SKIP_COMPARISON = "pass --no-layer-comparison to skip it (the Q/DQ conformance and coverage checks still run)"


def _require_graph_memory(path: Path, per_byte: float, what: str, alternative: str, at_least: bool = False) -> None:
    """Refuse a stage on the graph at ``path`` before it starts when ``per_byte`` x its size (data file included) is
    more memory than is available; the message names the measured ratio and ``alternative``."""
    from ..core.stages import require_memory
    from ..export import onnx_files
    size = sum(p.stat().st_size for p in onnx_files(path))
    require_memory(per_byte * size / 2**20, f"{what} of {path.name}",
                   f"{'at least ' if at_least else ''}{per_byte}x its {size / 2**30:.2f} GiB, measured on sd15-unet; "
                   + alternative)


# ModelOpt's FP16 autocast loads the graph, runs it in ONNX Runtime with every node's output kept (its FP16
# range check) and writes the converted copy: on sd15-unet (3.44 GB graph) the kernel killed the process at 22.2 GB
# resident, 14.7 GB above what it held before the stage, so it needs more than 4.3x the graph's bytes.
FP16_MEMORY_PER_GRAPH_BYTE = 4.3


def _check_codes(codes: dict[str, tuple[int, int]], qcfg, quantized: set[str]) -> list[str]:
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


def _report(job: ExportJob, onnx_name: str, int8: bool, **kw) -> ExportReport:
    loaded = job.loaded
    return ExportReport(onnx=onnx_name, target="tensorrt", int8=int8, model=str(loaded.source),
                        model_fingerprint=loaded.fingerprint(), schedule_fingerprint=loaded.schedule_fingerprint(),
                        signature=loaded.signature.to_dict(), **kw)


class TensorRTTarget(Target):
    name = "tensorrt"
    help = "symmetric int8 Q/DQ on layer inputs, FP16 elsewhere: TensorRT 10/11 and TensorRT-RTX engines"
    order = 0
    builds = True

    def check(self, qcfg, recipe, options: dict | None = None) -> None:
        if qcfg.shortcut_split:
            raise ValueError("--shortcut-split uses per-channel activation ranges, which TensorRT does not accept; "
                             "it is a fake-quant study only")
        opts = options or {}
        if opts.get("one_graph") and opts.get("group_engines"):
            raise ValueError("--one-graph and --group-engines exclude each other: one graph for all timestep groups, "
                             "or one graph per group")
        from ..calib.ranges import parse_merge
        kind, k = parse_merge(recipe.merge)
        grouped = kind == "groups" and k >= 2
        if opts.get("one_graph") and not grouped:
            raise ValueError(f"--one-graph needs a groups=K recipe (K >= 2); {recipe.name!r} has one range set")
        if grouped and qcfg.quantize_attention and not opts.get("group_engines"):
            raise ValueError(f"{recipe.name!r} goes into one graph, which has no form for quantized attention "
                             "matmuls (trt_dm.onegraph): add --group-engines (one graph per timestep group) or use a "
                             "one-range recipe such as ptq4dm")

    def export(self, job: ExportJob, progress: Callable[[str], None] = print) -> list[Exported]:
        """Export the calibrated fake-quant UNet (a groups=K recipe: one graph, or one per timestep group with the
        ``group_engines`` option; with ``fp_from_t``, that per timestep segment, ``.t<t_max>-<t_min>`` in the names),
        run every check, write reports.
        Raises ``ExportCheckError`` listing the violations when a check fails (the ONNX files stay)."""
        from ..calib.ranges import get_recipe
        from ..calibrate import segment_unets
        if job.precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {job.precision!r}")
        self.check(job.qcfg, get_recipe(job.recipe), job.options)
        loaded, calib = job.loaded, job.calib
        feed = probe_inputs(loaded)
        stem = graph_stem(loaded.name, job.recipe, job.qcfg)
        out = []
        # one segment, or with --keep-fp-from-t two (the noisy steps' without the kept layers' Q/DQ): each its graphs
        for seg in segment_unets(loaded, job.qcfg, calib.ranges, weights=calib.weights_path):
            out += self._export_segment(job, seg, stem, feed, progress)
        return out

    def _export_segment(self, job: ExportJob, seg, stem: str, feed: dict, progress) -> list[Exported]:
        from ..export import compare_layers, export_onnx, to_fp16
        from ..export import weight_code_ranges
        from ..quant import apply_ranges, quantized_layers, weights_on_int8_grid
        loaded, calib, ranges, qunet = job.loaded, job.calib, seg.ranges, seg.unet
        low_bits = job.qcfg.weight_bits < 8
        if low_bits:  # no int4 convolution in TensorRT; W7 for CPUs without VNNI: the codes go on the int8 grid
            converted = weights_on_int8_grid(qunet)
            wide = sum(job.qcfg.weight_bits_of(n) == 8 for n in quantized_layers(qunet))
            progress(f"W{job.qcfg.weight_bits}A8: {converted} layers' weights stored on the int8 grid, "
                     f"{converted - wide} with {job.qcfg.weight_bits}-bit codes (per-channel step amax / "
                     f"{2 ** (job.qcfg.weight_bits - 1) - 1})" + (f", {wide} at 8 bits (--w8-layers)" if wide else ""))
        # groups=K ranges go into ONE graph unless asked for K: per-row input scaling by the timestep's group
        one = ranges.is_grouped and len(ranges.groups) >= 2 and not (job.options or {}).get("group_engines")
        if one:
            from ..onegraph import one_graph
            qunet = one_graph(qunet, ranges)
        quantized = set(quantized_layers(qunet))
        part = "" if seg.t_range is None else f".t{seg.t_range[0]}-{seg.t_range[1]}"
        out = []
        for k, group in enumerate(ranges.groups[:1] if one else ranges.groups):
            suffix = part + (".onegraph" if one else f".g{k}" if ranges.is_grouped else "")
            if ranges.is_grouped and not one:
                apply_ranges(qunet, ranges.amax(k))
            t0 = time.perf_counter()
            name = f"{stem}{suffix}"
            with stage(f"export {name}: ONNX (fp32 Q/DQ)"):
                fp32 = export_onnx(qunet, job.out_dir / f"{name}.fp32.onnx")
            with stage(f"export {name}: checks"):
                problems = _check(fp32, quantized)
                if low_bits:
                    codes = weight_code_ranges(fp32)
                    problems += _check_codes(codes, job.qcfg, quantized)
            compare = (job.options or {}).get("layer_comparison", True)
            skipped = {"skipped": "--no-layer-comparison"}
            if compare:
                _require_graph_memory(fp32, COMPARISON_MEMORY_PER_GRAPH_BYTE, "the layer comparison", _SKIP_COMPARISON)
            with stage(f"export {name}: layer comparison (fp32)"):
                rows = compare_layers(qunet, fp32, feed) if compare else []
            report = _report(job, fp32.name, True, recipe=job.recipe, ranges=str(calib.ranges_path),
                             calibration=f"{loaded.data_key()[:16]}/{calib.stats_dir.name}", quant=job.qcfg.to_dict(),
                             quantized_layers=len(quantized), precision=job.precision, fp32_onnx=fp32.name,
                             guidance_scale=job.spec.guidance_scale if loaded.signature.conditioning else None,
                             text_pipeline=loaded.text.describe() if loaded.text is not None else None,
                             layer_comparison_fp32=_flip_summary(rows) if compare else skipped,
                             layer_comparison_rows=rows)
            if low_bits:
                low = {k: v for k, v in codes.items() if job.qcfg.weight_bits_of(k) < 8}
                report.extra["weight_codes"] = {"bits": job.qcfg.weight_bits, "layers": len(low),
                                                "min": min((lo for lo, _ in low.values()), default=None),
                                                "max": max((hi for _, hi in low.values()), default=None),
                                                **({"layers_8bit": len(codes) - len(low)} if job.qcfg.w8_layers
                                                   else {})}
            if one:
                report.extra["one_graph"] = {"groups": len(ranges.groups), "t_ranges": ranges.t_ranges}
            elif ranges.is_grouped:
                report.group, report.groups, report.t_range = k, len(ranges.groups), [group.t_max, group.t_min]
            if seg.t_range is not None:  # this graph's part of the run: the runners switch graphs by it
                report.t_range = report.t_range or list(seg.t_range)
                kept = [p for p in seg.qcfg.exclude if p not in job.qcfg.exclude]
                report.extra["precision_by_t"] = {"t_range": list(seg.t_range), "quantized_layers": len(quantized),
                                                   "fp_layers": kept}
            target = fp32
            if job.precision == "fp16":
                _require_graph_memory(fp32, FP16_MEMORY_PER_GRAPH_BYTE, "the FP16 conversion", "--precision fp32 builds "
                                      "the checked FP32 Q/DQ graph instead (non-quantized math in FP32)", at_least=True)
                with stage(f"export {name}: FP16 conversion + checks"):
                    target = to_fp16(fp32, job.out_dir / f"{name}.onnx")
                    problems += _check(target, quantized)
                if compare:
                    _require_graph_memory(target, COMPARISON_MEMORY_PER_GRAPH_BYTE, "the layer comparison",
                                          _SKIP_COMPARISON)
                with stage(f"export {name}: layer comparison (fp16)"):
                    report.layer_comparison_fp16 = (_flip_summary(compare_layers(qunet, target, feed)) if compare
                                                    else skipped)
            report.onnx, report.violations = target.name, problems
            report.export_seconds = round(time.perf_counter() - t0, 1)
            report.save(target)
            if problems:
                raise ExportCheckError(f"{target}: {len(problems)} TensorRT conformance problems:\n  "
                                       + "\n  ".join(problems[:20]))
            fl = report.layer_comparison_fp32
            progress(f"  {target} ({report.export_seconds} s): ONNX checker, Q/DQ conformance and per-layer coverage "
                     + (f"OK; int8 codes vs torch fake-quant, layer by layer: {fl['flip_rate']:.1e} flipped (max diff "
                        f"{fl['max_code_diff']}; end to end {fl['flip_rate_e2e']:.1e})"
                        + (f", FP16 graph {report.layer_comparison_fp16['flip_rate']:.1e}" if job.precision == "fp16" else "")
                        if compare else "OK; layer comparison with ONNX Runtime skipped (--no-layer-comparison)"))
            out.append(Exported(target, report))
        return out

    def export_baseline(self, loaded, out_dir: Path, *, precision: str = "fp16") -> Exported:
        """The unquantized model as ONNX (FP16 math, FP32 I/O): the baseline engine's input."""
        from ..export import export_onnx, to_fp16
        with stage("baseline: ONNX (fp32) + FP16 conversion + checks"):
            fp32 = export_onnx(loaded.unet, out_dir / f"{loaded.name}-fp.fp32.onnx")
            problems = _check(fp32, set())
            target = to_fp16(fp32, out_dir / f"{loaded.name}-fp16.onnx") if precision == "fp16" else fp32
            problems += _check(target, set())
        if problems:
            raise ExportCheckError(f"{target}: unexpected Q/DQ in the unquantized export: {problems[:5]}")
        report = ExportReport(onnx=target.name, target=self.name, int8=False, precision=precision,
                              model=str(loaded.source), model_fingerprint=loaded.fingerprint(),
                              schedule_fingerprint=loaded.schedule_fingerprint(), signature=loaded.signature.to_dict())
        report.save(target)
        return Exported(target, report)

    def build(self, graphs: list[Exported], options=None, *, flavour: str | None = None,
              progress: Callable[[str], None] = print) -> list:
        """One engine per exported graph (``<onnx stem>.plan``), sidecars included; returns the sidecars."""
        from ..core.signature import Signature
        from ..engine import BuildOptions, build_engine
        sidecars = []
        for m in graphs:
            plan = m.onnx.with_suffix(".plan")
            r = m.report
            extra = {k: getattr(r, k) for k in ("group", "groups", "t_range", "guidance_scale", "text_pipeline")
                     if getattr(r, k) is not None}
            extra["model_fingerprint"] = r.model_fingerprint or None
            with stage(f"build {plan.name}"):
                side = build_engine(m.onnx, plan, options or BuildOptions(), flavour=flavour, recipe=r.recipe,
                                    calibration=r.calibration, precision="int8" if r.int8 else "fp16",
                                    signature=Signature.from_dict(r.signature) if r.signature else None, extra=extra)
            prec = ", ".join(f"{t} {dict(c)}" for t, c in side.layer_precisions.items()) or "not reported"
            progress(f"  {plan} ({side.plan_bytes / 1e6:.1f} MB, {side.flavour} {side.trt_version}, "
                     f"{side.build_seconds} s): layer input precisions {prec}")
            sidecars.append(side)
        return sidecars

    def usage(self, paths: list[Path]) -> str:
        return f"sample with: trt-dm sample --engine {' '.join(str(p) for p in paths)} (needs a GPU)"


TARGET = TensorRTTarget()
