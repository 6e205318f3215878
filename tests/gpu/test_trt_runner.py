"""TrtRunner on a real GPU: engine vs torch fake-quant, CUDA-graph replay vs eager, shape changes, sampling.
Skipped without CUDA (marked gpu); run by tools/gpu_check.sh on a lent GPU machine."""
import pytest
import torch

from trt_dm.core.flavour import EngineError, trt_module
from trt_dm.core.signature import OUTPUT_NAME
from trt_dm.export.fp16 import to_fp16
from trt_dm.export.onnx import export_onnx
from trt_dm.models.builders import tiny_unet2d
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.modules import activation_quantizers, apply_ranges, quantize_model
from trt_dm.runtime.base import as_denoiser
from trt_dm.runtime.tensorrt import TrtRunner
from trt_dm.runtime.torch_runner import TorchRunner
from trt_dm.targets.trt_builder import BuildOptions, build_engine

pytestmark = pytest.mark.gpu


def _flavour():
    try:
        trt, flavour = trt_module()
    except EngineError as e:
        pytest.skip(f"no TensorRT here: {e}")
    if flavour.compute_targets:
        from trt_dm.runtime.tensorrt import rtx_supports
        ok, known = rtx_supports(trt, torch.cuda.get_device_capability())
        if not ok:
            pytest.skip(f"TensorRT-RTX targets {known}, not this GPU ({torch.cuda.get_device_name()}); "
                        "full TensorRT is needed here")
    return flavour


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig())
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    onnx_path = to_fp16(export_onnx(q, tmp / "tiny.fp32.onnx"), tmp / "tiny.onnx")
    flavour = _flavour()
    cc = "SM{}{}".format(*torch.cuda.get_device_capability())
    opts = BuildOptions(min_batch=1, opt_batch=4, max_batch=8, rtx_targets=(cc,))
    build_engine(onnx_path, tmp / "tiny.plan", opts, flavour=flavour, recipe="fixed-2.0")
    return q, tmp / "tiny.plan"


def _feed(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 1, 16, 16, generator=g), "timestep": torch.randint(0, 1000, (batch,), generator=g)}


def test_engine_matches_torch_fake_quant(engine):
    q, plan = engine
    feed = _feed(4)
    with TrtRunner(plan) as trt_r, TorchRunner(q, device="cpu", dtype=torch.float32) as ref:
        a = trt_r.infer(feed)[OUTPUT_NAME].cpu()
        b = ref.infer(feed)[OUTPUT_NAME]
    # FP16 math between int8 layers + int8 rounding flips: close, not equal
    assert (a - b).abs().mean() < 2e-2 * b.abs().mean() + 1e-3
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_cuda_graph_replay_equals_eager_across_shape_changes(engine):
    _, plan = engine
    with TrtRunner(plan, eager_kernels=True) as eager, TrtRunner(plan, cuda_graph=True, warmup=1, eager_kernels=True) as graph:
        for batch in (2, 2, 2, 3, 3, 2, 2):  # capture at the 2nd call of a shape; new shapes drop the graph
            feed = _feed(batch, seed=batch)
            assert torch.equal(eager.infer(feed)[OUTPUT_NAME], graph.infer(feed)[OUTPUT_NAME])
        if not graph._flavour.jit_runtime:  # TensorRT-RTX captures its own graphs inside the context
            assert graph._graph is not None and graph.state.capture_failed is None


def test_batch_outside_profile_is_refused_and_the_runner_recovers(engine):
    _, plan = engine
    with TrtRunner(plan) as r:
        a = r.infer(_feed(2))[OUTPUT_NAME]
        with pytest.raises(ValueError, match="optimization profile"):
            r.infer(_feed(9))
        assert torch.equal(r.infer(_feed(2))[OUTPUT_NAME], a)


def test_sampler_end_to_end(engine):
    from trt_dm.core.schedule import Schedule
    from trt_dm.sampling import sample
    q, plan = engine
    sched = Schedule.from_config({"num_train_timesteps": 1000})
    with TrtRunner(plan, cuda_graph=True) as r, TorchRunner(q, device="cpu", dtype=torch.float32) as ref:
        a = sample(as_denoiser(r), sched, [0, 1, 2], (1, 16, 16), steps=10, disable=True)
        b = sample(as_denoiser(ref), sched, [0, 1, 2], (1, 16, 16), steps=10, disable=True)
    assert a.shape == b.shape == (3, 1, 16, 16)
    assert (a.cpu() - b).abs().mean() < 5e-2


def test_group_engines_share_one_device_memory_block(engine):
    """Two contexts on one shared block (the K group engines' layout) compute what a context of its own does."""
    from trt_dm.runtime.tensorrt import SharedDeviceMemory
    _, plan = engine
    shared = SharedDeviceMemory()
    with TrtRunner(plan) as alone, TrtRunner(plan, shared_memory=shared) as a, TrtRunner(plan, shared_memory=shared) as b:
        feed = _feed(3)
        ref = alone.infer(feed)[OUTPUT_NAME]
        assert torch.equal(a.infer(feed)[OUTPUT_NAME], ref) and torch.equal(b.infer(feed)[OUTPUT_NAME], ref)
        assert torch.equal(a.infer(feed)[OUTPUT_NAME], ref)
    assert shared.nbytes >= 1
