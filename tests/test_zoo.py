"""The embedded default: shipped weights, data, architectures."""
import hashlib

import pytest
import torch

from cnnviz_fast import zoo
from cnnviz_fast.zoo.train_digits import accuracy


def test_digits_weights_checksum_and_accuracy():
    assert hashlib.sha256(zoo.DIGITS_WEIGHTS.read_bytes()).hexdigest() == zoo.DIGITS_WEIGHTS_SHA256
    x, y = zoo.digits("test")
    assert x.shape == (450, 1, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert accuracy(zoo.digits_cnn(), x, y) >= 0.97


def test_functional_variant_shares_weights_and_outputs():
    module, functional = zoo.digits_cnn(), zoo.digits_cnn(relu="functional")
    assert not any(isinstance(m, torch.nn.ReLU) and not m.inplace for m in [functional.features.relu5])
    x = zoo.DIGITS_NORMALIZE(zoo.digits("test")[0][:16])
    with torch.no_grad():
        torch.testing.assert_close(module(x), functional(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="relu must be one of"):
        zoo.digits_cnn(relu="tanh")
    with pytest.raises(ValueError, match="split must be one of"):
        zoo.digits("val")
    with pytest.raises(ValueError, match="name must be one of"):
        zoo.vgg("vgg13")


def test_sample_images():
    images = zoo.sample_images()
    assert set(images) == {"china", "flower"}
    assert images["china"].shape == (1, 3, 427, 640)
    square = zoo.sample_images(size=96)["flower"]
    assert square.shape == (1, 3, 96, 96) and 0 <= float(square.min()) and float(square.max()) <= 1


@pytest.mark.parametrize("ours, name", [(zoo.resnet18, "resnet18"), (zoo.vgg11, "vgg11"), (zoo.vgg19, "vgg19")])
def test_architectures_match_torchvision_layout(ours, name):
    torchvision = pytest.importorskip("torchvision")
    reference = getattr(torchvision.models, name)()
    model = ours()
    assert {k: v.shape for k, v in model.state_dict().items()} == \
           {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    torch.testing.assert_close(ours(seed=3).state_dict()[next(iter(model.state_dict()))],
                               ours(seed=3).state_dict()[next(iter(model.state_dict()))])
