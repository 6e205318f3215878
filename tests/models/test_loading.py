"""trt_dm.models: loading layouts, input descriptions, fingerprints, and one test per load error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_SCHEDULER_CONFIG, TINY_SEED
from safetensors.torch import load_file, save_file

from trt_dm.core.signature import Signature, TensorSpec
from trt_dm.models import builders, weights
from trt_dm.models import loading as models
from trt_dm.models.loading import ModelLoadError, load_model


def _copy(src, tmp_path, name="model"):
    return shutil.copytree(src, tmp_path / name)


def _edit_weights(unet_dir, edit):
    """Rewrite unet_dir's safetensors file with edit(state) applied."""
    path = unet_dir / weights.SAFE_WEIGHTS
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _edit_config(unet_dir, **changes):
    cfg = json.loads((unet_dir / "config.json").read_text())
    cfg.update(changes)
    (unet_dir / "config.json").write_text(json.dumps(cfg))


def _out(unet, *args, **kwargs):
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def _x(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- tiny models -----------------------------------------------------------------------------------

def test_tiny_models_small_deterministic_and_leave_global_rng_alone():
    rng = torch.get_rng_state()
    a, b, c = builders.tiny_unet2d(0), builders.tiny_unet2d(0), builders.tiny_unet2d(1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    assert sum(p.numel() for p in a.parameters()) < 50_000
    cond = builders.tiny_unet2d_condition(0)
    assert sum(p.numel() for p in cond.parameters()) < 55_000
    assert not a.training and not cond.training
    assert builders.tiny_unet2d(0, num_class_embeds=3).config.num_class_embeds == 3


# ---- layouts ---------------------------------------------------------------------------------------

def test_load_unet_dir_matches_saved_model(tiny_unet_dir):
    lm = load_model(tiny_unet_dir)
    assert lm.kind == "UNet2DModel" and lm.name == "tiny_unet" and lm.source == tiny_unet_dir.resolve()
    assert not lm.unet.training and lm.dtype == torch.float32
    assert lm.scheduler_source == "default" and lm.scheduler_config == dict(models.DEFAULT_SCHEDULER_CONFIG)
    assert lm.signature == Signature((TensorSpec("sample", torch.float32, ("batch", 1, 16, 16)),
                                      TensorSpec("timestep", torch.int64, ("batch",))))
    assert lm.signature.conditioning == []
    x, t = _x((2, 1, 16, 16)), torch.tensor([3.0, 700.0])
    assert torch.equal(_out(lm.unet, x, t), _out(builders.tiny_unet2d(TINY_SEED), x, t))


def test_load_pipeline_dir_uses_its_scheduler(tiny_pipeline_dir):
    lm = load_model(str(tiny_pipeline_dir))
    assert lm.kind == "UNet2DModel" and lm.name == "tiny_pipeline"
    assert lm.scheduler_source == "dir"
    assert {k: lm.scheduler_config[k] for k in TINY_SCHEDULER_CONFIG} == TINY_SCHEDULER_CONFIG
    assert lm.scheduler_config["_class_name"] == "DDPMScheduler"
    x, t = _x((1, 1, 16, 16)), torch.tensor([10])
    assert torch.equal(_out(lm.unet, x, t), _out(builders.tiny_unet2d(TINY_SEED), x, t))


def test_load_condition_model_describes_inputs(tiny_cond_unet_dir):
    lm = load_model(tiny_cond_unet_dir)
    assert lm.kind == "UNet2DConditionModel"
    assert [(s.name, s.shape) for s in lm.signature.inputs] == [
        ("sample", ("batch", 1, 8, 8)), ("timestep", ("batch",)), ("encoder_hidden_states", ("batch", "sequence", 16))]
    assert lm.signature.conditioning == ["encoder_hidden_states"]
    assert lm.signature.dynamic_axes()["encoder_hidden_states"] == {0: "batch", 1: "sequence"}
    x, t, ehs = _x((2, 1, 8, 8)), torch.tensor([1.0, 999.0]), _x((2, 5, 16), seed=2)
    ref = builders.tiny_unet2d_condition(TINY_SEED)
    assert torch.equal(_out(lm.unet, x, t, encoder_hidden_states=ehs), _out(ref, x, t, encoder_hidden_states=ehs))


def test_class_conditional_model_has_class_labels_input(tmp_path):
    builders.tiny_unet2d(0, num_class_embeds=10).save_pretrained(tmp_path / "m")
    lm = load_model(tmp_path / "m")
    assert lm.signature.inputs[-1] == TensorSpec("class_labels", torch.int64, ("batch",), True, 10)
    feed = lm.signature.example(3, seed=1)
    assert feed["class_labels"].dtype == torch.int64 and 0 <= int(feed["class_labels"].min()) <= int(feed["class_labels"].max()) < 10
    assert Signature.from_dict(lm.signature.to_dict()) == lm.signature
    assert _out(lm.unet, _x((2, 1, 16, 16)), torch.tensor([5, 6]), class_labels=torch.tensor([0, 9])).shape == (2, 1, 16, 16)


def test_sharded_safetensors_and_dtype(tiny_unet_dir, tmp_path):
    builders.tiny_unet2d(TINY_SEED).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    assert (tmp_path / "m" / f"{weights.SAFE_WEIGHTS}.index.json").is_file()
    lm = load_model(tmp_path / "m")
    assert len(lm.weight_files) > 1
    assert lm.fingerprint() == load_model(tiny_unet_dir).fingerprint()
    assert load_model(tmp_path / "m", dtype=torch.float64).dtype == torch.float64


def test_default_env_var_and_default_model(tiny_pipeline_dir, monkeypatch):
    monkeypatch.setenv(models.DEFAULT_MODEL_ENV, str(tiny_pipeline_dir))
    lm = load_model("default")
    assert lm.name == "default" and lm.source == tiny_pipeline_dir.resolve()


def test_load_embedded_default(default_model_dir, monkeypatch):
    monkeypatch.setenv(models.DEFAULT_MODEL_ENV, str(default_model_dir))  # what the fixture found
    lm = load_model("default")
    assert lm.name == "default" and lm.kind == "UNet2DModel" and lm.scheduler_source == "dir"
    c = lm.unet.config
    x = _x((1, c.in_channels, c.sample_size, c.sample_size))
    assert torch.isfinite(_out(lm.unet, x, torch.tensor([500]))).all()


# ---- fingerprint -----------------------------------------------------------------------------------

def test_fingerprint_stable_and_sensitive(tiny_unet_dir, tmp_path):
    fp = load_model(tiny_unet_dir).fingerprint()
    assert len(fp) == 64 and fp == load_model(tiny_unet_dir).fingerprint()
    copy = _copy(tiny_unet_dir, tmp_path, "elsewhere")  # the location is not part of the identity
    assert load_model(copy).fingerprint() == fp

    def bump(state):
        state["conv_in.bias"][0] += 1e-3
    _edit_weights(copy, bump)
    assert load_model(copy).fingerprint() != fp

    lm = load_model(tiny_unet_dir)
    with torch.no_grad():
        lm.unet.conv_out.weight[0, 0, 0, 0] += 1e-6
    assert lm.fingerprint() != fp


def test_fingerprint_ignores_buffers_added_after_load(tiny_unet_dir):
    lm = load_model(tiny_unet_dir)
    fp = lm.fingerprint()
    lm.unet.conv_in.register_buffer("_amax", torch.tensor(1.0))  # as a quantizer would
    assert lm.fingerprint() == fp


# ---- errors ----------------------------------------------------------------------------------------

def test_error_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope.*does not exist; accepted: \"default\""):
        load_model(tmp_path / "nope")


def test_error_file_not_directory(tiny_unet_dir):
    with pytest.raises(ModelLoadError, match="is a file, not a directory"):
        load_model(tiny_unet_dir / "config.json")


def test_error_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config.json and no unet/ subfolder; accepted"):
        load_model(tmp_path)


def test_error_pipeline_unet_without_config(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=r"unet: pipeline unet/ folder has no config.json"):
        load_model(tmp_path)


def test_error_unsupported_class(tiny_unet_dir, tmp_path):
    d = _copy(tiny_unet_dir, tmp_path)
    _edit_config(d, _class_name="AutoencoderKL")
    with pytest.raises(ModelLoadError, match=r"'AutoencoderKL', not a supported denoiser; supported: "
                                             r"UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel"):
        load_model(d)


def test_error_unsupported_conditioning(tiny_cond_unet_dir, tmp_path):
    d = _copy(tiny_cond_unet_dir, tmp_path)
    _edit_config(d, addition_embed_type="image")
    with pytest.raises(ModelLoadError, match=r"addition_embed_type='image' .*supported: None or 'text_time'"):
        load_model(d)
    _edit_config(d, addition_embed_type="text_time")  # SDXL's, but without its sizes
    with pytest.raises(ModelLoadError, match=r"'text_time' with projection_class_embeddings_input_dim=None"):
        load_model(d)


def test_error_invalid_json(tiny_unet_dir, tmp_path):
    d = _copy(tiny_unet_dir, tmp_path)
    (d / "config.json").write_text('{"_class_name": "UNet2DModel",')
    with pytest.raises(ModelLoadError, match=r"config.json: the model config is not valid JSON"):
        load_model(d)


def test_error_missing_weights(tiny_unet_dir, tmp_path):
    d = _copy(tiny_unet_dir, tmp_path)
    (d / weights.SAFE_WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match=r"no weights found .*expected diffusion_pytorch_model.safetensors"):
        load_model(d)


def test_error_truncated_safetensors(tiny_unet_dir, tmp_path):
    d = _copy(tiny_unet_dir, tmp_path)
    blob = (d / weights.SAFE_WEIGHTS).read_bytes()
    (d / weights.SAFE_WEIGHTS).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelLoadError, match=r"cannot read the weights .*truncated, corrupt"):
        load_model(d)


