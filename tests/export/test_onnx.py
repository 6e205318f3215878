"""Q/DQ export of a calibrated tiny UNet: conformance checks (incl. planted violations) and ONNX Runtime
agreement with torch fake-quant."""
import contextlib

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from trt_dm.core.signature import OUTPUT_NAME
from trt_dm.export.compare import compare_layers
from trt_dm.export.onnx import check_layers, check_qdq, export_onnx
from trt_dm.models.builders import tiny_unet2d
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.modules import activation_quantizers, apply_ranges, quantize_model, quantized_layers
from trt_dm.runtime.ort import OrtRunner
from trt_dm.runtime.torch_runner import TorchRunner


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig())
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    path = export_onnx(q, tmp_path_factory.mktemp("onnx") / "tiny_qdq.onnx")
    return q, path


def test_export_is_conformant_and_matches_fake_quant(qdq):
    q, path = qdq
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    rep = check_qdq(model)
    assert rep.ok, rep.violations
    n_layers = len(activation_quantizers(q))
    assert rep.quantize == rep.dequantize == 2 * n_layers  # one pair on each input and on each weight
    assert rep.per_channel == 2 * n_layers  # each weight Q and DQ per channel; activations per tensor
    assert check_layers(model, set(quantized_layers(q))) == []
    assert check_layers(model, set(quantized_layers(q)) | {"conv_out"}) == [
        "conv_out: quantized by the recipe but its input has no Q/DQ in the graph"]
    one = next(iter(quantized_layers(q)))
    assert check_layers(model, set(quantized_layers(q)) - {one}) == [
        f"{one}: not quantized by the recipe but has Q/DQ in the graph"]
    assert not list(path.parent.glob(".*tmp*"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 16, 16, generator=g)  # another batch size than the export's
    t = torch.tensor([5, 500, 999])
    with OrtRunner(path) as r, TorchRunner(q, device="cpu") as tr:
        assert r.signature["sample"].shape == ("batch", 1, 16, 16) and r.signature == tr.signature
        a = r.infer({"sample": x, "timestep": t})[OUTPUT_NAME]
        b = tr.infer({"sample": x, "timestep": t})[OUTPUT_NAME]
    # Layer by layer, from the same quantized inputs, the int8 codes agree except rare rounding flips of one code
    # (ORT and torch order sums differently). End to end, a flip early in the network moves the next layer's
    # input by a quantization step and spreads: how often that happens depends on the CPU's kernels (none on an
    # AVX-512 VNNI machine, one in ~47 layers on an AVX2 one), so the end-to-end check is a loose one.
    rows = compare_layers(q, path, {"sample": x, "timestep": t})
    assert len(rows) == n_layers
    assert sum(r["flips"] for r in rows) <= 1e-3 * sum(r["n"] for r in rows) and max(r["max_diff"] for r in rows) <= 1
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def _mutate(path, tmp_path, fn):
    model = onnx.load(str(path))
    consts = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = next(a.t for a in n.attribute if a.name == "value")
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    fn(model, node, consts)
    out = tmp_path / "bad.onnx"
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("kind,msg", [
    ("nonzero_zp", "non-zero zero point"),
    ("uint8", "zero point type uint8"),
    ("nan_scale", "finite and > 0"),
])
def test_planted_violations_are_caught(qdq, tmp_path, kind, msg):
    _, path = qdq

    def plant(model, node, consts):
        if kind == "nan_scale":
            t = consts[node.input[1]]
            arr = numpy_helper.to_array(t).copy()
            arr.flat[0] = np.nan
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
        else:
            t = consts[node.input[2]]
            arr = numpy_helper.to_array(t)
            new = np.ones_like(arr) if kind == "nonzero_zp" else arr.astype(np.uint8)
            t.CopyFrom(numpy_helper.from_array(new, t.name))

    rep = check_qdq(_mutate(path, tmp_path, plant))
    assert not rep.ok and any(msg in v for v in rep.violations), rep.violations


def test_missing_qdq_on_a_quantized_layer_is_caught(qdq, tmp_path):
    _, path = qdq

    def bypass(model, node, consts):  # route the Q's input straight to its DQ's consumers
        dq = next(n for n in model.graph.node if node.output[0] in n.input)
        for n in model.graph.node:
            for i, name in enumerate(n.input):
                if name == dq.output[0]:
                    n.input[i] = node.input[0]
        model.graph.node.remove(dq)
        model.graph.node.remove(node)

    bad = _mutate(path, tmp_path, bypass)
    q, _ = qdq
    problems = check_layers(bad, set(quantized_layers(q)))
    assert len(problems) == 1 and "has no Q/DQ in the graph" in problems[0]


@pytest.mark.parametrize("weight_calib", ["max", "mse"])
def test_w4_weights_on_the_int8_grid_keep_outputs_and_export_4bit_codes(tmp_path, weight_calib):
    """W4A8 for int8 engines: the 4-bit weights stored on the int8 grid give the W4 fake-quant model's outputs,
    and the exported graph's weight codes are the 4-bit integers (the check refuses wider ones)."""
    from trt_dm.export.onnx import weight_code_ranges
    from trt_dm.export.qdq import check_codes
    from trt_dm.quant.modules import weights_on_int8_grid
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig(weight_bits=4, weight_calib=weight_calib))
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    g = torch.Generator().manual_seed(0)
    feed = {"sample": torch.randn(3, 1, 16, 16, generator=g), "timestep": torch.tensor([5, 500, 999])}
    with torch.no_grad():
        before = q(**feed).sample
        assert weights_on_int8_grid(q) == len(quantized_layers(q))
        after = q(**feed).sample
        assert weights_on_int8_grid(q) == 0  # already 8-bit: nothing left to convert
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    path = export_onnx(q, tmp_path / "w4.fp32.onnx")
    assert check_qdq(path).ok
    codes = weight_code_ranges(path)
    assert set(codes) == set(quantized_layers(q))
    assert all(-8 <= lo and hi <= 7 for lo, hi in codes.values()) and max(hi for _, hi in codes.values()) == 7
    assert check_codes(codes, QuantConfig(weight_bits=4), set(quantized_layers(q))) == []
    rows = compare_layers(q, path, feed)
    assert sum(r["flips"] for r in rows) <= 1e-3 * sum(r["n"] for r in rows) and max(r["max_diff"] for r in rows) <= 1
    # an ordinary W8 graph uses the whole int8 range: the W4 check names its layers
    w8 = quantize_model(tiny_unet2d(seed=0), QuantConfig())
    apply_ranges(w8, {n: 2.0 for n in activation_quantizers(w8)})
    codes8 = weight_code_ranges(export_onnx(w8, tmp_path / "w8.fp32.onnx"))
    problems = check_codes(codes8, QuantConfig(weight_bits=4), set(quantized_layers(w8)))
    assert len(problems) == len(codes8) and "outside the 4-bit integers [-8, 7]" in problems[0]


def test_w4a8_with_8bit_layers_exports_each_layer_on_its_own_grid(tmp_path):
    """Mixed W4A8 (--w8-layers): the named layers keep 8-bit weights, the rest 4-bit; on the int8 grid the
    export's codes say which is which, and the check holds each layer to its own width."""
    from trt_dm.export.onnx import weight_code_ranges
    from trt_dm.export.qdq import check_codes
    from trt_dm.quant.modules import weights_on_int8_grid
    with pytest.raises(ValueError, match="needs weight_bits 4 or 7"):
        QuantConfig(w8_layers=("down_blocks.0.*",))
    with pytest.raises(ValueError, match="'nope.*' matches no quantized layer"):
        quantize_model(tiny_unet2d(seed=0), QuantConfig(weight_bits=4, w8_layers=("nope.*",)))
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig(weight_bits=4, w8_layers=("down_blocks.0.*",)))
    layers = quantized_layers(q)
    wide = {n for n in layers if n.startswith("down_blocks.0.")}
    assert wide and {n for n, m in layers.items() if m.weight_quantizer.num_bits == 8} == wide
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    assert weights_on_int8_grid(q) == len(layers) - len(wide)  # only the 4-bit layers move to the int8 grid
    codes = weight_code_ranges(export_onnx(q, tmp_path / "mixed.fp32.onnx"))
    assert all(-8 <= codes[n][0] and codes[n][1] <= 7 for n in set(layers) - wide)
    assert all(codes[n][1] == 127 or codes[n][0] <= -127 for n in wide)  # abs-max weights reach the 8-bit ends
    assert check_codes(codes, QuantConfig(weight_bits=4, w8_layers=("down_blocks.0.*",)), set(layers)) == []
    # without the patterns, the 8-bit layers are named
    problems = check_codes(codes, QuantConfig(weight_bits=4), set(layers))
    assert len(problems) == len(wide) and all(p.split(":")[0] in wide for p in problems)
    from trt_dm.export.job import graph_stem  # its files are named apart from the all-4-bit model's
    stem = graph_stem("m", "ptq4dm", QuantConfig(weight_bits=4, w8_layers=("down_blocks.0.*",)))
    assert stem.startswith("m-ptq4dm-w4-w8") and stem != graph_stem("m", "ptq4dm", QuantConfig(weight_bits=4))


def test_per_tensor_external_files_are_gathered_into_one_data_file(qdq, tmp_path):
    """torch's export of a graph over 2 GB writes one file per tensor; ``gather_external`` puts them into one
    `<name>.data` (page-aligned), a tensor at a time: the same tensors bit for bit, the same outputs in ONNX Runtime,
    and no temporary files left."""
    from onnx.external_data_helper import uses_external_data

    from trt_dm.export.onnx import gather_external
    src_dir = tmp_path / "torch"
    src_dir.mkdir()
    model = onnx.load(str(qdq[1]))
    onnx.save_model(model, str(src_dir / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)  # torch's layout: one file per tensor
    assert len(list(src_dir.iterdir())) > 10
    out = gather_external(src_dir / "g.onnx", tmp_path / "one.onnx")
    graph = onnx.load(str(out), load_external_data=False)
    ext = [t for t in graph.graph.initializer if uses_external_data(t)]
    assert ext and {e.value for t in ext for e in t.external_data if e.key == "location"} == {"one.onnx.data"}
    offsets = [int(e.value) for t in ext for e in t.external_data if e.key == "offset"]
    assert all(o % 4096 == 0 for o in offsets) and len(set(offsets)) == len(ext)
    full, ref = onnx.load(str(out)), onnx.load(str(qdq[1]))
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in full.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in ref.graph.initializer}
    feed = {"sample": torch.randn(2, 1, 16, 16), "timestep": torch.tensor([3, 500])}
    with OrtRunner(out) as a, OrtRunner(qdq[1]) as b:
        assert torch.equal(a.infer(feed)[OUTPUT_NAME], b.infer(feed)[OUTPUT_NAME])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.onnx", "one.onnx.data", "torch"]


def test_fp16_conversion_with_the_one_pass_cleanup_is_modelopts_own(tmp_path, monkeypatch):
    """``to_fp16`` replaces ModelOpt autocast's quadratic removal of consumer-less nodes by a one-pass version of
    the same rule: the FP16 graph of a quantized UNet is the one ModelOpt's own code gives, node for node."""
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    import trt_dm.export.fp16 as E
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig())
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    src = export_onnx(q, tmp_path / "q.fp32.onnx")
    original = PrecisionConverter.__dict__["_cleanup_no_consumer_nodes"]
    fast = onnx.load(str(E.to_fp16(src, tmp_path / "fast.onnx")))
    assert PrecisionConverter.__dict__["_cleanup_no_consumer_nodes"] is original  # restored after the conversion
    monkeypatch.setattr(E, "_one_pass_cleanup", contextlib.nullcontext)
    own = onnx.load(str(E.to_fp16(src, tmp_path / "own.onnx")))
    assert [n.SerializeToString() for n in fast.graph.node] == [n.SerializeToString() for n in own.graph.node]
    assert len(fast.graph.node) > 100
    assert ({t.name: t.SerializeToString() for t in fast.graph.initializer}
            == {t.name: t.SerializeToString() for t in own.graph.initializer})


def test_streamed_reference_gives_modelopts_statistics(tmp_path):
    """The FP16 conversion's range check streams (a weight-free copy of the graph, a few tensors per run): every
    tensor's abs max, min and max are those of ModelOpt's own reference run on the same inputs."""
    from modelopt.onnx.autocast.referencerunner import ReferenceRunner

    from trt_dm.export.fp16 import reference_stats
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig())
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    model = onnx.load(str(export_onnx(q, tmp_path / "q.fp32.onnx")))
    feed = {"sample": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
            "timestep": torch.tensor([3, 500])}
    ours = reference_stats(model, feed, chunk_bytes=64 * 1024)  # many runs of a few tensors each
    theirs = ReferenceRunner(model).run({k: v.numpy() for k, v in feed.items()})
    assert len(theirs) > 100
    for name, a in theirs.items():
        a = np.asarray(a, dtype=np.float64)
        s = ours[name]
        assert s.shape == a.shape, name
        np.testing.assert_allclose([s.absmax, s.min_val, s.max_val], [np.abs(a).max(), a.min(), a.max()],
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_fp16_range_check_runs_on_the_given_inputs(tmp_path):
    """The FP16 conversion's range check sees the feed it is given: inputs 1000x larger push values past FP16's
    safe range (512) and more nodes stay FP32 (more Casts between the precisions)."""
    from trt_dm.export.fp16 import to_fp16
    q = quantize_model(tiny_unet2d(seed=0), QuantConfig())
    apply_ranges(q, {n: 2.0 for n in activation_quantizers(q)})
    src = export_onnx(q, tmp_path / "q.fp32.onnx")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    casts = {}
    for scale in (1, 1000):
        out = to_fp16(src, tmp_path / f"x{scale}.onnx", {"sample": x * scale, "timestep": torch.tensor([3, 500])})
        casts[scale] = sum(n.op_type == "Cast" for n in onnx.load(str(out)).graph.node)
    assert casts[1000] > casts[1], casts
