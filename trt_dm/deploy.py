"""The deployment pipeline behind `trt-dm engine` / `make engine`: calibrated model -> checked ONNX -> engines.

    arts = export_checked(loaded, qcfg, calib, "ptq4dm", Path("engines"))   # Q/DQ ONNX (fp32 + fp16), checked
    build_all(arts, BuildOptions())                                          # engines/<stem>.plan + sidecars

Files, for model M and recipe R (``groups=K`` recipes give K of each, ``.g0`` .. ``.g<K-1>``)::

    engines/M-R.fp32.onnx   Q/DQ, all math FP32: ONNX Runtime on CPU, the layer-by-layer comparison
    engines/M-R.onnx        Q/DQ, non-quantized math FP16 (strongly typed TensorRT / TensorRT-RTX input)
    engines/M-R.onnx.json   export report: checks, int8-code flip rates vs torch, recipe, calibration
    engines/M-R.plan(.json) the engine and its sidecar
    engines/M-fp16.onnx / .plan   the unquantized FP16 baseline
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calib.stats import atomic_write
from .calibrate import CalibrationResult, fake_quant_unet, group_ranges
from .export import check_layers, check_qdq, compare_layers, export_onnx, to_fp16
from .models import LoadedModel
from .quant import QuantConfig, apply_ranges, quantized_layers
from .sampling import Schedule

log = logging.getLogger(__name__)


def recipe_slug(recipe: str) -> str:
    return recipe.replace("@", "_").replace(":", "").replace("=", "")


@dataclass
class ExportedModel:
    """One deployable graph (one per timestep group): its files and what was checked."""
    onnx: Path  # the graph an engine is built from (fp16 or fp32); the report names the FP32 Q/DQ graph
    report: dict = field(default_factory=dict)


def probe_inputs(loaded: LoadedModel, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs for the layer-by-layer comparison: x_t at timesteps spread over the schedule, made by
    noising seeded smooth images (so low-t inputs look like images, not like noise)."""
    sched = Schedule.from_config(loaded.scheduler_config)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *loaded.sample_shape)
    x0 = torch.nn.functional.avg_pool2d(torch.rand(shape, generator=g) * 2 - 1, 3, 1, 1).clamp(-1, 1)
    noise = torch.randn(shape, generator=g)
    T = sched.num_train_timesteps
    t = torch.linspace(T - 1, 0, batch).round().long()
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    feed = {"sample": ab.sqrt() * x0 + (1 - ab).sqrt() * noise, "timestep": t}
    for inp in loaded.inputs:
        if inp.name == "encoder_hidden_states":
            feed[inp.name] = torch.randn(batch, *[8 if d == -1 else d for d in inp.shape[1:]], generator=g)
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
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return check_qdq(model).violations + check_layers(model, quantized)


def export_checked(loaded: LoadedModel, qcfg: QuantConfig, calib: CalibrationResult, recipe: str, out_dir: Path, *,
                   precision: str = "fp16", progress=print) -> list[ExportedModel]:
    """Export the calibrated fake-quant UNet (one graph per timestep group), run every check, write reports.
    Raises ``ValueError`` listing the violations when a check fails (the ONNX files stay for inspection)."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    check_target(qcfg, recipe, "tensorrt")
    ranges = calib.ranges
    grouped = [v for v in ranges.values() if isinstance(v, list)]
    k_groups = len(grouped[0]) if grouped else 1
    qunet = fake_quant_unet(loaded, qcfg, ranges)
    quantized = set(quantized_layers(qunet))
    feed = probe_inputs(loaded)
    stem = f"{loaded.name}-{recipe_slug(recipe)}"
    out = []
    for k in range(k_groups):
        suffix = f".g{k}" if grouped else ""
        if grouped:
            apply_ranges(qunet, group_ranges(ranges, k))
        t0 = time.perf_counter()
        fp32 = export_onnx(qunet, out_dir / f"{stem}{suffix}.fp32.onnx")
        problems = _check(fp32, quantized)
        rows = compare_layers(qunet, fp32, feed)
        report = {"model": str(loaded.source), "model_fingerprint": loaded.fingerprint(), "recipe": recipe,
                  "ranges": str(calib.ranges_path), "calibration": f"{loaded.fingerprint()[:16]}/{calib.stats_dir.name}",
                  "quant": qcfg.to_dict(), "quantized_layers": len(quantized), "precision": precision,
                  "fp32_onnx": fp32.name, "layer_comparison_fp32": _flip_summary(rows),
                  "layer_comparison_rows": rows}
        if grouped:
            g = grouped[0][k]
            report.update(group=k, groups=k_groups, t_range=[g["t_max"], g["t_min"]])
        target = fp32
        if precision == "fp16":
            target = to_fp16(fp32, out_dir / f"{stem}{suffix}.onnx")
            problems += _check(target, quantized)
            report["layer_comparison_fp16"] = _flip_summary(compare_layers(qunet, target, feed))
        report.update(onnx=target.name, violations=problems, export_seconds=round(time.perf_counter() - t0, 1))
        atomic_write(Path(f"{target}.json"), (json.dumps(report, indent=1) + "\n").encode())
        if problems:
            raise ValueError(f"{target}: {len(problems)} TensorRT conformance problems:\n  " + "\n  ".join(problems[:20]))
        fl = report["layer_comparison_fp32"]
        progress(f"  {target} ({report['export_seconds']} s): ONNX checker, Q/DQ conformance and per-layer coverage OK; "
                 f"int8 codes vs torch fake-quant, layer by layer: {fl['flip_rate']:.1e} flipped (max diff "
                 f"{fl['max_code_diff']}; end to end {fl['flip_rate_e2e']:.1e})"
                 + (f", FP16 graph {report['layer_comparison_fp16']['flip_rate']:.1e}" if precision == "fp16" else ""))
        out.append(ExportedModel(target, report))
    return out


def export_baseline(loaded: LoadedModel, out_dir: Path, *, precision: str = "fp16") -> ExportedModel:
    """The unquantized model as ONNX (FP16 math, FP32 I/O): the baseline engine's input."""
    fp32 = export_onnx(loaded.unet, out_dir / f"{loaded.name}-fp.fp32.onnx")
    problems = _check(fp32, set())
    target = to_fp16(fp32, out_dir / f"{loaded.name}-fp16.onnx") if precision == "fp16" else fp32
    problems += _check(target, set())
    if problems:
        raise ValueError(f"{target}: unexpected Q/DQ in the unquantized export: {problems[:5]}")
    report = {"model": str(loaded.source), "model_fingerprint": loaded.fingerprint(), "recipe": None,
              "precision": precision, "onnx": target.name}
    return ExportedModel(target, report)