def test_error_missing_tensor(tiny_unet_dir, tmp_path):
    d = _copy(tiny_unet_dir, tmp_path)
    _edit_weights(d, lambda s: s.pop("conv_out.weight"))
    with pytest.raises(ModelLoadError, match=r"do not match .*1 missing \(e.g. conv_out.weight\)"):
        load_model(d)


def test_error_wrong_shape(tiny_unet_dir, tmp_path):
    d = _copy(tiny_unet_dir, tmp_path)
    _edit_config(d, out_channels=2)  # config now asks for 2 output channels; the file has 1
    with pytest.raises(ModelLoadError, match=r"wrong shape \(file vs config\) \(e.g. conv_out.bias \(1,\) vs \(2,\)"):
        load_model(d)


def test_pickle_refused_unless_opted_in(tiny_unet_dir, tmp_path):
    builders.tiny_unet2d(TINY_SEED).save_pretrained(tmp_path / "m", safe_serialization=False)
    assert (tmp_path / "m" / weights.PICKLE_WEIGHTS).is_file()
    with pytest.raises(ModelLoadError, match=r"only as a pickle.*allow_pickle=True.*--allow-pickle.*safetensors"):
        load_model(tmp_path / "m")
    lm = load_model(tmp_path / "m", allow_pickle=True)
    assert lm.fingerprint() == load_model(tiny_unet_dir).fingerprint()


