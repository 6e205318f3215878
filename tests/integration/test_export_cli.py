"""`trt-dm export` end to end: graphs over the 2 GB protobuf limit in one external-data file."""
import onnx
import torch

from trt_dm.runtime.ort import OrtRunner


def test_large_graphs_use_one_external_data_file(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    """Graphs over 2 GB (here: forced by a 0-byte threshold) are written in ONNX's external-data layout, all tensors
    in one `<name>.data` beside the graph; the checks, the layer comparison, the FP16 conversion, the
    TensorRT-RTX build and ONNX Runtime all read it from there."""

    from trt_dm.cli.main import main
    from trt_dm.export import onnx as export
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "eng"
    assert main(["engine", "--model", str(tiny_pipeline_dir), "--calib-n", "4", "--calib-steps", "3", "--batch", "4",
                 "--cache-dir", str(tmp_path / "cc"), "--out-dir", str(out), "--no-progress", "--no-baseline",
                 "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1", "--max-batch", "2",
                 "--opt-batch", "1"]) == 0
    stem = f"{tiny_pipeline_dir.name}-ptq4dm"
    for name in (f"{stem}.fp32.onnx", f"{stem}.onnx"):
        graph = onnx.load(str(out / name), load_external_data=False)
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"{name}.data"} and (out / f"{name}.data").stat().st_size > 10_000
    from trt_dm.core.io import sha256_file
    from trt_dm.targets.trt_builder import load_sidecar
    assert load_sidecar(out / f"{stem}.plan").onnx_data_sha256 == sha256_file(out / f"{stem}.onnx.data")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    feed = {"sample": torch.randn(2, 1, 16, 16), "timestep": torch.tensor([3, 50])}
    with OrtRunner(out / f"{stem}.fp32.onnx") as r:
        assert r.infer(feed)["out_sample"].shape == (2, 1, 16, 16)
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1_800_000_000)  # small again: the stale .data goes
    export.save_onnx(onnx.load(str(out / f"{stem}.fp32.onnx")), out / f"{stem}.fp32.onnx")
    assert not (out / f"{stem}.fp32.onnx.data").exists()
