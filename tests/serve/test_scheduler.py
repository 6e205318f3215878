"""Step-level batching: served images equal `trt-dm sample`'s for the same seed, label and settings, alone or
sharing UNet calls with other requests at other timesteps (with a guidance interval too); first come, first
served; faults stay local."""
import pytest
import torch

from trt_dm import api
from trt_dm.serve.scheduler import Request, StepScheduler


@pytest.fixture(scope="module")
def model(tiny_cls_pipeline_dir):
    return api.load(str(tiny_cls_pipeline_dir))


def _request(model, settings: api.SampleSettings) -> Request:
    cond, guidance = api.conditioning(model, settings)
    return Request(n=settings.n, sampler=settings.sampler, steps=settings.steps, eta=settings.eta, seed=settings.seed,
                   conditioning=cond, guidance=guidance)


def _sampled(model, settings):
    with api.open_denoiser(model, device="cpu") as den:
        return api.draw(model, den, settings, progress=False)[0]


SETTINGS = [
    api.SampleSettings(sampler="ddim", steps=5, n=2, seed=0, labels=(3, 7), guidance_scale=3.0),
    api.SampleSettings(sampler="ddpm", steps=4, n=3, seed=10, labels=(1,)),
    api.SampleSettings(sampler="ddim", steps=6, eta=0.5, n=2, seed=20, labels="all", guidance_scale=2.0,
                       guidance_rescale=0.5),
    api.SampleSettings(sampler="ddim", steps=5, n=2, seed=30, labels=(2, 5), guidance_scale=4.0,
                       guidance_interval=(0, 45)),  # guided at t = 40, 20, 0 only
]


def test_served_images_equal_sampled_ones_alone_and_batched_across_requests(model):
    with api.open_denoiser(model, device="cpu") as den:
        alone = StepScheduler(den, api.schedule(model), model.sample_shape, max_rows=64)
        h = alone.submit(_request(model, SETTINGS[0]))
        alone.run_until_idle()
        # alone: the same UNet calls as the sampler's (one per step, both halves): equal to float rounding
        torch.testing.assert_close(h.images, _sampled(model, SETTINGS[0]), atol=1e-5, rtol=0)
        seen = []

        def recording(x, t, **c):
            seen.append(sorted(set(t.tolist())))
            return den(x, t, **c)

        shared = StepScheduler(recording, api.schedule(model), model.sample_shape, max_rows=5)
        handles = [shared.submit(_request(model, s)) for s in SETTINGS]
        shared.run_until_idle()
    assert all(r <= 5 for r in shared.rows_per_call) and max(shared.rows_per_call) == 5
    assert max(len(ts) for ts in seen) >= 3  # calls really mixed images at different timesteps
    for h, s in zip(handles, SETTINGS):
        assert h.done and h.error is None
        # other rows in the call move float rounding only (x the guidance scale)
        torch.testing.assert_close(h.images, _sampled(model, s), atol=1e-4, rtol=0)


def test_first_come_first_served_without_starvation(model):
    calls = []

    def den(x, t, **c):
        calls.append(t.tolist())
        return torch.zeros_like(x)

    s = StepScheduler(den, api.schedule(model), model.sample_shape, max_rows=2)
    first = s.submit(Request(n=2, steps=3, conditioning={"class_labels": torch.tensor([0, 1])}))
    later = []
    for _ in range(12):  # a steady stream of later requests must not delay the first one
        later.append(s.submit(Request(n=1, steps=3, conditioning={"class_labels": torch.tensor([2])})))
        s.tick()
        if first.done:
            break
    assert first.done and first.remaining == 0 and not any(h.done for h in later)
    assert len(calls) == 3  # its two images shared every call: 3 steps, 3 calls
    s.run_until_idle()
    assert all(h.done and h.error is None for h in later)
    order = sorted(later, key=lambda h: h.finished)
    assert [h.id for h in order] == [h.id for h in later]  # finished in arrival order


def test_a_runner_error_fails_only_the_requests_in_that_call(model):
    state = {"n": 0}

    def flaky(x, t, **c):
        state["n"] += 1
        if state["n"] == 2:
            raise RuntimeError("injected fault")
        return torch.zeros_like(x)

    s = StepScheduler(flaky, api.schedule(model), model.sample_shape, max_rows=8)
    lbl = {"class_labels": torch.tensor([4])}
    a = s.submit(Request(n=1, steps=3, conditioning=lbl))
    s.tick()
    b = s.submit(Request(n=1, steps=3, conditioning=lbl))  # joins the failing call
    s.tick()
    c = s.submit(Request(n=1, steps=2, conditioning=lbl))  # after it: served
    s.run_until_idle()
    assert "injected fault" in a.error and "injected fault" in b.error
    assert c.error is None and c.done and c.remaining == 0


