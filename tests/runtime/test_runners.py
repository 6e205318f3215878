import pytest
import torch

from trt_dm.core.signature import OUTPUT_NAME
from trt_dm.models.builders import tiny_unet2d, tiny_unet2d_condition
from trt_dm.runtime.base import SwitchedRunner, as_denoiser
from trt_dm.runtime.torch_runner import TorchRunner


def test_torch_runner_equals_direct_call():
    unet = tiny_unet2d(seed=1).eval()
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.tensor([999, 3])
    with torch.no_grad():
        ref = unet(x, t).sample
    with TorchRunner(unet, device="cpu") as r:
        assert r.name == "torch-cpu-float32"
        out = r.infer({"sample": x, "timestep": t})[OUTPUT_NAME]
        assert torch.equal(out, ref)
        assert torch.equal(as_denoiser(r)(x, t), ref)


def test_switched_runner_sends_each_row_to_its_groups_runner():
    """K runners of a groups=K deployment as one: a batch of one group is one call of that group's runner; a mixed
    batch gets, row by row, what each row's group's runner gives (here two different UNets, so a row sent to the
    wrong one would show)."""
    a, b = tiny_unet2d(seed=1).eval(), tiny_unet2d(seed=2).eval()
    x = torch.randn(4, a.config.in_channels, a.config.sample_size, a.config.sample_size)
    t = torch.tensor([990, 10, 700, 400])  # groups (999..500), (499..0): 0, 1, 0, 1
    with torch.no_grad():
        ra, rb = a(x, t).sample, b(x, t).sample
    with pytest.raises(ValueError, match="2 runners for 1 timestep groups"):
        SwitchedRunner([TorchRunner(a), TorchRunner(b)], [(999, 0)])
    with SwitchedRunner([TorchRunner(a), TorchRunner(b)], [(999, 500), (499, 0)], name="two") as r:
        assert r.name == "two" and r.signature.names == ["sample", "timestep"]
        out = r.infer({"sample": x, "timestep": t})[OUTPUT_NAME]
        torch.testing.assert_close(out[[0, 2]], ra[[0, 2]])
        torch.testing.assert_close(out[[1, 3]], rb[[1, 3]])
        low = torch.full((4,), 20)
        assert torch.equal(r.infer({"sample": x, "timestep": low})[OUTPUT_NAME], b(x, low).sample.detach())
    assert not r.is_active and not r.runners[0].is_active
    from trt_dm.runtime.ort import OrtRunner
    broken = SwitchedRunner([TorchRunner(a), OrtRunner("/nonexistent.onnx")], [(999, 500), (499, 0)])
    with pytest.raises(FileNotFoundError, match="nonexistent.onnx"):
        broken.__enter__()
    assert not broken.runners[0].is_active  # the runner that started is freed again


def test_conditional_runner_metadata_and_infer():
    unet = tiny_unet2d_condition(seed=0).eval()
    r = TorchRunner(unet, device="cpu")
    sig = r.signature
    assert sig.names == ["sample", "timestep", "encoder_hidden_states"]
    dim = unet.config.cross_attention_dim
    assert sig["encoder_hidden_states"].dims == (-1, -1, dim) and sig.conditioning == ["encoder_hidden_states"]
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    ehs = torch.randn(2, 5, dim)
    with r:
        out = as_denoiser(r)(x, torch.tensor([10, 20]), encoder_hidden_states=ehs)
    with torch.no_grad():
        torch.testing.assert_close(out, unet(x, torch.tensor([10, 20]), encoder_hidden_states=ehs).sample)


def test_ort_runner_without_spinning_computes_the_same(tmp_path):
    """spin=False (what `trt-dm serve` uses) only lets ONNX Runtime's threads sleep between calls: the session
    carries the setting and the outputs are the spinning session's, bit for bit."""
    from trt_dm.export.onnx import export_onnx
    from trt_dm.runtime.ort import OrtRunner
    unet = tiny_unet2d(seed=1).eval()
    path = export_onnx(unet, tmp_path / "u.onnx")
    s = unet.config.sample_size
    feed = {"sample": torch.randn(3, unet.config.in_channels, s, s), "timestep": torch.tensor([999, 500, 3])}
    with OrtRunner(path, threads=2) as spinning, OrtRunner(path, threads=2, spin=False) as sleeping:
        opts = sleeping.session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        with pytest.raises(RuntimeError, match="does not have"):  # unset: ONNX Runtime's default, spinning
            spinning.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        assert torch.equal(sleeping.infer(feed)[OUTPUT_NAME], spinning.infer(feed)[OUTPUT_NAME])


def test_runner_errors():
    unet = tiny_unet2d(seed=1).eval()
    s = unet.config.sample_size
    r = TorchRunner(unet, device="cpu")
    x = torch.randn(1, unet.config.in_channels, s, s)
    with pytest.raises(RuntimeError, match="not active"):
        r.infer({"sample": x, "timestep": torch.tensor([1])})
    with r:
        with pytest.raises(ValueError, match=r"missing \['timestep'\]"):
            r.infer({"sample": x})
        with pytest.raises(ValueError, match=r"input 'sample' has shape \(1, 3, 8, 8\)"):
            r.infer({"sample": torch.randn(1, 3, 8, 8), "timestep": torch.tensor([1])})
    with pytest.raises(ValueError, match="fp16 on CPU"):
        TorchRunner(unet, device="cpu", dtype=torch.float16)


def test_runtime_imports_neither_the_builder_nor_modelopt():
    """Loading engines or graphs (the runtime) must not pull in the engine builder, the exporters, the deployment
    targets, calibration or modelopt, or TensorRT before an engine is opened."""
    import subprocess
    import sys
    code = ("import sys, trt_dm.runtime.open, trt_dm.runtime.base, trt_dm.runtime.ort, trt_dm.runtime.tensorrt; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('modelopt', 'tensorrt', 'tensorrt_rtx') or m in ('trt_dm.targets.trt_builder', 'trt_dm.export.onnx', 'trt_dm.export.ort_int8', "
            "'trt_dm.quant.modules', 'trt_dm.quant.calibrate') or m.startswith(('trt_dm.targets', 'trt_dm.quant.calib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_targets_do_not_import_the_runtime():
    """The deployment targets make artifacts; they never load the runtime that runs them (one-way data flow)."""
    import subprocess
    import sys
    code = ("import sys, trt_dm.targets.tensorrt, trt_dm.targets.ort_cpu, trt_dm.targets.openvino; "
            "print(sorted(m for m in sys.modules if m in ('trt_dm.runtime.base', 'trt_dm.runtime.openvino', 'trt_dm.runtime.tensorrt')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout
