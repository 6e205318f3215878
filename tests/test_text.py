"""Text-to-image pipelines in the Stable Diffusion layout, on a tiny pipeline written offline: prompts encoded by
the pipeline's own tokenizer and text encoder, sampling in latent space with classifier-free guidance, images
decoded by its VAE; calibration from prompts (cache keyed by the prompt set); the engine path with the sequence
length in the profiles and the text encoder / VAE named in the sidecar; the ONNX Runtime run of the Q/DQ graph
against torch fake-quant; precomputed embeddings; one clear error for each kind of bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")

from trt_dm import api  # noqa: E402
from trt_dm.cli import main  # noqa: E402
from trt_dm.models import ModelLoadError  # noqa: E402
from trt_dm.text import TextPipelineError, builtin_prompts, load_text_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def sd(tiny_sd_pipeline_dir):
    return api.load(str(tiny_sd_pipeline_dir))


def test_prompt_to_image_in_torch(sd):
    assert sd.text_conditioned and sd.seq_len == 8 and sd.sample_shape == (4, 8, 8)
    s = api.SampleSettings(steps=4, n=3, seed=2, prompts=("a red apple", "the cat"), guidance_scale=7.5)
    with api.open_denoiser(sd, device="cpu") as den:
        a, _ = api.draw(sd, den, s, progress=False)
        b, _ = api.draw(sd, den, s, progress=False)
        one, _ = api.draw(sd, den, api.SampleSettings(steps=4, n=1, seed=4, prompts=("a red apple",),
                                                      guidance_scale=7.5), progress=False)
        other, _ = api.draw(sd, den, api.SampleSettings(steps=4, n=3, seed=2, prompts=("a blue car",),
                                                        guidance_scale=7.5), progress=False)
        unguided, _ = api.draw(sd, den, api.SampleSettings(steps=4, n=3, seed=2, prompts=("a red apple", "the cat")),
                               progress=False)
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1  # decoded by the VAE: 3 x 16 x 16
    assert torch.equal(a, b)  # seeds reproduce
    torch.testing.assert_close(a[2], one[0], atol=1e-5, rtol=0)  # image 2 = seed 4, prompt 0 (cycled), any batch
    assert not torch.allclose(a[0], other[0]) and not torch.allclose(a, unguided)  # prompt and guidance matter


def test_encoding_matches_the_text_encoder_and_negative_prompt_is_the_null_row(sd):
    te = sd.text
    ids = te.tokenizer(["the cat"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(sd.conditioning_for(2, prompts=["the cat"])["encoder_hidden_states"][1],
                               te.text_encoder(ids)[0][0])
    g = sd.guidance(3.0, negative_prompt="blurry")
    torch.testing.assert_close(g.null["encoder_hidden_states"], te.encode(["blurry"]))
    assert not torch.equal(sd.guidance(3.0).null["encoder_hidden_states"], g.null["encoder_hidden_states"])


def test_builtin_prompts_are_many_and_distinct():
    prompts = builtin_prompts()
    assert len(prompts) >= 128 and len(set(prompts)) == len(prompts)
    lengths = sorted(len(p.split()) for p in prompts)
    assert lengths[0] <= 2 and lengths[-1] >= 15  # (17 words at most)  # from two words to long sentences


def test_calibration_from_prompts_is_keyed_by_the_prompt_set(sd, tmp_path):
    from trt_dm.calib.trajectories import CalibSpec
    spec = CalibSpec(n=6, steps=4)
    quant = api.QuantSettings(spec=spec, cache_root=tmp_path, batch=4).resolved(sd)
    assert quant.spec.prompts == builtin_prompts()
    a = api.calibrate(sd, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=6, steps=4, guidance_scale=7.5),
                                            cache_root=tmp_path, batch=4), progress=False)
    b = api.calibrate(sd, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=6, steps=4, guidance_scale=7.5,
                                                                             prompts=("a cat",)),
                                            cache_root=tmp_path, batch=4), progress=False)
    assert a.stats_dir != b.stats_dir and a.ranges.to_dict() != b.ranges.to_dict()
    calib = json.loads(json.loads((b.stats_dir / "stats.json").read_text())["meta"]["calib"])
    assert calib["prompts"]["n"] == 1 and len(calib["prompts"]["sha256"]) == 64 and calib["guidance_scale"] == 7.5
    assert "a cat" not in (b.stats_dir / "stats.json").read_text()  # the key holds the prompts' sha256, not the text
    again = api.calibrate(sd, api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=6, steps=4, guidance_scale=7.5),
                                                cache_root=tmp_path, batch=4), progress=False)
    assert again.stats_reused and again.ranges.to_dict() == a.ranges.to_dict()  # bit for bit on CPU


def test_engine_ort_and_fake_quant(tiny_sd_pipeline_dir, sd, tmp_path, capsys):
    """`trt-dm engine` on the pipeline (TensorRT-RTX build here), then its FP32 Q/DQ graph in ONNX Runtime against
    the torch fake-quant model. One UNet call with Q/DQ executed as written (ONNX Runtime's basic graph
    optimizations: no int8 kernel fusion): within 0.03 of outputs of magnitude ~1.3 (float op order and a few
    int8 rounding flips). Sampled images through the default session (fused QLinearConv / MatMulInteger kernels,
    which on CPUs without AVX-512 VNNI saturate some 16-bit sums: 0.12 max on one call here), same seeds, prompts
    and guidance 7.5: PSNR >= 25 dB."""
    import onnxruntime as ort

    from trt_dm.evaluate import psnr
    from trt_dm.calib.trajectories import CalibSpec
    from trt_dm.engine import load_sidecar
    out = tmp_path / "eng"
    assert main(["engine", "--model", str(tiny_sd_pipeline_dir), "--recipe", "ptq4dm", "--calib-n", "6",
                 "--calib-steps", "4", "--batch",
                 "4", "--cache-dir", str(tmp_path / "cc"), "--out-dir", str(out), "--no-progress", "--no-baseline",
                 "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1", "--max-batch", "2",
                 "--opt-batch", "1"]) == 0
    assert "guidance 7.5: engine profiles sized for 2 UNet rows per image" in capsys.readouterr().out
    side = load_sidecar(out / "tiny_sd-ptq4dm.plan")
    assert side.inputs["encoder_hidden_states"]["max"] == [4, 8, 16] and side.guidance_scale == 7.5
    assert side.text_pipeline["text_encoder_sha256"] == sd.text.fingerprints["text_encoder"]
    assert side.text_pipeline["vae"].endswith("vae")
    report = json.loads((out / "tiny_sd-ptq4dm.onnx.json").read_text())
    assert report["violations"] == [] and report["layer_comparison_fp32"]["max_code_diff"] <= 1
    quant = api.QuantSettings(recipe="ptq4dm", spec=CalibSpec(n=6, steps=4, guidance_scale=7.5),
                              cache_root=tmp_path / "cc", batch=4)
    calib = api.calibrate(sd, quant, progress=False)
    graph = out / "tiny_sd-ptq4dm.fp32.onnx"
    s = api.SampleSettings(steps=4, n=2, seed=0, prompts=("a red apple",), guidance_scale=7.5)
    feed = sd.signature.example(4, seed=0, seq_len=8, height=8)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    emulated = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    one = torch.from_numpy(emulated.run(None, {k: v.numpy() for k, v in feed.items()})[0])
    with api.open_denoiser(sd, ranges=calib.ranges, qcfg=quant.resolved(sd).qcfg) as fq:
        ref_one = fq(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"])
        ref, _ = api.draw(sd, fq, s, progress=False)
    assert (one - ref_one).abs().max() < 0.03
    with api.open_denoiser(sd, onnx=graph) as runner:
        got, _ = api.draw(sd, runner, s, progress=False)
        # the diffusers drop-in: diffusers' own StableDiffusionPipeline with pipe.unet = DropInUNet over the same
        # graph draws the same images as `trt-dm sample` (same seeds: one generator per image)
        from diffusers import StableDiffusionPipeline

        from trt_dm.dropin import DropInUNet
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_pipeline_dir), safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet = DropInUNet(sd, runner)
        theirs = pipe(["a red apple"] * 2, num_inference_steps=4, guidance_scale=7.5, height=16, width=16,
                      generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt").images
        with pytest.raises(ValueError, match=r"\['added_cond_kwargs'\] cannot be fed"):
            pipe.unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 8, 16), added_cond_kwargs={"text_embeds": 1})
    assert psnr(ref, got) >= 25
    torch.testing.assert_close(theirs * 2 - 1, got, atol=1e-5, rtol=0)  # [0, 1] -> the model range


def test_precomputed_embeddings(sd, tmp_path):
    emb = sd.text.encode(["a red apple", "the cat"])
    f = tmp_path / "e.safetensors"
    save_file({"prompt_embeds": emb.contiguous(), "negative_prompt_embeds": sd.text.encode([""]).contiguous()}, str(f))
    with api.open_denoiser(sd, device="cpu") as den:
        a, _ = api.draw(sd, den, api.SampleSettings(steps=3, n=2, embeddings=str(f), guidance_scale=7.5), progress=False)
        b, _ = api.draw(sd, den, api.SampleSettings(steps=3, n=2, prompts=("a red apple", "the cat"),
                                                    guidance_scale=7.5), progress=False)
    torch.testing.assert_close(a, b)
    wide = tmp_path / "wide.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 8, 32)}, str(wide))
    with pytest.raises(ValueError, match=r"prompt_embeds has shape \(1, 8, 32\); this UNet takes \(N, 8, 16\)"):
        api.conditioning(sd, api.SampleSettings(n=1, embeddings=str(wide)))
    long = tmp_path / "long.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 9, 16)}, str(long))
    with pytest.raises(ValueError, match="sequence length 8"):
        api.conditioning(sd, api.SampleSettings(n=1, embeddings=str(long)))


def test_bad_input_one_clear_error_each(tiny_sd_pipeline_dir, tiny_cond_unet_dir, tmp_path, capsys):
    # a prompt for a model without a text encoder (a bare text-conditional UNet; an unconditional model)
    bare = api.load(str(tiny_cond_unet_dir))
    with pytest.raises(ValueError, match="has no text encoder"):
        bare.conditioning_for(1, prompts=["a cat"])
    out = tmp_path / "x.png"
    assert main(["sample", "--model", "default", "--prompt", "a cat", "--n", "1", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 2
    assert "is not text-conditional" in capsys.readouterr().err and not out.exists()

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(tiny_sd_pipeline_dir, d)
        damage(d)
        return d
    no_tok = broken("no_tok", lambda d: shutil.rmtree(d / "tokenizer") or (d / "tokenizer").with_suffix(".x").touch())
    with pytest.raises((TextPipelineError, ModelLoadError), match="no tokenizer directory"):
        load_text_pipeline(no_tok)
    bad_vocab = broken("bad_vocab", lambda d: [(d / "tokenizer" / f).write_text("{not json") for f in
                                               ("vocab.json", "tokenizer.json")])
    with pytest.raises(TextPipelineError, match="cannot load the CLIP tokenizer"):
        load_text_pipeline(bad_vocab)

    def to_pickle(d):
        from safetensors.torch import load_file
        st = d / "text_encoder" / "model.safetensors"
        torch.save(load_file(str(st)), d / "text_encoder" / "pytorch_model.bin")
        st.unlink()
    pickled = broken("pickled", to_pickle)
    with pytest.raises(TextPipelineError, match=r"only as pickles \['pytorch_model.bin'\], which are refused"):
        load_text_pipeline(pickled)
    no_vae = broken("no_vae", lambda d: shutil.rmtree(d / "vae"))
    with pytest.raises(TextPipelineError, match="has no VAE directory"):
        load_text_pipeline(no_vae)
    assert main(["sample", "--model", str(no_vae), "--prompt", "a cat", "--out", str(out), "--no-progress"]) == 2
    assert "has no VAE directory" in capsys.readouterr().err and not out.exists()


def test_served_prompt_images_equal_sampled_ones(sd):
    """`trt-dm serve` on a text-to-image pipeline: a prompt in the request, guidance 7.5 by default, the VAE decodes;
    the served image equals `trt-dm sample`'s for the same seed and prompt (uint8 rounding, <= 1)."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from trt_dm.images import to_uint8
    from trt_dm.serve.app import Service, create_app
    with api.open_denoiser(sd, device="cpu") as den:
        ref = to_uint8(api.draw(sd, den, api.SampleSettings(steps=3, n=2, seed=7, prompts=("the cat", "a red apple"),
                                                            guidance_scale=7.5), progress=False)[0])
        with TestClient(create_app(Service(sd, den, max_rows=8))) as client:
            r = client.post("/v1/generate", json={"n": 2, "steps": 3, "seed": 7, "prompt": ["the cat", "a red apple"],
                                                  "output": "json"})
            assert r.status_code == 200, r.text
            for i, b in enumerate(r.json()["images"]):
                got = np.array(Image.open(io.BytesIO(base64.b64decode(b))))[2:-2, 2:-2].astype(int)
                assert np.abs(got - ref[i].astype(int)).max() <= 1
            assert client.post("/v1/generate", json={"n": 1, "class_labels": [1]}).status_code == 422
            bad = client.post("/v1/generate", json={"n": 1})  # no prompt: the request's field, no file options
            assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "prompt"]
            assert bad.json()["detail"][0]["msg"].endswith('give "prompt" TEXT'), bad.text
            assert client.get("/v1/models").json()["text_pipeline"]["vae"].endswith("vae")


