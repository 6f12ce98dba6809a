"""saliency, smoothgrad, integrated_gradients against Captum (Saliency, NoiseTunnel,
IntegratedGradients) and against independent constructions."""
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

import cnnviz_fast as cv
from cnnviz_fast import Neuron, zoo
from cnnviz_fast.core import layout
from anchors import neuron_forward

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits()
    return zoo.digits_cnn(), zoo.DIGITS_NORMALIZE(pixels[:4]), labels[:4]


@pytest.fixture(scope="module")
def resnet():
    return zoo.resnet18(num_classes=10), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- saliency
@pytest.mark.parametrize("use_abs", [True, False])
def test_saliency_matches_captum_digits(digits, use_abs):
    model, x, labels = digits
    ours = cv.saliency(model, x, labels, abs=use_abs)
    ref = Saliency(model).attribute(x, target=labels.tolist(), abs=use_abs)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref)
    if not use_abs:
        assert (ours < 0).any()


@pytest.mark.parametrize("batch", [1, 2])
def test_saliency_matches_captum_resnet_int_target(resnet, batch):
    model, x = resnet
    x = x[:batch]
    torch.testing.assert_close(cv.saliency(model, x, 3), Saliency(model).attribute(x, target=3))


def test_saliency_neuron_and_callable_targets(digits):
    model, x, _ = digits
    for neuron in (Neuron("features.conv3", 5), Neuron("features.relu4", 7, 3, 2), Neuron("classifier.fc1", 11)):
        ref = Saliency(neuron_forward(model, neuron)).attribute(x)
        torch.testing.assert_close(cv.saliency(model, x, neuron), ref)
    score = lambda out: out.log_softmax(1)[:, 2]  # noqa: E731
    ref = Saliency(lambda t: score(model(t))).attribute(x)
    torch.testing.assert_close(cv.saliency(model, x, score), ref)


def test_saliency_per_image_tensor_target_equals_one_at_a_time(digits):
    model, x, labels = digits
    together = cv.saliency(model, x, labels.clone())
    alone = torch.cat([cv.saliency(model, x[i:i + 1], int(labels[i])) for i in range(len(x))])
    torch.testing.assert_close(together, alone)


# --------------------------------------------------------------------------- smoothgrad
def test_smoothgrad_one_image_equals_captum_noise_tunnel(digits):
    """Same noise: Captum draws one [1, C, H, W] sample per partition from the global
    generator (nt_samples_batch_size=1); we draw one [C, H, W] per noisy image."""
    model, x, labels = digits
    x = x[:1]
    noise, samples = 0.2, 6
    sigma = noise * float(x.max() - x.min())
    for kind, kwargs in (("smoothgrad", {}), ("smoothgrad_sq", {"squared": True})):
        torch.manual_seed(123)
        ref = NoiseTunnel(Saliency(model)).attribute(
            x, nt_type=kind, nt_samples=samples, nt_samples_batch_size=1, stdevs=sigma, target=int(labels[0]))
        torch.manual_seed(123)
        ours = cv.smoothgrad(model, x, int(labels[0]), samples=samples, noise=noise, batch_size=4, **kwargs)
        torch.testing.assert_close(ours, ref)


def test_smoothgrad_equals_mean_saliency_over_same_noisy_images(resnet):
    model, x = resnet
    x = x * torch.tensor([1.0, 3.0])[:, None, None, None]  # different value ranges per image
    samples, noise, targets = 4, 0.1, [1, 7]
    gen = torch.Generator().manual_seed(5)
    noisy, rows_target = [], []
    for n in range(len(x)):  # image-major, one randn(C, H, W) per noisy copy
        sigma = noise * (x[n].max() - x[n].min())
        for _ in range(samples):
            noisy.append(x[n] + sigma * torch.randn(x.shape[1:], generator=gen))
            rows_target.append(targets[n])
    grads = Saliency(model).attribute(torch.stack(noisy), target=rows_target, abs=False)
    grads = grads.view(len(x), samples, *x.shape[1:])
    for squared, use_abs, statistic in ((False, True, grads.abs()), (False, False, grads), (True, True, grads ** 2)):
        ours = cv.smoothgrad(model, x, targets, samples=samples, noise=noise, batch_size=3, seed=5,
                             squared=squared, abs=use_abs)
        torch.testing.assert_close(ours, statistic.mean(1), rtol=1e-4, atol=1e-7)


