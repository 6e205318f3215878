"""The TensorRT target (TensorRT 10/11 and TensorRT-RTX): calibrated model -> checked Q/DQ ONNX -> engines.

The graphs come from the shared Q/DQ export pipeline (``trt_dm.export.qdq``); what is TensorRT's here is the
unquantized baseline and the engine build (``trt_dm.targets.trt_builder``). Files, for model M and recipe R::

    engines/M-R.fp32.onnx, M-R.onnx(.json)   the checked Q/DQ graphs and their report (``trt_dm.export.qdq``)
    engines/M-R.plan(.json) the engine and its sidecar
    engines/M-fp16.onnx / .plan   the unquantized FP16 baseline
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from trt_dm.core.flavour import Flavour
from trt_dm.core.signature import Signature
from trt_dm.core.stages import stage
from trt_dm.export.fp16 import to_fp16
from trt_dm.export.job import Exported, ExportJob
from trt_dm.export.onnx import export_onnx
from trt_dm.export.qdq import (
    BUILD_MEMORY_PER_GRAPH_BYTE,
    ExportCheckError,
    check_graph,
    check_settings,
    export_qdq,
    probe_inputs,
    report_for,
    require_graph_memory,
)
from trt_dm.targets.base import Target
from trt_dm.targets.trt_builder import BuildOptions, build_engine


class TensorRTTarget(Target):
    """Symmetric int8 Q/DQ graphs built into TensorRT / TensorRT-RTX engines, with an unquantized baseline."""
    name = "tensorrt"
    help = "symmetric int8 Q/DQ on layer inputs, FP16 elsewhere: TensorRT 10/11 and TensorRT-RTX engines"
    order = 0
    builds = True

    def check(self, qcfg, recipe, options: dict | None = None) -> None:
        """What the Q/DQ graph cannot express (``trt_dm.export.qdq.check_settings``)."""
        check_settings(qcfg, recipe, options)

    def export(self, job: ExportJob, progress: Callable[[str], None] = print) -> list[Exported]:
        """The shared Q/DQ export (``trt_dm.export.qdq.export_qdq``): checked graphs and reports."""
        return export_qdq(job, progress)

    def export_baseline(self, loaded, out_dir: Path, *, precision: str = "fp16") -> Exported:
        """The unquantized model as ONNX (FP16 math, FP32 I/O): the baseline engine's input."""
        with stage("baseline: ONNX (fp32) + FP16 conversion + checks"):
            fp32 = export_onnx(loaded.unet, out_dir / f"{loaded.name}-fp.fp32.onnx")
            problems = check_graph(fp32, set())
            target = (to_fp16(fp32, out_dir / f"{loaded.name}-fp16.onnx", probe_inputs(loaded)) if precision == "fp16"
                      else fp32)
            problems += check_graph(target, set())
        if problems:
            raise ExportCheckError(f"{target}: unexpected Q/DQ in the unquantized export: {problems[:5]}")
        report = report_for(loaded, target.name, False, precision=precision)
        report.save(target)
        return Exported(target, report)

    def build(self, graphs: list[Exported], options=None, *, flavour: str | Flavour | None = None,
              progress: Callable[[str], None] = print) -> list:
        """One engine per exported graph (``<onnx stem>.plan``), sidecars included; returns the sidecars."""
        sidecars = []
        for m in graphs:
            plan = m.onnx.with_suffix(".plan")
            r = m.report
            extra = {k: getattr(r, k) for k in ("group", "groups", "t_range", "guidance_scale", "text_pipeline")
                     if getattr(r, k) is not None}
            extra["model_fingerprint"] = r.model_fingerprint or None
            kind = "quantized" if r.int8 else "unquantized"
            require_graph_memory(m.onnx, BUILD_MEMORY_PER_GRAPH_BYTE[kind], "the engine build",
                                 "--no-baseline skips the unquantized engine" if not r.int8 else
                                 f"the checked ONNX stays: `trt-dm build {m.onnx}` builds it elsewhere",
                                 at_least=not r.int8, measured_on="sdxl-unet")
            with stage(f"build {plan.name}"):
                side = build_engine(m.onnx, plan, options or BuildOptions(), flavour=flavour, recipe=r.recipe,
                                    calibration=r.calibration,
                                    precision=_precision(r.quant or {}) if r.int8 else "fp16",
                                    signature=Signature.from_dict(r.signature) if r.signature else None, extra=extra)
            prec = ", ".join(f"{t} {dict(c)}" for t, c in side.layer_precisions.items()) or "not reported"
            progress(f"  {plan} ({side.plan_bytes / 1e6:.1f} MB, {side.flavour} {side.trt_version}, "
                     f"{side.build_seconds} s): layer input precisions {prec}")
            sidecars.append(side)
        return sidecars

    def usage(self, paths: list[Path]) -> str:
        """One line telling the user how to run what was produced."""
        return f"sample with: trt-dm sample --engine {' '.join(str(p) for p in paths)} (needs a GPU)"


def _precision(quant: dict) -> str:
    """A quantized graph's 8-bit formats from its report's quantization config: int8, fp8 or int8+fp8 (a mix)."""
    return "int8+fp8" if quant.get("fp8_layers") else quant.get("format", "int8")


TARGET = TensorRTTarget()
