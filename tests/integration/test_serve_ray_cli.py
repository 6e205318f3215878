"""`trt-dm serve --ray` flags without Ray: usage errors."""
import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")


def test_ray_flags_without_ray_are_a_usage_error(tiny_cls_pipeline_dir):
    from trt_dm.cli.main import main
    assert main(["serve", "--model", str(tiny_cls_pipeline_dir), "--replicas", "2"]) == 2