def test_smoothgrad_reproducible_and_independent_of_batch_size(digits):
    model, x, labels = digits
    x, labels = x[:2], labels[:2]
    a = cv.smoothgrad(model, x, labels, samples=3, batch_size=16, seed=3)
    b = cv.smoothgrad(model, x, labels, samples=3, batch_size=4, generator=torch.Generator().manual_seed(3))
    c = cv.smoothgrad(model, x, labels, samples=3, batch_size=5, seed=4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_smoothgrad_without_noise_is_saliency(digits):
    model, x, labels = digits
    torch.testing.assert_close(cv.smoothgrad(model, x, labels, samples=3, noise=0.0),
                               cv.saliency(model, x, labels))


# --------------------------------------------------------------------------- integrated gradients
@pytest.mark.parametrize("baseline", [None, 0.5, "tensor"])
def test_integrated_gradients_matches_captum(digits, baseline):
    model, x, labels = digits
    if baseline == "tensor":
        baseline = torch.rand(1, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    x, labels = x[:2], labels[:2]
    ours = cv.integrated_gradients(model, x, labels, baseline=baseline, steps=10, batch_size=7)
    ref = IntegratedGradients(model).attribute(x, baselines=baseline, target=labels.tolist(), n_steps=10,
                                               method="gausslegendre")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_resnet_neuron_target(resnet):
    model, x = resnet
    neuron = Neuron("layer2.0.conv1", 4, 2, 3)
    ours = cv.integrated_gradients(model, x, neuron, steps=8, batch_size=5)
    ref = IntegratedGradients(neuron_forward(model, neuron)).attribute(x, n_steps=8)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_completeness_256_steps():
    pixels, labels = zoo.digits()
    model, x = zoo.digits_cnn(), zoo.DIGITS_NORMALIZE(pixels[:3])
    baseline = zoo.DIGITS_NORMALIZE(torch.zeros(1, 1, 32, 32))  # black image
    attributions = cv.integrated_gradients(model, x, labels[:3], baseline=baseline, steps=256, batch_size=256)
    with torch.no_grad():
        rows = torch.arange(3)
        delta = model(x)[rows, labels[:3]] - model(baseline.expand_as(x))[rows, labels[:3]]
    assert delta.abs().min() > 1  # a meaningful difference to be complete about
    error = (attributions.sum(dim=(1, 2, 3)) - delta).abs() / delta.abs()
    assert error.max() < 0.01, error


def test_gauss_legendre_rule_integrates_polynomials_exactly():
    from cnnviz_fast.attribution.gradients import _gauss_legendre
    alphas, weights = _gauss_legendre(4, torch.zeros((), dtype=torch.float64))
    for power in range(8):  # 4 points integrate degree <= 7 exactly
        assert abs(float((weights * alphas ** power).sum()) - 1 / (power + 1)) < 1e-12
    assert np.all((alphas.numpy() > 0) & (alphas.numpy() < 1))


class RecordsLayout(torch.nn.Module):
    """Conv net without max pooling (no ties for float rounding to flip), flattening by
    ``.view`` when asked (a channels-last map refuses that)."""
    def __init__(self, view: bool):
        super().__init__()
        self.conv, self.fc, self.view = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * 14 * 14, 5), view
        self.layouts = []

    def forward(self, x):
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        y = torch.tanh(self.conv(x))
        return self.fc(y.view(len(y), -1) if self.view else y.flatten(1))


@pytest.mark.parametrize("method", ["saliency", "guided_backprop", "smoothgrad", "integrated_gradients"])
def test_large_cpu_batches_run_channels_last_with_equal_results(method, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    model = RecordsLayout(view=False).double()
    kwargs = dict(samples=4, seed=0) if method == "smoothgrad" else dict(steps=4) if method == "integrated_gradients" \
        else {}
    contiguous = getattr(cv, method)(model, x, [0, 2, 4], **kwargs)
    assert not any(model.layouts)  # 3 x 16 x 16 pixels: below MIN_PIXELS
    monkeypatch.setattr(layout, "MIN_PIXELS", 0)
    model.layouts.clear()
    channels_last = getattr(cv, method)(model, x, [0, 2, 4], **kwargs)
    assert model.layouts and all(model.layouts)
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-10, atol=1e-12)

    refusing = RecordsLayout(view=True).double()
    refusing.load_state_dict(model.state_dict())
    torch.testing.assert_close(getattr(cv, method)(refusing, x, [0, 2, 4], **kwargs), contiguous,
                               rtol=1e-10, atol=1e-12)
    assert refusing.layouts[0] and not any(refusing.layouts[1:])  # refused once, then contiguous
