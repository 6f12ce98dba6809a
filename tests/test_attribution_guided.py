"""guided_backprop and deconvnet against Captum (GuidedBackprop, Deconvolution,
NeuronGuidedBackprop) on models with nn.ReLU modules, and against a hand-built
reference on the model whose ReLUs are functional / in-place (where Captum is wrong)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop, NeuronDeconvolution, NeuronGuidedBackprop
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Neuron, ops, pictures, zoo
from cnnviz_fast.attribution import _backprop

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")

OUT = Path(__file__).resolve().parent.parent / "test-output" / "attribution"
METHODS = {"guided": (cv.guided_backprop, GuidedBackprop, NeuronGuidedBackprop),
           "deconvnet": (cv.deconvnet, Deconvolution, NeuronDeconvolution)}


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits()
    return zoo.digits_cnn(), zoo.digits_cnn(relu="functional"), zoo.DIGITS_NORMALIZE(pixels[:5]), labels[:5]


class _ReferenceReLU(torch.autograd.Function):
    """The rules as written in the papers, independent of cnnviz_fast.ops."""

    @staticmethod
    def forward(ctx, x, mode):
        ctx.mode = mode
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        keep = grad > 0 if ctx.mode == "deconvnet" else (grad > 0) & (x > 0)
        return grad * keep, None


def reference_digits_forward(model, x, mode):
    """DigitsCNN's forward written out by hand with the reference ReLU."""
    f, c = model.features, model.classifier
    r = lambda t: _ReferenceReLU.apply(t, mode)  # noqa: E731
    x = f.pool1(r(f.conv2(r(f.conv1(x)))))
    x = f.pool2(r(f.conv4(r(f.conv3(x)))))
    x = f.pool3(r(f.conv5(x)))
    return c.fc2(r(c.fc1(x.flatten(1))))


def reference_gradient(model, x, labels, mode):
    x = x.clone().requires_grad_(True)
    scores = reference_digits_forward(model, x, mode).gather(1, labels[:, None]).sum()
    return torch.autograd.grad(scores, x)[0]


@pytest.mark.parametrize("mode", METHODS)
def test_digits_module_relus_match_captum(digits, mode):
    model, _, x, labels = digits
    ours_fn, captum_cls, _ = METHODS[mode]
    ours = ours_fn(model, x, labels)
    torch.testing.assert_close(ours, captum_cls(model).attribute(x, target=labels.tolist()))
    torch.testing.assert_close(ours, reference_gradient(model, x, labels, mode))


@pytest.mark.parametrize("mode", METHODS)
def test_functional_relus_match_module_variant_and_reference(digits, mode):
    model, functional, x, labels = digits
    ours_fn, captum_cls, _ = METHODS[mode]
    ours = ours_fn(functional, x, labels)
    torch.testing.assert_close(ours, captum_cls(model).attribute(x, target=labels.tolist()))
    torch.testing.assert_close(ours, reference_gradient(model, x, labels, mode))
    # and Captum gets the functional model wrong: it modifies only the one nn.ReLU module
    # (features.relu5) and returns plain gradients through the five functional ReLUs
    captum_functional = captum_cls(functional).attribute(x, target=labels.tolist())
    assert (captum_functional - ours).abs().max() > 0.1 * ours.abs().max()


def test_every_relu_replaced_exactly_once(digits, monkeypatch):
    model, functional, x, labels = digits
    calls = []

    def counting(function, kind):
        def wrapper(t, mode, upper=None):
            calls.append((kind, mode))
            return function(t, mode, upper)
        return wrapper

    class CountingInPlace:
        apply = staticmethod(counting(_backprop._GuidedReLUInPlace.apply, "in-place"))

    monkeypatch.setattr(ops, "guided_relu", counting(ops.guided_relu, "out-of-place"))
    monkeypatch.setattr(_backprop, "_GuidedReLUInPlace", CountingInPlace)
    cv.guided_backprop(model, x, labels)  # six nn.ReLU modules
    assert calls == [("out-of-place", "guided")] * 6
    calls.clear()
    # F.relu, torch.relu, Tensor.relu; Tensor.relu_, nn.ReLU(inplace=True), F.relu(inplace=True)
    cv.deconvnet(functional, x, labels)
    assert calls == [("out-of-place", "deconvnet")] * 3 + [("in-place", "deconvnet")] * 3


