"""The class-accuracy classifier shipped in models/classifier: real Fashion-MNIST test images are classified
as its card says, and class_accuracy scores requested labels."""
import json

import pytest
import torch

from trt_dm.eval import data
from trt_dm.eval.classify import CLASSIFIER_DIR, class_accuracy, load_classifier, paired_accuracy, predict


@pytest.fixture(scope="module")
def net():
    return load_classifier()


def test_shipped_classifier_matches_its_card(net):
    card = json.loads((CLASSIFIER_DIR / "config.json").read_text())
    assert (CLASSIFIER_DIR / "classifier.safetensors").stat().st_size < 2_000_000
    x, y = data.load("test", limit=1000)
    acc = class_accuracy(x, y, net)
    assert abs(acc - card["test_accuracy"]) < 0.03 and acc > 0.85  # 1000 of the card's 10,000 test images
    # requested labels that the images do not show score low
    assert class_accuracy(x, (y + 1) % 10, net) < 0.1


def test_classifier_refuses_other_shapes(net):
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        predict(torch.zeros(2, 1, 16, 16), net)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        class_accuracy(torch.zeros(2, 1, 32, 32), torch.zeros(3), net)


def test_paired_accuracy_of_images_against_their_same_seed_twins(net):
    """The paired change equals the difference of the two accuracies; its interval comes from the per-image
    differences (zero width when nothing changes) and agreement counts images classified alike."""
    x, y = data.load("test", limit=400)
    same = paired_accuracy(x, x, y, net)
    assert same["change_points"] == 0 and same["ci95_points"] == [0, 0] and same["agreement"] == 1 and same["n"] == 400
    worse = x.clone()
    worse[:100] = torch.flip(x[:100], dims=[2])  # upside down: many of these 100 are misclassified
    r = paired_accuracy(x, worse, y, net)
    expect = 100 * (class_accuracy(worse, y, net) - class_accuracy(x, y, net))
    assert abs(r["change_points"] - expect) < 1e-9 and r["change_points"] < -5
    lo, hi = r["ci95_points"]
    d = (predict(worse, net) == y).double() - (predict(x, net) == y).double()
    assert abs((hi - lo) / 2 - 100 * 1.96 * float(d.std()) / 20) < 1e-9 and lo < r["change_points"] < hi < 0
    assert 0.75 <= r["agreement"] < 1  # only the 100 flipped images can change class
    with pytest.raises(ValueError, match="one of each per image"):
        paired_accuracy(x[:3], x[:2], y[:3], net)
