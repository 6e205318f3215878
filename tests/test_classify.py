"""The class-accuracy classifier shipped in models/classifier: real Fashion-MNIST test images are classified
as its card says, and class_accuracy scores requested labels."""
import json

import pytest
import torch

from trt_dm import data
from trt_dm.classify import CLASSIFIER_DIR, class_accuracy, load_classifier, predict


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
