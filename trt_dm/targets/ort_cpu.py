"""The ONNX Runtime CPU int8 target (``--target ort-cpu``): ONNX Runtime's fast int8 layout (``trt_dm.ortcpu``:
uint8 asymmetric activations, Q/DQ around inputs and outputs) from the same calibration statistics as the
TensorRT graph. Nothing to build: ONNX Runtime runs the graph as it is (``trt-dm sample --onnx``)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from trt_dm.core.artifacts import ExportReport
from trt_dm.export.job import Exported, ExportJob, recipe_slug
from trt_dm.export.ort_int8 import INT8_OPS, export_ort_int8, optimized_op_types
from trt_dm.quant.calib.ranges import get_recipe
from trt_dm.quant.calib.stats import CalibStats
from trt_dm.targets.base import Target

OPS = ("layers", "all")


class OrtCpuTarget(Target):
    """ONNX Runtime's int8 CPU layout from the same calibration statistics; nothing to build."""
    name = "ort-cpu"
    help = ("ONNX Runtime's fast int8 CPU layout (uint8 activations, Q/DQ around inputs and outputs of the recipe's "
            "layers), from the same statistics")
    order = 10

    def check(self, qcfg, recipe, options: dict | None = None) -> None:
        """What ONNX Runtime's int8 layout cannot express: W8A8 on Conv/Linear inputs, one range set, one graph."""
        if qcfg.uses_fp8:
            raise ValueError(f"--format {qcfg.precision}: the ort-cpu target writes ONNX Runtime's int8 layout, which has no "
                             "FP8 form; FP8 engines come from --target tensorrt (GPUs with FP8: SM89 and newer)")
        if qcfg.weight_bits != 8 or qcfg.shortcut_split or qcfg.quantize_attention:
            raise ValueError("the ort-cpu target supports W8A8 on Conv/Linear inputs only (no --weight-bits 4, "
                             "--shortcut-split or --quantize-attention)")
        if qcfg.weight_calib != "max" or qcfg.rounding != "nearest":
            # ONNX Runtime's quantizer sets the weights' scales and rounding itself (abs-max, to nearest): a
            # searched clip or learned rounding would be dropped without a word
            raise ValueError("the ort-cpu target quantizes weights with ONNX Runtime's own abs-max ranges, rounded to "
                             "nearest: --weight-calib mse and --rounding adaround need --target tensorrt or openvino "
                             "(the Q/DQ graph carries the weights as calibrated)")
        if qcfg.smooth:
            raise ValueError("the ort-cpu target quantizes the FP model with ONNX Runtime's quantizer, which has no "
                             "form for channel balancing: --smooth needs --target tensorrt or openvino (the Q/DQ graph "
                             "carries the balanced weights and the Mul before each balanced layer)")
        if qcfg.fp_from_t is not None:
            raise ValueError("the ort-cpu target writes one graph; --keep-fp-from-t deploys one per timestep segment "
                             "(targets tensorrt and openvino)")
        if recipe.merge.startswith("groups"):
            raise ValueError(f"the ort-cpu target takes one range set; {recipe.name!r} has timestep groups (for the "
                             "tensorrt and openvino targets): use a one-range recipe such as ptq4dm (the ort-cpu "
                             "default)")

    def export(self, job: ExportJob, progress: Callable[[str], None] = print, *, n_outputs: int = 64) -> list[Exported]:
        """Layer-input ranges from the statistics; conv/matmul output ranges measured by ONNX Runtime on
        ``n_outputs`` calibration samples drawn with the same spec (another seed)."""
        if (job.options or {}).get("one_graph"):
            raise ValueError("--one-graph is a form of the TensorRT-layout graph (targets tensorrt, openvino); the "
                             "ort-cpu layout has one range set")
        # (here, not at the top: quant.calibrate loads the runtime's torch runner, which a target never imports)
        from trt_dm.quant.calibrate import fp_calibration_set
        ops = (job.options or {}).get("ops", "layers")
        if ops not in OPS:
            raise ValueError(f"ort-cpu ops must be one of {OPS}, got {ops!r}")
        self.check(job.qcfg, get_recipe(job.recipe), job.options)
        loaded, calib = job.loaded, job.calib
        t0 = time.perf_counter()
        stats = CalibStats.load(calib.stats_dir)
        small = replace(job.spec, n=min(n_outputs, job.spec.n), seed=job.spec.seed + 1)
        cs, guidance = fp_calibration_set(loaded, small, batch_size=job.batch_size, progress=False)
        # what the UNet sees: with guidance, both halves of every call
        feeds = [{"sample": x, "timestep": t, **c} for x, t, c in cs.unet_batches(16, guidance)]
        out = job.out_dir / f"{loaded.name}-{recipe_slug(job.recipe)}.ort-int8{'' if ops == 'layers' else '-' + ops}.onnx"
        export_ort_int8(loaded.unet, out, feeds, layers=set(calib.ranges.names), stats=stats, ranges=calib.ranges, ops=ops)
        op_counts = optimized_op_types(out)
        int8 = {k: v for k, v in op_counts.items() if k in INT8_OPS}
        report = ExportReport(onnx=out.name, target=self.name, int8=True, precision="fp32", model=str(loaded.source),
                              model_fingerprint=loaded.fingerprint(), schedule_fingerprint=loaded.schedule_fingerprint(),
                              recipe=job.recipe, ranges=str(calib.ranges_path), signature=loaded.signature.to_dict(),
                              quantized_layers=len(calib.ranges), export_seconds=round(time.perf_counter() - t0, 1),
                              extra={"ops": ops, "input_ranges_from_statistics": len(calib.ranges),
                                     "output_range_samples": len(cs.t), "optimized_int8_ops": int8})
        report.save(out)
        if not int8:
            raise RuntimeError(f"{out}: ONNX Runtime fused no int8 kernels (optimised op types {op_counts})")
        progress(f"  {out} ({report.export_seconds} s): ONNX Runtime CPU int8 layout; after ONNX Runtime's "
                 "optimisation: " + ", ".join(f"{k} {v}" for k, v in sorted(int8.items())))
        return [Exported(out, report)]

    def usage(self, paths: list[Path]) -> str:
        """One line telling the user how to run what was produced."""
        return f"sample on CPU with: trt-dm sample --onnx {' '.join(str(p) for p in paths)}"


TARGET = OrtCpuTarget()
