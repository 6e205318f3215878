"""`trt-dm profile` on a tiny model: the report's schema, the runners it finds, the files it writes."""

from trt_dm.models.builders import ARCHS, build_arch


def test_benchmark_architectures_have_the_stated_sizes():
    # parameter counts of the reference models (DDPM CIFAR-10: 35.7 M; SD 1.5 UNet: 859.5 M; SDXL base: 2,567.5 M;
    # DiT-XL/2 in diffusers' layout: 749.8 M)
    import torch

    from trt_dm.models.denoisers import denoiser_class
    unet, _ = build_arch("ddpm-cifar10")
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 35.7
    assert set(ARCHS) == {"ddpm-cifar10", "sd15-unet", "sdxl-unet", "dit-xl-2", "pixart-sigma", "sd3-medium"}
    for name, millions in (("sd15-unet", 859.5), ("sdxl-unet", 2567.5), ("dit-xl-2", 749.8),
                            ("pixart-sigma", 610.9), ("sd3-medium", 2028.3)):
        kind, cfg = ARCHS[name]
        with torch.device("meta"):  # sizes only: no 10 GB of weights
            big = denoiser_class(kind, cfg)(**cfg)
        assert round(sum(p.numel() for p in big.parameters()) / 1e6, 1) == millions


def test_interleaved_timing_rounds_rotate_and_settle(tiny_unet_dir):
    # every runner gets exactly `iters` timings; each round starts with an untimed (settling) call per runner,
    # and the order of runners rotates from round to round
    import copy

    import torch

    from trt_dm.eval.profile import _time_interleaved, feed_for
    from trt_dm.models.loading import load_model
    from trt_dm.runtime.torch_runner import TorchRunner

    unet = load_model(tiny_unet_dir).unet
    log: list[str] = []
    runners = {}
    for name in ("a", "b", "c"):
        net = copy.deepcopy(unet)
        net.register_forward_hook(lambda m, i, o, name=name: log.append(name))
        runners[name] = TorchRunner(net, device="cpu", dtype=torch.float32, name=name)
    with runners["a"], runners["b"], runners["c"]:
        times = _time_interleaved(runners, feed_for(unet, 1), warmup=1, iters=7, block=3, settle=1)
    assert {n: len(v) for n, v in times.items()} == {"a": 7, "b": 7, "c": 7}
    assert all(t > 0 for v in times.values() for t in v)
    body = log[3:]  # after one warm-up call each
    # rounds of (1 settling + 3 timed) calls per runner, twice, then a last round of (1 + 1)
    assert len(body) == 3 * (4 + 4 + 2)
    assert body[0:12] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert body[12:24] == ["b"] * 4 + ["c"] * 4 + ["a"] * 4
    assert body[24:] == ["c", "c", "a", "a", "b", "b"]


