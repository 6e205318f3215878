"""Classifier-free guidance: one packed call of 2B equals the direct two-call reference; rescale against an
independent float64 formula; an image depends on its own seed and label only; a guidance interval guides the
rows inside it and leaves the unconditional rows of the others out of the call."""
import math

import numpy as np
import pytest
import torch

from trt_dm.core.guidance import (
    Guidance,
    cfg_denoiser,
    check_interval,
    check_scale,
    class_labels_for,
    combine,
    pack,
    split,
)
from trt_dm.core.schedule import Schedule
from trt_dm.models.builders import tiny_unet2d
from trt_dm.sampling import sample_many

NULL = 10


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d(0, num_class_embeds=NULL + 1)


def _den(unet, calls):
    def den(x, t, **kw):
        calls.append(x.shape[0])
        with torch.no_grad():
            return unet(x, t, **kw).sample
    return den


@pytest.mark.parametrize("scale", [1.0, 3.0, 7.5])
def test_one_packed_call_equals_two_calls(unet, scale):
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([900, 400, 10]), torch.tensor([0, 4, 9])
    calls = []
    guided = cfg_denoiser(_den(unet, calls), Guidance(scale, null={"class_labels": torch.tensor([NULL])}))(x, t, class_labels=y)
    assert calls == [6 if scale != 1 else 3]  # ONE UNet call: conditional and unconditional rows together
    with torch.no_grad():
        c = unet(x, t, class_labels=y).sample
        u = unet(x, t, class_labels=torch.full((3,), NULL)).sample
    torch.testing.assert_close(guided, u + scale * (c - u), atol=1e-5, rtol=1e-5)


def test_rescale_against_float64_reference():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(4, 1, 3, 3, generator=g)
    w, phi = 5.0, 0.7
    a = out.double().numpy()
    c, u = a[:2], a[2:]
    guided = u + w * (c - u)
    sd = lambda v: v.reshape(len(v), -1).std(axis=1, ddof=1).reshape(-1, 1, 1, 1)  # noqa: E731  torch's std is unbiased
    ref = phi * guided * sd(c) / sd(guided) + (1 - phi) * guided
    np.testing.assert_allclose(combine(out, w, phi).numpy(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combine(out, w, 0.0), torch.from_numpy(guided).float())


def test_image_depends_on_its_seed_and_label_only(unet):
    sched = Schedule.from_config({"num_train_timesteps": 100})
    guided = cfg_denoiser(_den(unet, []), Guidance(3.0, null={"class_labels": torch.tensor([NULL])}))
    labels = class_labels_for(4, [3, 7])
    assert labels.tolist() == [3, 7, 3, 7]
    kw = dict(sampler="ddpm", steps=4, progress=False)
    many = sample_many(guided, sched, [5, 6, 7, 8], (1, 16, 16), batch_size=3, conditioning={"class_labels": labels}, **kw)
    alone = sample_many(guided, sched, [6], (1, 16, 16), conditioning={"class_labels": labels[1:2]}, **kw)
    torch.testing.assert_close(many[1:2], alone, atol=1e-5, rtol=0)
    other = sample_many(guided, sched, [6], (1, 16, 16), conditioning={"class_labels": torch.tensor([3])}, **kw)
    assert not torch.allclose(other, alone)  # the label matters


@pytest.mark.parametrize("bad", [0.5, 0.0, -2.0, math.nan, math.inf])
def test_bad_guidance_scales(bad):
    with pytest.raises(ValueError, match="--guidance-scale must be a finite number >= 1"):
        check_scale(bad)
    with pytest.raises(ValueError, match="guidance-rescale"):
        Guidance(2.0, rescale=1.5, null={"class_labels": torch.tensor([1])})
    with pytest.raises(ValueError, match="null"):
        Guidance(2.0)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="differ"):
        pack(x, torch.tensor([1, 2]), {"class_labels": torch.tensor([1, 2])}, {})


def test_guidance_interval_guides_inside_and_skips_the_null_rows_outside(unet):
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(4, 1, 16, 16, generator=g), torch.tensor([900, 400, 300, 10]), torch.tensor([0, 4, 9, 2])
    null = {"class_labels": torch.tensor([NULL])}
    full = cfg_denoiser(_den(unet, []), Guidance(3.0, 0.5, null))(x, t, class_labels=y)
    calls = []
    inside = cfg_denoiser(_den(unet, calls), Guidance(3.0, 0.5, null, interval=(0, 400)))(x, t, class_labels=y)
    assert calls == [4 + 3]  # four conditional rows, null rows only for t = 400, 300, 10
    with torch.no_grad():
        cond = unet(x, t, class_labels=y).sample
    torch.testing.assert_close(inside[1:], full[1:], atol=1e-5, rtol=0)  # guided as without an interval
    torch.testing.assert_close(inside[:1], cond[:1], atol=1e-5, rtol=0)  # t = 900: the conditional prediction
    assert not torch.allclose(inside[:1], full[:1], atol=1e-3)
    calls.clear()
    none = cfg_denoiser(_den(unet, calls), Guidance(3.0, null=null, interval=(0, 5)))(x[:1], t[:1], class_labels=y[:1])
    assert calls == [1]
    torch.testing.assert_close(none, cond[:1], atol=1e-5, rtol=0)
    # every row inside: the same call (and bits) as no interval at all
    xx, tt, cc, rows = split(x, t, {"class_labels": y}, Guidance(3.0, null=null, interval=(0, 999)))
    ref = pack(x, t, {"class_labels": y}, null)
    assert torch.equal(xx, ref[0]) and torch.equal(tt, ref[1]) and torch.equal(cc["class_labels"], ref[2]["class_labels"])
    assert rows.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [(5, 2), (-1, 3), (0,), (0, 1, 2), (0.5, 3), "0 300", (True, 3), (0, 1000)])
def test_bad_guidance_intervals(bad):
    with pytest.raises(ValueError, match="--guidance-interval must be two integer timesteps LO HI"):
        check_interval(bad, 999)
    assert check_interval([0, 300], 999) == (0, 300)