def test_cancelled_requests_leave_at_the_next_tick_and_bad_requests_are_refused(model):
    s = StepScheduler(lambda x, t, **c: torch.zeros_like(x), api.schedule(model), model.sample_shape, max_rows=4)
    h = s.submit(Request(n=3, steps=5, conditioning={"class_labels": torch.tensor([1, 2, 3])}))
    s.tick()
    assert s.in_flight == 3
    h.cancel()
    assert s.tick() == 0 and s.idle
    with pytest.raises(ValueError, match="do not match n=2"):
        Request(n=2, conditioning={"class_labels": torch.tensor([1])})
    with pytest.raises(ValueError, match="unknown sampler"):
        Request(sampler="heun")
    with pytest.raises(ValueError, match="max_rows"):
        StepScheduler(lambda x, t: x, api.schedule(model), model.sample_shape, max_rows=1)


def test_scheduler_over_an_onnx_runtime_graph(model, tmp_path):
    """Any runner: the class-conditional graph in ONNX Runtime serves what `trt-dm sample --onnx` draws."""
    from trt_dm.export.onnx import export_onnx
    path = export_onnx(model.unet, tmp_path / "cls.onnx")
    settings = [SETTINGS[0], SETTINGS[1]]
    with api.open_denoiser(model, onnx=path) as den:
        s = StepScheduler(den, api.schedule(model), model.sample_shape, max_rows=6)
        handles = [s.submit(_request(model, x)) for x in settings]
        s.run_until_idle()
        for h, x in zip(handles, settings):
            torch.testing.assert_close(h.images, api.draw(model, den, x, progress=False)[0], atol=1e-4, rtol=0)


def test_scheduler_over_openvino_with_two_streams(model, tmp_path):
    """`trt-dm serve --openvino G` (parsed and opened as the CLI does): OpenVINO's 2-stream runner splits each UNet
    call into slices, so an image's rows land in different slices as other requests join and leave; served images
    still equal `trt-dm sample --openvino`'s for the same settings (same tolerance as ONNX Runtime above)."""
    pytest.importorskip("openvino")
    import contextlib

    from trt_dm.cli.parser import build_parser
    from trt_dm.cli.serve import open_service
    from trt_dm.export.onnx import export_onnx
    path = export_onnx(model.unet, tmp_path / "cls.onnx")
    args = build_parser().parse_args(["serve", "--model", str(model.source), "--openvino", str(path), "--threads",
                                      "2", "--max-rows", "6"])
    with contextlib.ExitStack() as stack:
        service, _, _ = open_service(args, stack)
        assert service.describe["runner"] == "openvino-fp32" and service.describe["streams"] == 2
        s = service.scheduler  # the service's own scheduler, driven here without its thread
        handles = [s.submit(_request(model, x)) for x in SETTINGS]
        s.run_until_idle()
        with api.open_denoiser(model, openvino=path, threads=2, ov_streams=1) as one:
            for h, x in zip(handles, SETTINGS):
                torch.testing.assert_close(h.images, api.draw(model, one, x, progress=False)[0], atol=1e-4, rtol=0)


def test_batching_policies_differ_only_in_admission(model):
    """Request-level batching and no batching (the benchmark's baselines) give the same images; they admit new
    requests only into an empty batch, so a request arriving mid-batch waits for the whole batch."""
    results, calls = {}, {}
    for policy in ("step", "request", "none"):
        rows = []

        def den(x, t, **c):
            rows.append(len(t))
            with torch.no_grad():
                return model.unet(x, t, **c).sample

        s = StepScheduler(den, api.schedule(model), model.sample_shape, max_rows=8, policy=policy)
        first = s.submit(_request(model, SETTINGS[1]))  # 3 images, ddpm 4 steps
        s.tick()
        late = s.submit(_request(model, api.SampleSettings(steps=2, n=1, seed=3, labels=(5,))))
        s.run_until_idle()
        results[policy], calls[policy] = (first.images, late.images), rows
    for policy in ("request", "none"):
        for a, b in zip(results[policy], results["step"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert calls["step"] == [3, 4, 4, 3] and calls["request"] == calls["none"] == [3, 3, 3, 3, 1, 1]
    with pytest.raises(ValueError, match="unknown batching policy"):
        StepScheduler(lambda x, t: x, api.schedule(model), model.sample_shape, policy="greedy")