class _NotATensor:  # a pickled object that weights_only loading must refuse
    pass


def test_pickle_with_code_refused_even_when_opted_in(tiny_unet_dir, tmp_path):
    d = _copy(tiny_unet_dir, tmp_path)
    (d / weights.SAFE_WEIGHTS).unlink()
    torch.save({"conv_in.weight": _NotATensor()}, d / weights.PICKLE_WEIGHTS)
    with pytest.raises(ModelLoadError, match=r"cannot read the weights .*UnpicklingError"):
        load_model(d, allow_pickle=True)


def test_error_default_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(models.DEFAULT_MODEL_ENV, raising=False)
    monkeypatch.setattr(models, "DEFAULT_MODEL_DIR", tmp_path / "models" / "default")
    with pytest.raises(ModelLoadError, match=r"default model is missing.*python tools/train_default.py"):
        load_model("default")
    monkeypatch.setenv(models.DEFAULT_MODEL_ENV, str(tmp_path / "gone"))
    with pytest.raises(ModelLoadError, match=r"TRT_DM_DEFAULT_MODEL=.*gone.*does not exist"):
        load_model("default")


def test_error_bad_dtype_and_spec_type(tiny_unet_dir):
    with pytest.raises(ValueError, match=r"dtype=torch.int8 is not a floating torch dtype; accepted"):
        load_model(tiny_unet_dir, dtype=torch.int8)
    with pytest.raises(TypeError, match=r"str or os.PathLike, got int"):
        load_model(3)


