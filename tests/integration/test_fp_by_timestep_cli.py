"""`trt-dm engine --keep-fp ... --keep-fp-from-t T` end to end: one graph and engine per timestep segment."""
import json

import torch
from support import KEEP  # noqa: E402

from trt_dm.quant.calib.timesteps import TimestepSpec
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.config import QuantConfig
from trt_dm.quant.fakequant import segment_unets
from trt_dm.quant.modules import quantized_layers


def test_engine_per_segment_runs_in_onnx_runtime_and_tensorrt_rtx(tiny_pipeline_dir, tmp_path, capsys):
    """`trt-dm engine --keep-fp 'down_blocks.0.*' --keep-fp-from-t T`: one checked graph + engine per timestep
    segment (the default one-graph form inside each), their reports / sidecars carry the segment's t_range; ONNX
    Runtime over the two graphs, switched by t, equals the fake-quant denoiser within the int8 flips' reach; the
    noisy segment's engine runs the kept convolutions in half, the other's every quantized one on int8 inputs. Here
    the noisy segment holds one range group (a plain graph) and the other two (one graph with both).
    Refused before any work: --target ort-cpu, --keep-fp-from-t without --keep-fp, with --rounding adaround."""
    from trt_dm import api
    from trt_dm.cli.main import main
    from trt_dm.targets.trt_builder import load_sidecar
    cache, out, split = tmp_path / "cc", tmp_path / "eng", 70  # groups (90..50), (40..0): 70 cuts the first
    common = ["--model", str(tiny_pipeline_dir), "--timesteps", "all", "--calib-n", "8", "--calib-steps", "10",
              "--batch", "8", "--cache-dir", str(cache), "--no-progress"]
    keep = ["--keep-fp", "down_blocks.0.*", "--keep-fp-from-t", str(split)]
    for bad, msg in ((["export", "--target", "ort-cpu", "--recipe", "ptq4dm", *keep], "one per timestep segment"),
                     (["export", "--keep-fp-from-t", "50"], "give --keep-fp PATTERN"),
                     (["export", "--rounding", "adaround", *keep], "learned rounding"),
                     (["calibrate", "--sensitivity", "blocks", *keep], "is for evaluation and deployment")):
        assert main([*bad, *common, "--out-dir", str(tmp_path / "bad")] if bad[0] == "export"
                    else [*bad, *common]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["engine", *common, *keep, "--recipe", "max@groups=2", "--out-dir", str(out), "--no-baseline",
                 "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1", "--opt-batch", "4",
                 "--max-batch", "4"]) == 0
    printed = capsys.readouterr().out
    plans = sorted(out.glob("*.plan"))
    assert [p.name.split(".", 1)[1] for p in plans] == [f"t{split - 1}-0.onegraph.plan", f"t99-{split}.plan"]
    assert "--engine" in printed and all(str(p) in printed for p in plans)  # the usage line names both
    noisy_plan, data_plan = plans[1], plans[0]
    assert [load_sidecar(p).t_range for p in (noisy_plan, data_plan)] == [[99, split], [split - 1, 0]]
    noisy_rep = json.loads(noisy_plan.with_suffix(".onnx.json").read_text())
    assert noisy_rep["violations"] == [] and noisy_rep["extra"]["precision_by_t"]["fp_layers"] == list(KEEP)
    assert noisy_rep["quant"]["fp_from_t"] == split and "one_graph" not in noisy_rep["extra"]

    loaded = api.load(str(tiny_pipeline_dir))
    quant = api.QuantSettings(recipe="max@groups=2", spec=CalibSpec(TimestepSpec("all"), n=8, steps=10, seed=0),
                              cache_root=cache, batch=8, qcfg=QuantConfig(noisy_fp=KEEP, fp_from_t=split))
    calib = api.calibrate(loaded, quant, progress=False)
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([99, 75, split, split - 1, 45, 0])  # both segments, all groups, a gap (45), in one batch
    graphs = [p.with_name(p.name.replace(".plan", ".fp32.onnx")) for p in plans]
    with api.open_denoiser(loaded, onnx=graphs) as ort_den, \
            api.open_denoiser(loaded, ranges=calib.ranges, qcfg=quant.qcfg) as fq:
        assert ort_den.describe["t_ranges"] == [(split - 1, 0), (99, split)]
        got, ref = ort_den(x, t), fq(x, t)
    diff = (got - ref).abs()
    print("ORT segments vs fake-quant, max / mean |diff|:", diff.max().item(), diff.mean().item())
    # ONNX Runtime's int8-fused kernels round differently from the fake-quant math, and by CPU: on an AMD EPYC
    # (AVX-512 VNNI) up to 0.126, mean 0.02, on this tiny UNet (with basic optimizations only, 5 of the 6 rows match
    # to 4e-7 and one differs by a flipped code, 0.022); the bounds are set from that measurement
    assert diff.max() < 0.2 and diff.mean() < 0.04
    # the layer report: the noisy engine has the kept block's convolutions in half, the other none besides the defaults
    data_convs = load_sidecar(data_plan).layer_precisions["correlation"]
    noisy_convs = load_sidecar(noisy_plan).layer_precisions["correlation"]
    segs = segment_unets(loaded, quant.qcfg, calib.ranges)
    n_convs = [sum(isinstance(m, torch.nn.Conv2d) for m in quantized_layers(s.unet).values()) for s in segs]
    assert noisy_convs == {"Int8": n_convs[0], "Half": 2 + n_convs[1] - n_convs[0]} and n_convs[0] < n_convs[1]
    assert data_convs == {"Int8": n_convs[1], "Half": 2}
    # `trt-dm eval --onnx A B`: the pair scored against FP like any deployment, both graphs named in the result
    assert main(["eval", "--model", str(tiny_pipeline_dir), "--onnx", *map(str, graphs), "--steps", "4", "--n", "4",
                 "--eps-n", "2", "--ref-limit", "16", "--no-progress", "--out-dir", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert result["onnx"] == " ".join(map(str, graphs)) and result["psnr_vs_fp"] > 0
