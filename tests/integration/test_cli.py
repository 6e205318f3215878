"""The `trt-dm` command end to end on a tiny pipeline directory (real sampling, real features)."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trt_dm.cli.main import main


def test_sample_writes_grid_and_raw_samples(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    raw = tmp_path / "raw.safetensors"
    rc = main(["sample", "--model", str(tiny_pipeline_dir), "--sampler", "ddpm", "--steps", "3", "--n", "5",
               "--batch", "2", "--seed", "7", "--out", str(out), "--save-samples", str(raw), "--no-progress"])
    assert rc == 0
    assert Image.open(out).size[0] > 0
    samples = load_file(str(raw))["samples"]
    assert samples.shape[0] == 5 and samples.abs().max() <= 1.0 + 1e-5
    # same seeds, other batch size -> same images
    raw2 = tmp_path / "raw2.safetensors"
    main(["sample", "--model", str(tiny_pipeline_dir), "--sampler", "ddpm", "--steps", "3", "--n", "5",
          "--batch", "5", "--seed", "7", "--out", str(out), "--save-samples", str(raw2), "--no-progress"])
    assert (load_file(str(raw2))["samples"] - samples).abs().max() < 1e-5


def test_eval_writes_result(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRT_DM_CACHE", str(tmp_path / "cache"))
    rc = main(["eval", "--model", str(tiny_pipeline_dir), "--steps", "2", "--n", "8", "--ref-limit", "16",
               "--out-dir", str(tmp_path / "rep"), "--cache-dir", str(tmp_path / "cc"), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "rep" / "result.json").read_text())
    assert res["metric"] == "FD-EffNet" and res["n"] == 8 and res["reference_n"] == 16
    assert res["fd"] > 0 and res["kid_subset_size"] == 8
    assert (tmp_path / "rep" / "grid.png").exists()
    assert "FD-EffNet:" in capsys.readouterr().out


def test_calibrate_then_eval_recipe(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRT_DM_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(tiny_pipeline_dir), "--cache-dir", str(tmp_path / "cc"), "--calib-n", "8",
              "--calib-steps", "4", "--batch", "4", "--no-progress"]
    assert main(["calibrate", "--recipe", "ptq4dm", *common]) == 0
    out = capsys.readouterr().out
    assert "quantized layers" in out and "statistics: collected" in out and "ptq4dm.json" in out
    assert main(["calibrate", "--recipe", "max", *common]) == 0
    assert "statistics: reused from cache" in capsys.readouterr().out
    rc = main(["eval", "--recipe", "ptq4dm", "--steps", "4", "--n", "6", "--eps-n", "3", "--ref-limit", "16",
               "--out-dir", str(tmp_path / "rep"), *common])
    assert rc == 0
    res = json.loads((tmp_path / "rep" / "result.json").read_text())
    assert res["recipe"] == "ptq4dm" and res["eps_n"] == 3
    assert 0 < res["psnr_vs_fp"] < 200 and res["fp_fd"] > 0
    assert [r["t"] for r in res["eps"]["per_timestep"]] == [75, 50, 25, 0]
    assert "PSNR vs FP" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["sample", "--model", "/no/such/dir"], "does not exist"),
    (["sample", "--model", "{tiny}", "--n", "0"], "--n must be >= 1, got 0"),
    (["sample", "--model", "{tiny}", "--out", "{tmp}/g.gif", "--n", "1", "--steps", "1"], "must end in .png"),
    (["eval", "--model", "{tiny}", "--inception-weights", "/no/weights.pth", "--n", "2", "--steps", "1"],
     "/no/weights.pth"),
    (["calibrate", "--model", "{tiny}", "--recipe", "mse:2.4@sometimes", "--cache-dir", "{tmp}"], "sometimes"),
    (["calibrate", "--model", "{tiny}", "--timesteps", "gaussian", "--cache-dir", "{tmp}"], "gaussian"),
    (["sample", "--model", "{tiny}", "--onnx", "{tmp}/none.onnx"], "no such ONNX file"),
    (["sample", "--model", "{tiny}", "--steps", "5000", "--out", "{tmp}/g.png"], "--steps 5000 is more than the"),
    (["eval", "--model", "{tiny}", "--recipe", "ptq4dm", "--steps", "5000", "--n", "2", "--cache-dir", "{tmp}/cc",
      "--out-dir", "{tmp}/rep"], "--steps 5000 is more than the"),  # refused before calibrating
    (["calibrate", "--model", "{tiny}", "--calib-steps", "5000", "--cache-dir", "{tmp}/cc"],
     "--calib-steps 5000 is more than the"),
    (["calibrate", "--model", "{tiny}", "--calib-n", "0", "--cache-dir", "{tmp}/cc"],
     "(--calib-n, --calib-steps) must be >= 1, got n=0"),
])
def test_cli_errors_are_clear(argv, msg, tiny_pipeline_dir, tmp_path, capsys):
    argv = [a.format(tiny=tiny_pipeline_dir, tmp=tmp_path) for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("argv,code,msg", [
    (["sample", "--n", "0"], 2, "error: --n must be >= 1, got 0"),
    (["sample", "--sampler", "heun"], 2, "invalid choice: 'heun'"),
    (["calibrate", "--timesteps", "gaussian", "--cache-dir", "{tmp}/cc"], 2, "unknown timestep sampler 'gaussian'"),
    (["check", "{tmp}/not.onnx"], 2, "is not a valid ONNX model"),
    (["sample", "--engine", "{tmp}/e.plan", "--n", "1"], 1, "error:"),  # no GPU here / no sidecar: the work fails
])
def test_exit_codes_of_the_real_command(argv, code, msg, tiny_pipeline_dir, tmp_path):
    """The installed command, as a user runs it: usage errors exit 2 with one line, failed work exits 1."""
    (tmp_path / "not.onnx").write_bytes(b"not onnx")
    (tmp_path / "e.plan").write_bytes(b"truncated plan")
    argv = [a.format(tmp=tmp_path) for a in argv]
    model = [] if argv[0] == "check" else ["--model", str(tiny_pipeline_dir), "--no-progress"]
    p = subprocess.run([sys.executable, "-m", "trt_dm.cli", *argv, *model], capture_output=True, text=True, timeout=300)
    assert p.returncode == code, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], p.stderr


def test_export_check_and_sample_onnx(tiny_pipeline_dir, tmp_path, capsys):
    common = ["--model", str(tiny_pipeline_dir), "--cache-dir", str(tmp_path / "cc"), "--calib-n", "8",
              "--calib-steps", "4", "--batch", "4", "--no-progress"]
    assert main(["export", "--recipe", "ptq4dm", "--out-dir", str(tmp_path), *common]) == 0
    assert "Q/DQ conformance and per-layer coverage OK" in capsys.readouterr().out
    name = tiny_pipeline_dir.name
    onnx_path, fp16_path = tmp_path / f"{name}-ptq4dm.fp32.onnx", tmp_path / f"{name}-ptq4dm.onnx"
    report = json.loads((tmp_path / f"{name}-ptq4dm.onnx.json").read_text())
    assert report["violations"] == [] and report["recipe"] == "ptq4dm"
    # Same math in ORT and torch: fed the same quantized inputs, each layer's int8 codes agree except rare
    # rounding flips of one code; a wrong scale or layout would put many codes off.
    cmp32 = report["layer_comparison_fp32"]
    assert cmp32["layers"] == report["quantized_layers"]
    assert cmp32["flip_rate"] < 1e-4 and cmp32["max_code_diff"] <= 1
    # Free runs end to end: a flip moves downstream values by about a step, so codes drift a little (0.5 % of codes
    # in a run measured here) but stay the same model. Not compared with flip_rate: the free torch run
    # dequantizes as modelopt does on CPU (x * (127/amax), rounded, / (127/amax)), the forced run and ONNX Runtime
    # as code * (amax/127), last-bit apart, so the free run can collect fewer flips (one CI run: 0 against 6).
    assert cmp32["flip_rate_e2e"] < 0.02 and cmp32["max_code_diff_e2e"] <= 8
    assert main(["check", str(onnx_path)]) == 0
    assert main(["check", str(fp16_path)]) == 0
    raw_onnx = tmp_path / "o.safetensors"
    base = ["sample", "--model", str(tiny_pipeline_dir), "--steps", "4", "--n", "3", "--no-progress",
            "--out", str(tmp_path / "g.png")]
    assert main([*base, "--onnx", str(onnx_path), "--save-samples", str(raw_onnx)]) == 0
    from trt_dm import api
    from trt_dm.models.loading import load_model
    from trt_dm.quant.calib.ranges import load_ranges
    from trt_dm.quant.config import QuantConfig
    from trt_dm.quant.fakequant import fake_quant_unet
    from trt_dm.runtime.base import as_denoiser
    from trt_dm.runtime.torch_runner import TorchRunner
    loaded = load_model(tiny_pipeline_dir)
    # the CLI is the library API: the same graph and seeds through api.draw give the same images, bit for bit
    with api.open_denoiser(loaded, onnx=onnx_path) as den:
        images, _ = api.draw(loaded, den, api.SampleSettings(steps=4, n=3), progress=False)
    assert torch.equal(images, load_file(str(raw_onnx))["samples"])
    # one UNet call on the same inputs: the ONNX Runtime graph computes what torch fake-quant computes. (A whole
    # sampling run is not compared: on CPUs without AVX-512 an occasional int8 rounding flip, see test_export,
    # spreads through this tiny random model's few steps; the layer-by-layer comparison above is the exact check.)
    ranges, provenance = load_ranges(next((tmp_path / "cc").rglob("ptq4dm.json")))
    assert provenance["recipe"] == "ptq4dm"
    q = fake_quant_unet(loaded, QuantConfig(), ranges)
    feed = loaded.signature.example(3, seed=2)
    with TorchRunner(q, device="cpu") as r, api.open_denoiser(loaded, onnx=onnx_path) as den:
        ref, got = as_denoiser(r)(feed["sample"], feed["timestep"]), den(feed["sample"], feed["timestep"])
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


def test_class_conditional_sample_with_guidance(tiny_cls_pipeline_dir, tmp_path, capsys):
    """`trt-dm sample --class-labels ... --guidance-scale W` on a class-conditional pipeline: the images are the
    library's for the same seeds, labels and guidance; --classes all cycles every class."""
    raw = tmp_path / "raw.safetensors"
    base = ["sample", "--model", str(tiny_cls_pipeline_dir), "--steps", "3", "--n", "4", "--batch", "3",
            "--no-progress", "--out", str(tmp_path / "g.png")]
    assert main([*base, "--class-labels", "3", "7", "--guidance-scale", "3", "--save-samples", str(raw)]) == 0
    from trt_dm import api
    loaded = api.load(str(tiny_cls_pipeline_dir))
    with api.open_denoiser(loaded, device="cpu") as den:
        ref, _ = api.draw(loaded, den, api.SampleSettings(steps=3, n=4, batch=4, labels=(3, 7), guidance_scale=3.0),
                          progress=False)
        unguided, _ = api.draw(loaded, den, api.SampleSettings(steps=3, n=4, labels=(3, 7)), progress=False)
    got = full = load_file(str(raw))["samples"]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)  # other batch split: float rounding only (x w)
    assert not torch.allclose(got, unguided, atol=1e-3)
    assert main([*base, "--classes", "all"]) == 0
    # --guidance-interval: the library's images for the same interval, not the fully guided ones
    assert main([*base, "--class-labels", "3", "7", "--guidance-scale", "3", "--guidance-interval", "0", "40",
                 "--save-samples", str(raw)]) == 0
    with api.open_denoiser(loaded, device="cpu") as den:
        ref, _ = api.draw(loaded, den, api.SampleSettings(steps=3, n=4, labels=(3, 7), guidance_scale=3.0,
                                                          guidance_interval=(0, 40)), progress=False)
    got = load_file(str(raw))["samples"]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(got, unguided, atol=1e-3) and not torch.allclose(got, full, atol=1e-3)


