"""``target="predicted"`` and ``return_output=True``: prediction and explanation from one
pass, for every attribution method."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Neuron


class Counted(nn.Module):
    """A small CNN that counts its forward passes and the images they saw."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = self.conv2(F.relu(self.conv(x)))
        return self.fc(F.relu(x).flatten(1))


# name -> (call with target and return_output, forward passes of one call on N images)
METHODS = {
    "saliency": (lambda m, x, t, r: cv.saliency(m, x, t, return_output=r), 1),
    "guided_backprop": (lambda m, x, t, r: cv.guided_backprop(m, x, t, return_output=r), 1),
    "deconvnet": (lambda m, x, t, r: cv.deconvnet(m, x, t, return_output=r), 1),
    "grad_cam": (lambda m, x, t, r: cv.grad_cam(m, x, "conv2", t, return_output=r), 1),
    "guided_grad_cam": (lambda m, x, t, r: cv.guided_grad_cam(m, x, "conv2", t, return_output=r), 2),
    # the clean pass plus one pass per batch of copies (4 images x 3 copies / batch 6)
    "smoothgrad": (lambda m, x, t, r: cv.smoothgrad(m, x, t, samples=3, batch_size=6, seed=1,
                                                    return_output=r), 3),
    "integrated_gradients": (lambda m, x, t, r: cv.integrated_gradients(m, x, t, steps=3, batch_size=6,
                                                                        return_output=r), 3),
    # the clean pass plus 4 images x 9 window positions / batch 36 (mode="full": the default
    # exact mode also runs forward() once under torch.fx tracing, and its passes skip forward())
    "occlusion": (lambda m, x, t, r: cv.occlusion(m, x, t, window=4, stride=2, batch_size=36,
                                                  return_output=r, mode="full"), 2),
}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Counted().eval()


@pytest.fixture
def inputs():
    return torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_predicted_equals_explicit_classes_and_output_is_the_clean_output(name, model, inputs):
    method, passes = METHODS[name]
    with torch.no_grad():
        logits = model(inputs)
    classes = logits.argmax(1)
    expected = method(model, inputs, classes, False)

    model.calls = 0
    maps, output = method(model, inputs, "predicted", True)
    assert model.calls == passes  # the prediction costs no forward pass of its own
    torch.testing.assert_close(output, logits, rtol=1e-5, atol=1e-6)
    assert not output.requires_grad
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_return_output_with_a_neuron_target_runs_the_whole_model(name, model, inputs):
    method, _ = METHODS[name]
    target = Neuron("conv2", 1)
    expected = method(model, inputs, target, False)
    maps, output = method(model, inputs, target, True)
    with torch.no_grad():
        torch.testing.assert_close(output, model(inputs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


def test_one_pass_costs_one_forward_and_one_backward(model, inputs):
    """A service's request: prediction and saliency from exactly one forward pass."""
    model.calls = 0
    maps, logits = cv.saliency(model, inputs, "predicted", return_output=True)
    assert model.calls == 1 and maps.shape == inputs.shape and logits.shape == (4, 5)


def test_occlusion_returns_deltas_then_output(model, inputs):
    attribution, deltas, output = cv.occlusion(model, inputs, "predicted", window=4, stride=2,
                                               return_deltas=True, return_output=True)
    assert attribution.shape == (4, 8, 8) and deltas.shape == (4, 3, 3) and output.shape == (4, 5)
    assert not output.is_inference()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_predicted_needs_a_classifier_output(name, inputs):
    method, _ = METHODS[name]
    spatial = nn.Sequential()  # a segmentation-style output [N, 4, 8, 8]
    spatial.add_module("conv", nn.Conv2d(3, 6, 3, padding=1))
    spatial.add_module("relu", nn.ReLU())
    spatial.add_module("conv2", nn.Conv2d(6, 4, 3, padding=1))
    with pytest.raises(ValueError, match=r"'predicted' needs a model output \[N, classes\]"):
        method(spatial, inputs, "predicted", False)


def test_unknown_string_target_is_refused(model, inputs):
    with pytest.raises(ValueError, match="'predicted'"):
        cv.saliency(model, inputs, "1")


def test_adversarial_leaves_the_predicted_class(model):
    pixels = torch.rand(3, 3, 8, 8)
    result = cv.adversarial(model, pixels, "predicted", "pgd", eps=0.5, steps=5, seed=0)
    with torch.no_grad():
        predicted = model(pixels).argmax(1)
    explicit = cv.adversarial(model, pixels, predicted, "pgd", eps=0.5, steps=5, seed=0)
    torch.testing.assert_close(result.images, explicit.images)
    with pytest.raises(ValueError, match="needs inputs to predict from"):
        cv.adversarial(model, pixels, "predicted", "pgd", targeted=True)