def build_all(models: list[ExportedModel], options, *, flavour: str | None = None, progress=print) -> list[dict]:
    """Build one engine per exported graph (``<onnx stem>.plan``), sidecars included."""
    from .engine import build_engine
    sidecars = []
    for m in models:
        plan = m.onnx.with_suffix(".plan")
        r = m.report
        extra = {k: r[k] for k in ("group", "groups", "t_range", "model_fingerprint") if k in r}
        side = build_engine(m.onnx, plan, options, flavour=flavour, recipe=r.get("recipe"),
                            calibration=r.get("calibration"), precision="int8" if r.get("recipe") else "fp16",
                            extra=extra)
        prec = ", ".join(f"{t} {dict(c)}" for t, c in side["layer_precisions"].items()) or "not reported"
        progress(f"  {plan} ({side['plan_bytes'] / 1e6:.1f} MB, {side['flavour']} {side['trt_version']}, "
                 f"{side['build_seconds']} s): layer input precisions {prec}")
        sidecars.append(side)
    return sidecars


def check_target(qcfg: QuantConfig, recipe: str, target: str) -> None:
    """Refuse, before any work, what a target ("tensorrt" or "ort-cpu") cannot express."""
    from .calib.ranges import get_recipe
    if target == "tensorrt":
        if qcfg.shortcut_split:
            raise ValueError("--shortcut-split uses per-channel activation ranges, which TensorRT does not accept; "
                             "it is a fake-quant study only")
        return
    if qcfg.weight_bits != 8 or qcfg.shortcut_split or qcfg.quantize_attention:
        raise ValueError("the ort-cpu target supports W8A8 on Conv/Linear inputs only (no --weight-bits 4, "
                         "--shortcut-split or --quantize-attention)")
    if get_recipe(recipe).merge.startswith("groups"):
        raise ValueError("the ort-cpu target takes one range set; groups=K recipes are for K TensorRT engines")


def export_ort_cpu(loaded: LoadedModel, qcfg: QuantConfig, calib: CalibrationResult, recipe: str, spec, out_dir: Path, *,
                   n_outputs: int = 64, batch_size: int = 64, ops: str = "layers", progress=print) -> Path:
    """The int8 ONNX Runtime CPU graph (``trt_dm.ortcpu``) from the same calibration statistics as the
    TensorRT graph: its layer-input ranges come from them; conv/matmul output ranges are measured by
    ONNX Runtime on ``n_outputs`` calibration samples drawn with the same spec (another seed)."""
    from dataclasses import replace

    from .calib.stats import CalibStats
    from .calib.trajectories import collect
    from .ortcpu import INT8_OPS, export_ort_int8, optimized_op_types
    from .runners import TorchRunner, as_denoiser
    check_target(qcfg, recipe, "ort-cpu")
    t0 = time.perf_counter()
    stats = CalibStats.load(calib.stats_dir)
    small = replace(spec, n=min(n_outputs, spec.n), seed=spec.seed + 1)
    with TorchRunner(loaded.unet, device="cpu", dtype=torch.float32) as fp:
        cs = collect(as_denoiser(fp), Schedule.from_config(loaded.scheduler_config), loaded.sample_shape, small,
                     batch_size=batch_size, progress=False)
    feeds = [{"sample": x, "timestep": t} for x, t in cs.batches(16)]
    out = out_dir / f"{loaded.name}-{recipe_slug(recipe)}.ort-int8{'' if ops == 'layers' else '-' + ops}.onnx"
    export_ort_int8(loaded.unet, out, feeds, layers=set(calib.ranges), stats=stats, ranges=calib.ranges, ops=ops)
    op_counts = optimized_op_types(out)
    int8 = {k: v for k, v in op_counts.items() if k in INT8_OPS}
    report = {"model": str(loaded.source), "model_fingerprint": loaded.fingerprint(), "recipe": recipe,
              "target": "ort-cpu", "ops": ops, "ranges": str(calib.ranges_path), "input_ranges_from_statistics": len(calib.ranges),
              "output_range_samples": len(cs.t), "optimized_int8_ops": int8, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write(Path(f"{out}.json"), (json.dumps(report, indent=1) + "\n").encode())
    if not int8:
        raise ValueError(f"{out}: ONNX Runtime fused no int8 kernels (optimised op types {op_counts})")
    progress(f"  {out} ({report['seconds']} s): ONNX Runtime CPU int8 layout; after ONNX Runtime's optimisation: "
             + ", ".join(f"{k} {v}" for k, v in sorted(int8.items())))
    return out