def test_legacy_attention_key_names_are_renamed(tiny_unet_dir, tmp_path):
    # Checkpoints saved before diffusers 0.14 name attention weights query/key/value/proj_attn.
    d = _copy(tiny_unet_dir, tmp_path)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def rename(state):
        for k in list(state):
            for new, old in renames.items():
                if new in k:
                    state[k.replace(new, old)] = state.pop(k)
    _edit_weights(d, rename)
    assert any(".proj_attn." in k for k in load_file(str(d / weights.SAFE_WEIGHTS)))
    assert load_model(d).fingerprint() == load_model(tiny_unet_dir).fingerprint()


def test_schedule_fingerprint_and_data_key(tiny_pipeline_dir):
    """The pipeline's scheduler and its bare unet/ (DDPM default) share the UNet fingerprint but not the data key."""
    pipe, bare = load_model(tiny_pipeline_dir), load_model(tiny_pipeline_dir / "unet")
    assert pipe.fingerprint() == bare.fingerprint()
    assert pipe.schedule_fingerprint() != bare.schedule_fingerprint() and pipe.data_key() != bare.data_key()
    # diffusers' bookkeeping keys do not move it; an option the steps read does
    same = dict(bare.scheduler_config, _class_name="DDIMScheduler", _diffusers_version="0.0")
    bare2 = load_model(tiny_pipeline_dir / "unet")
    bare2.scheduler_config = same
    assert bare2.schedule_fingerprint() == bare.schedule_fingerprint()
    bare2.scheduler_config = dict(bare.scheduler_config, timestep_spacing="trailing")
    assert bare2.schedule_fingerprint() != bare.schedule_fingerprint()


def test_model_guidance_interval_from_trt_dm_json(tiny_cls_pipeline_dir, tmp_path):
    """trt_dm.json's guidance_interval is the model's default: guidance at other timesteps is off unless the
    caller names another interval; sample keys and calibration specs say which; a bad one is refused at load,
    naming the file."""
    from trt_dm import api
    from trt_dm.quant.calib.trajectories import CalibSpec
    path = _copy(tiny_cls_pipeline_dir, tmp_path)
    doc = json.loads((path / "trt_dm.json").read_text())
    (path / "trt_dm.json").write_text(json.dumps({**doc, "guidance_interval": [0, 40]}))
    loaded = load_model(path)
    assert loaded.guidance_interval == (0, 40)
    assert loaded.guidance(3.0).interval == (0, 40) and loaded.guidance(3.0, interval=(0, 99)).interval == (0, 99)
    assert loaded.guidance(1.0).interval is None
    settings = api.SampleSettings(steps=4, n=2, labels=(1, 2), guidance_scale=3.0)
    assert settings.for_model(loaded).key().endswith("-w3i0-40") and "i0-" not in settings.key()
    assert api.SampleSettings(steps=4, n=2, labels=(1,)).for_model(loaded).guidance_interval is None
    spec = CalibSpec(n=4, steps=4, guidance_scale=3.0)
    resolved = api.QuantSettings(recipe="max", spec=spec).resolved(loaded).spec
    assert resolved.guidance_interval == (0, 40) and resolved.to_dict()["guidance_interval"] == (0, 40)
    assert "guidance_interval" not in api.QuantSettings(recipe="max", spec=CalibSpec()).resolved(loaded).spec.to_dict()
    with pytest.raises(ValueError, match=r"--guidance-interval must be .*HI <= 99"):
        loaded.guidance(3.0, interval=(0, 100))
    for bad in ([40, 0], [0, 100], "0-40"):
        (path / "trt_dm.json").write_text(json.dumps({**doc, "guidance_interval": bad}))
        with pytest.raises(ModelLoadError, match=r"trt_dm.json: guidance_interval: be two integer timesteps"):
            load_model(path)