class InPlaceAliasing(nn.Module):
    """ReLUs applied in place whose results are discarded: the aliasing must hold."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x, reference_mode=None):
        y = self.conv1(x)
        if reference_mode is None:
            torch.relu_(y)  # result discarded: y itself must now hold relu(y)
        else:
            y = _ReferenceReLU.apply(y, reference_mode)
        z = self.conv2(y)
        if reference_mode is None:
            F.relu(z, inplace=True)
        else:
            z = _ReferenceReLU.apply(z, reference_mode)
        return self.fc(z.flatten(1))


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("mode", METHODS)
def test_in_place_relus_keep_aliasing(mode, compiled, monkeypatch):
    if not compiled:  # the in-place ReLU's backward from the reference ops
        monkeypatch.setattr(ops, "has_extension", lambda: False)
    model = InPlaceAliasing().eval()
    x = torch.randn(3, 3, 8, 8)
    ours = METHODS[mode][0](model, x, [0, 1, 3])
    xr = x.clone().requires_grad_(True)
    scores = model(xr, reference_mode=mode).gather(1, torch.tensor([[0], [1], [3]])).sum()
    torch.testing.assert_close(ours, torch.autograd.grad(scores, xr)[0])


@pytest.mark.parametrize("mode", METHODS)
def test_resnet18_inplace_relu_modules_match_captum(mode):
    model = zoo.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    ours_fn, captum_cls, _ = METHODS[mode]
    torch.testing.assert_close(ours_fn(model, x, [2, 5]), captum_cls(model).attribute(x, target=[2, 5]))


def test_vgg11_matches_captum():
    model = zoo.vgg11(num_classes=10, hidden=256)  # VGG-11 features, a small classifier
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(cv.guided_backprop(model, x, 7), GuidedBackprop(model).attribute(x, target=7))


@pytest.mark.parametrize("mode", METHODS)
def test_neuron_targets_match_captum_neuron_methods(digits, mode):
    model, functional, x, _ = digits
    ours_fn, _, captum_neuron_cls = METHODS[mode]
    layer = model.features.conv4
    for neuron, selector in ((Neuron("features.conv4", 9, 4, 11), (9, 4, 11)),
                             (Neuron("features.conv4", 3), lambda a: a[:, 3].mean(dim=(1, 2)))):
        ref = captum_neuron_cls(model, layer).attribute(x, neuron_selector=selector)
        torch.testing.assert_close(ours_fn(model, x, neuron), ref)
        torch.testing.assert_close(ours_fn(functional, x, neuron), ref)


def test_callable_target(digits):
    model, functional, x, labels = digits
    score = lambda out: out[:, 1] - out[:, 7]  # noqa: E731
    xr = x.clone().requires_grad_(True)
    out = reference_digits_forward(model, xr, "guided")
    expected = torch.autograd.grad(score(out).sum(), xr)[0]
    torch.testing.assert_close(cv.guided_backprop(functional, x, score), expected)


def test_pictures_of_guided_backprop_on_digits(digits):
    """Guided backprop of the predicted class and of single conv5 neurons (lecture style)."""
    model, functional, x, labels = digits
    rows = [x, cv.saliency(model, x, labels), cv.guided_backprop(functional, x, labels),
            cv.deconvnet(functional, x, labels)]
    for channel in (3, 20, 77):
        rows.append(cv.guided_backprop(functional, x, Neuron("features.relu5", channel)))
    grid = pictures.image_grid(torch.cat(rows), nrow=len(x), scale=True)
    path = pictures.save_png(grid, OUT / "guided_digits.png", upscale=4)
    assert path.exists()
    # guided backprop is sharper than plain saliency: more of its mass on the digit strokes
    guided = rows[2].abs()
    stroke = (zoo.DIGITS_NORMALIZE.inverse(x) > 0.3).float()
    share = lambda m: ((m * stroke).sum((1, 2, 3)) / m.sum((1, 2, 3))).mean()  # noqa: E731
    assert share(guided) > share(rows[1])


def test_integer_relus_pass_through():
    class CountsPositives(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            positives = torch.relu(torch.sign(x).long()).sum(dim=(1, 2, 3))  # an integer ReLU
            return self.fc(F.relu(x).mean(dim=(2, 3))) * positives[:, None]

    model = CountsPositives().eval()
    x = torch.randn(2, 4, 3, 3)
    xr = x.clone().requires_grad_(True)
    positives = (x > 0).sum(dim=(1, 2, 3))
    out = model.fc(_ReferenceReLU.apply(xr, "guided").mean(dim=(2, 3))) * positives[:, None]
    expected = torch.autograd.grad(out[:, 1].sum(), xr)[0]
    torch.testing.assert_close(cv.guided_backprop(model, x, 1), expected)
