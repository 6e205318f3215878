"""``OrtRunner``: an ONNX graph in ONNX Runtime (CPU, or the CUDA provider when present and asked for)."""
from __future__ import annotations

import torch

from trt_dm.core.signature import OUTPUT_NAME, Signature, TensorSpec, dtypes
from trt_dm.runtime.base import Runner


def has_fp8(path) -> bool:
    """Whether an ONNX graph holds FP8 (FLOAT8E4M3FN) tensors: its Q/DQ zero points (read without external data)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)


class OrtRunner(Runner):
    """An ONNX model in ONNX Runtime (CPU; CUDA provider when present and asked for).

    ``spin``: ONNX Runtime's worker threads busy-wait for the next work item after each call (its default: the
    fastest for calls back to back, as in sampling). False lets them sleep, for a process that does other work
    between calls: `trt-dm serve`, whose HTTP and PNG work the spinning threads otherwise slow (BENCHMARKS.md)."""

    _DTYPES = dtypes("onnxruntime")

    def __init__(self, path, *, providers: list[str] | None = None, threads: int | None = None,
                 name: str = "onnxruntime", spin: bool = True) -> None:
        super().__init__()
        import onnxruntime as ort
        self.path = str(path)
        self.providers = providers or ["CPUExecutionProvider"]
        unknown = [p for p in self.providers if p not in ort.get_available_providers()]
        if unknown:
            raise ValueError(f"ONNX Runtime providers {unknown} are not available here; available: "
                             f"{ort.get_available_providers()}")
        self.threads = threads
        self.name = name
        self.spin = spin
        self.device = torch.device("cpu")
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not self.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if has_fp8(self.path):  # its extended optimizers move Transposes between FP8 Q and DQ, then fail on them
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(self.path, opts, providers=self.providers)
        unknown = [i for i in self.session.get_inputs() if i.type not in self._DTYPES]
        if unknown:
            raise ValueError(f"{self.path}: inputs {[(i.name, i.type) for i in unknown]} have types this runner "
                             f"does not feed; accepted: {sorted(self._DTYPES)}")
        self._signature = Signature(tuple(
            TensorSpec(i.name, self._DTYPES[i.type], tuple(d if isinstance(d, int) else (d or "dynamic") for d in i.shape),
                       i.name not in ("sample", "timestep"))
            for i in self.session.get_inputs()))

    def deactivate(self) -> None:
        self.session = None

    @property
    def signature(self) -> Signature:
        if self.session is None:
            raise RuntimeError(f"{self.name} is not active: use it as `with runner:`")
        return self._signature

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {s.name: feed[s.name].detach().cpu().to(s.dtype).numpy() for s in self._signature.inputs}
        out = self.session.run([OUTPUT_NAME], arrays)[0]
        return {OUTPUT_NAME: torch.from_numpy(out).float()}
