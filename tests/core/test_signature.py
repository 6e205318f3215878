"""One input signature, read by every stage: a class-conditional UNet2DModel exports with its class_labels
input, runs in ONNX Runtime and torch alike, and quantized graphs of it pass the TensorRT checks."""
import onnx
import pytest
import torch

from trt_dm.core.signature import OUTPUT_NAME, Signature
from trt_dm.export.onnx import check_layers, check_qdq, export_onnx
from trt_dm.models.builders import tiny_unet2d, tiny_unet2d_condition
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.modules import activation_quantizers, apply_ranges, quantize_model, quantized_layers
from trt_dm.runtime.ort import OrtRunner
from trt_dm.runtime.torch_runner import TorchRunner


def test_signature_feeds_and_checks():
    sig = Signature.from_unet(tiny_unet2d_condition(0))
    assert sig.names == ["sample", "timestep", "encoder_hidden_states"] and sig.conditioning == ["encoder_hidden_states"]
    feed = sig.example(3, seq_len=5)
    assert feed["encoder_hidden_states"].shape == (3, 5, 16) and feed["timestep"].dtype == torch.int64
    sig.check(feed)
    with pytest.raises(ValueError, match=r"missing \['encoder_hidden_states'\]"):
        sig.check({"sample": feed["sample"], "timestep": feed["timestep"]})
    with pytest.raises(ValueError, match="has batch 2, 'sample' has 3"):
        sig.check({**feed, "timestep": feed["timestep"][:2]})
    with pytest.raises(ValueError, match=r"input 'sample' has shape \(3, 2, 8, 8\)"):
        sig.check({**feed, "sample": torch.zeros(3, 2, 8, 8)})
    assert sig.example(2, seed=4)["sample"].equal(sig.example(2, seed=4)["sample"])


@pytest.mark.parametrize("overrides", [dict(num_class_embeds=10), dict(num_class_embeds=7, resnet_time_scale_shift="scale_shift",
                                                                        block_out_channels=(8, 24))])
def test_class_conditional_unet_exports_and_runs_in_onnx_runtime(tmp_path, overrides):
    unet = tiny_unet2d(0, **overrides)
    path = export_onnx(unet, tmp_path / "cls.onnx")
    sig = Signature.from_onnx(path)
    assert sig.names == ["sample", "timestep", "class_labels"] and sig["class_labels"].shape == ("batch",)
    assert sig["class_labels"].dtype == torch.int64
    feed = Signature.from_unet(unet).example(3, seed=1)
    with OrtRunner(path) as ort, TorchRunner(unet, device="cpu") as ref:
        assert ort.signature.names == ref.signature.names
        a, b = ort.infer(feed)[OUTPUT_NAME], ref.infer(feed)[OUTPUT_NAME]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        other = ref.infer({**feed, "class_labels": (feed["class_labels"] + 1) % overrides["num_class_embeds"]})[OUTPUT_NAME]
        assert not torch.allclose(other, b)  # the label reaches the output
        with pytest.raises(ValueError, match=r"missing \['class_labels'\]"):
            ort.infer({"sample": feed["sample"], "timestep": feed["timestep"]})


def test_class_conditional_qdq_graph_passes_the_checks(tmp_path):
    q = quantize_model(tiny_unet2d(0, num_class_embeds=10), QuantConfig())
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    path = export_onnx(q, tmp_path / "cls-q.onnx")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "class_labels"]
    assert check_qdq(model).ok and check_layers(model, set(quantized_layers(q))) == []