def test_another_sd_layout_through_sample_and_engine(tmp_path, capsys):
    """A text-to-image pipeline unlike the fixture (text width 32, sequence 12, 4 heads; UNet channels 16/32 with
    4 attention heads, 3 latent channels; a 3-level VAE): `trt-dm sample --prompt` and `trt-dm engine`."""
    from trt_dm.engine import load_sidecar
    from trt_dm.text import write_tiny_sd_pipeline
    path = write_tiny_sd_pipeline(tmp_path / "sd2", seed=5, hidden=32, seq=12, heads=4, latent_channels=3,
                                  vae_channels=(8, 8, 16), unet=dict(block_out_channels=(16, 32), attention_head_dim=4,
                                                                     norm_num_groups=8))
    out = tmp_path / "g.png"
    assert main(["sample", "--model", str(path), "--prompt", "a lighthouse at dusk", "--n", "2", "--steps", "3",
                 "--out", str(out), "--no-progress"]) == 0
    assert "guidance 7.5" in capsys.readouterr().out and out.is_file()
    assert main(["engine", "--model", str(path), "--calib-n", "4", "--calib-steps", "3", "--batch", "4", "--cache-dir",
                 str(tmp_path / "cc"), "--out-dir", str(tmp_path / "eng"), "--no-progress", "--no-baseline",
                 "--rtx-targets", "SM89", "--opt-level", "0", "--min-batch", "1", "--max-batch", "1",
                 "--opt-batch", "1"]) == 0
    side = load_sidecar(tmp_path / "eng" / "sd2-ptq4dm.plan")
    assert side.inputs["encoder_hidden_states"]["min"] == [2, 12, 32] and side.inputs["sample"]["max"] == [2, 3, 8, 8]