@pytest.mark.parametrize("argv,msg", [
    (["--class-labels", "10"], "class labels [10] are out of range"),
    (["--class-labels", "-1"], "class labels [-1] are out of range"),
    ([], "is class-conditional: give --class-labels"),
    (["--classes", "all", "--guidance-scale", "0.5"], "--guidance-scale must be a finite number >= 1"),
    (["--classes", "all", "--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 1"),
    (["--classes", "all", "--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1]"),
    (["--classes", "all", "--guidance-scale", "2", "--guidance-interval", "50", "10"],
     "--guidance-interval must be two integer timesteps LO HI with 0 <= LO <= HI"),
    (["--classes", "all", "--guidance-scale", "2", "--guidance-interval", "0", "100"],
     "--guidance-interval must be two integer timesteps LO HI with 0 <= LO <= HI <= 99"),
])
def test_class_conditional_bad_input(argv, msg, tiny_cls_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", "--model", str(tiny_cls_pipeline_dir), "--steps", "2", "--n", "2", "--no-progress",
               "--out", str(out / "g.png"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written


def test_labels_for_an_unconditional_model_and_guidance_without_null_label(tiny_pipeline_dir, tmp_path, capsys):
    cls_dir = tmp_path / "cls"
    from trt_dm.models.builders import tiny_unet2d
    tiny_unet2d(0, num_class_embeds=5).save_pretrained(cls_dir)  # no trt_dm.json: no null label known
    common = ["--steps", "2", "--n", "2", "--no-progress", "--out", str(tmp_path / "o" / "g.png")]
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--class-labels", "1", *common]) == 2
    assert "is an unconditional model" in capsys.readouterr().err
    assert main(["sample", "--model", str(cls_dir), "--class-labels", "1", "--guidance-scale", "2", *common]) == 2
    assert "needs the null class label" in capsys.readouterr().err
    assert main(["sample", "--model", str(cls_dir), "--class-labels", "1", "--guidance-scale", "2", "--null-label",
                 "4", *common]) == 0
    assert not (tmp_path / "cc").exists()


def test_eval_scores_class_accuracy_of_all_images_when_eps_n_is_smaller(tmp_path, monkeypatch):
    """A Fashion-MNIST-shaped class-conditional model (32 px, 1 channel, 10 classes): `eval --recipe` scores the
    class accuracy of all N images with their own labels, while the noise-prediction error uses the first
    eps_n (a regression: the eps_n labels replaced the N labels, and a 2000-image row failed after sampling)."""
    import json as _json

    from diffusers import DDPMScheduler

    from trt_dm.models import builders
    monkeypatch.setenv("TRT_DM_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "cls32"
    builders.tiny_unet2d(0, num_class_embeds=11, sample_size=32).save_pretrained(model / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(model / "scheduler")
    (model / "trt_dm.json").write_text(_json.dumps({"null_class_label": 10, "num_classes": 10}))
    rc = main(["eval", "--model", str(model), "--classes", "all", "--recipe", "ptq4dm", "--steps", "2", "--n", "6",
               "--eps-n", "3", "--ref-limit", "16", "--batch", "4", "--calib-n", "4", "--calib-steps", "2",
               "--cache-dir", str(tmp_path / "cc"), "--out-dir", str(tmp_path / "rep"), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "rep" / "result.json").read_text())
    assert res["n"] == 6 and res["eps_n"] == 3 and res["eps"]["n"] == 3 * 2
    assert 0 <= res["class_accuracy"] <= 1 and 0 <= res["fp_class_accuracy"] <= 1
    paired = res["class_accuracy_vs_fp"]  # the same seeds and labels: the change with its paired interval
    assert paired["n"] == 6 and 0 <= paired["agreement"] <= 1
    assert abs(paired["change_points"] - 100 * (res["class_accuracy"] - res["fp_class_accuracy"])) < 1e-6
    assert paired["ci95_points"][0] <= paired["change_points"] <= paired["ci95_points"][1]


def test_eval_a_class_conditional_recipe_with_guidance(tiny_cls_pipeline_dir, tmp_path, monkeypatch, capsys):
    """`trt-dm eval --recipe` on a class-conditional model with guidance: calibration and both samplings run with
    the labels and guidance; result.json records them and the guided noise-prediction error per timestep."""
    monkeypatch.setenv("TRT_DM_CACHE", str(tmp_path / "cache"))
    rc = main(["eval", "--model", str(tiny_cls_pipeline_dir), "--classes", "all", "--guidance-scale", "2",
               "--recipe", "ptq4dm", "--steps", "3", "--n", "6", "--eps-n", "3", "--ref-limit", "16", "--batch", "4",
               "--calib-n", "8", "--calib-steps", "4", "--cache-dir", str(tmp_path / "cc"),
               "--out-dir", str(tmp_path / "rep"), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "rep" / "result.json").read_text())
    assert res["labels"] == "all" and res["guidance_scale"] == 2.0 and res["recipe"] == "ptq4dm"
    assert len(res["eps"]["per_timestep"]) == 3 and 0 < res["psnr_vs_fp"] < 200
    assert len(res["eps_conditional"]["per_timestep"]) == 3  # the unguided part of the same calls, for comparison
    assert "class_accuracy" not in res  # 16 px tiny model: the Fashion-MNIST classifier does not apply
    # the FP samples are cached per labels and guidance: another guidance scale is another entry
    samples = sorted(p.name for p in (tmp_path / "cc").rglob("samples/*.safetensors"))
    assert samples == ["ddim3-eta0-s0-n6-call-w2.safetensors"]


@pytest.mark.parametrize("argv,msg", [
    (["--w8-layers", "down_blocks.0.*"], "w8_layers keeps some layers' weights at 8 bits in a lower-bit model"),
    (["--weight-bits", "4", "--w8-layers", "no_such_block.*"], "'no_such_block.*' matches no quantized layer"),
    (["--keep-fp", "down_blocks.0.*", "no_such_block.*"], "pattern 'no_such_block.*' matches no quantizable layer"),
    (["--exclude", "conv_in", "down_block.0.*"], "pattern 'down_block.0.*' matches no quantizable layer"),
    (["--format", "fp8", "--weight-bits", "4"], "--format fp8 quantizes weights to E4M3 (8 bits, nearest rounding)"),
    (["--format", "fp8", "--recipe", "entropy"], "metric 'entropy' (KL divergence over int8's uniform bins) has no "
     "FP8 form"),
])
def test_w8_layers_bad_input(argv, msg, tiny_pipeline_dir, tmp_path, capsys):
    """--w8-layers without a lower weight width, or naming no layer: one clear line, exit 2, no cache written."""
    cache = tmp_path / "cc"
    rc = main(["calibrate", "--model", str(tiny_pipeline_dir), "--recipe", "ptq4dm", "--calib-n", "4",
               "--calib-steps", "2", "--cache-dir", str(cache), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_keep_fp_adds_to_the_default_exclusions(tiny_cls_pipeline_dir, tmp_path, capsys):
    """--keep-fp adds patterns to the default exclusion list (--exclude replaces it): the ranges file records the
    joined list and has no range for the kept layers; `--sensitivity blocks` ranks blocks under guidance and prints
    the --keep-fp line for the first ones."""
    from trt_dm.quant.config import DEFAULT_EXCLUDE
    cache = tmp_path / "cc"
    common = ["--model", str(tiny_cls_pipeline_dir), "--classes", "all", "--guidance-scale", "3", "--recipe",
              "ptq4dm", "--calib-n", "8", "--calib-steps", "4", "--cache-dir", str(cache), "--no-progress"]
    assert main(["calibrate", *common, "--keep-fp", "down_blocks.0.*"]) == 0
    capsys.readouterr()
    saved = json.loads(next(cache.rglob("ptq4dm.json")).read_text())
    assert saved["provenance"]["quant"]["exclude"] == [*DEFAULT_EXCLUDE, "down_blocks.0.*"]
    assert saved["ranges"] and not [n for n in json.dumps(saved["ranges"]).split('"') if n.startswith("down_blocks.0.")]
    assert main(["calibrate", *common, "--sensitivity", "blocks"]) == 0
    out = capsys.readouterr().out
    assert "relative MSE of the guided prediction (guidance 3)" in out and "the first 4 together" in out
    assert "weights or activations: with only the weights quantized" in out
    assert len([line for line in out.splitlines() if "%   activations " in line]) == 4  # the first 4 blocks
    keep = out.strip().splitlines()[-1]
    assert keep.startswith("keep them in FP with: --keep-fp '") and keep.count(".*'") == 4
    assert "mid_block.resnets.0 " in out and "up_blocks.0.attentions.1 " in out


def test_version_names_trt_dm_and_its_libraries(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trt-dm {version('trt_dm')} (") and "\n" not in line
    assert f"torch {torch.__version__}" in line and f"nvidia-modelopt {version('nvidia-modelopt')}" in line


def test_info_shows_the_models_conditioning_facts(tiny_cls_pipeline_dir, tmp_path, capsys):
    """`trt-dm info`: the null label, class count and the default guidance interval of trt_dm.json."""
    import shutil
    model = shutil.copytree(tiny_cls_pipeline_dir, tmp_path / "m")
    doc = json.loads((model / "trt_dm.json").read_text())
    (model / "trt_dm.json").write_text(json.dumps({**doc, "guidance_interval": [0, 30]}))
    assert main(["info", "--model", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["null_class_label"], info["num_classes"], info["guidance_interval"]) == (10, 10, [0, 30])
    assert main(["info", "--model", str(tiny_cls_pipeline_dir)]) == 0
    assert "guidance_interval" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("target,msg", [
    ("ort-cpu", "--format fp8: the ort-cpu target writes ONNX Runtime's int8 layout, which has no FP8 form"),
    ("openvino", "--format fp8: the openvino target runs int8 Q/DQ on the CPU, which has no FP8 kernels"),
    ("tensorrt --quantize-attention", "--format fp8 with --quantize-attention: the FP8 export of attention matmul"),
])
def test_fp8_to_a_target_without_it_is_refused_before_any_work(target, msg, tiny_pipeline_dir, tmp_path, capsys):
    pytest.importorskip("openvino") if target == "openvino" else None
    rc = main(["export", "--model", str(tiny_pipeline_dir), "--target", *target.split(), "--format", "fp8", "--recipe",
               "ptq4dm", "--calib-n", "4",
               "--calib-steps", "2", "--cache-dir", str(tmp_path / "cc"), "--out-dir", str(tmp_path / "out"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cc").exists() and not (tmp_path / "out").exists()


def test_eval_an_fp8_recipe(tiny_pipeline_dir, tmp_path, monkeypatch):
    """`trt-dm eval --recipe R --format fp8`: the E4M3 fake-quant model against FP on the same seeds."""
    monkeypatch.setenv("TRT_DM_CACHE", str(tmp_path / "cache"))
    common = ["eval", "--model", str(tiny_pipeline_dir), "--recipe", "ptq4dm", "--steps", "3", "--n", "4", "--eps-n",
              "2", "--ref-limit", "16", "--batch", "4", "--calib-n", "8", "--calib-steps", "4", "--cache-dir",
              str(tmp_path / "cc"), "--no-progress"]
    assert main([*common, "--format", "fp8", "--out-dir", str(tmp_path / "f8")]) == 0
    assert main([*common, "--out-dir", str(tmp_path / "i8")]) == 0
    f8, i8 = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("f8", "i8"))
    assert (f8["format"], i8["format"]) == ("fp8", "int8") and f8["ranges"].endswith("ptq4dm.fp8.json")
    assert 0 < f8["psnr_vs_fp"] < 200 and f8["psnr_vs_fp"] != i8["psnr_vs_fp"]
