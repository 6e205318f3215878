import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trt_dm.core.images import make_grid, save_grid, save_samples, to_uint8


def test_to_uint8_maps_range_ends_and_midpoint():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).ravel().tolist() == [0, 128, 255, 255, 0]


def test_grid_layout_places_each_image():
    imgs = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 1.0, -1.0)])
    g = np.asarray(make_grid(imgs, nrow=2, pad=1))
    assert g.shape == (2 * 5 + 1, 2 * 5 + 1)
    assert (g[1:5, 1:5] == 0).all() and (g[1:5, 6:10] == 255).all() and (g[6:10, 1:5] == 0).all()
    assert (g[6:10, 6:10] == 255).all()  # empty cell stays white padding


def test_save_grid_and_samples(tmp_path):
    imgs = torch.rand(5, 1, 8, 8) * 2 - 1
    p = save_grid(imgs, tmp_path / "sub" / "g.png", scale=2)
    assert Image.open(p).size == ((3 * 10 + 2) * 2, (2 * 10 + 2) * 2)
    assert not list((tmp_path / "sub").glob(".*tmp*"))
    s = save_samples(imgs, tmp_path / "s.safetensors", {"seed": "0"})
    assert torch.equal(load_file(str(s))["samples"], imgs)
    with pytest.raises(ValueError, match="must end in .png"):
        save_grid(imgs, tmp_path / "g.gif")
    with pytest.raises(ValueError, match="non-empty"):
        make_grid(torch.empty(0, 1, 4, 4))
