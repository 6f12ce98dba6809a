"""The synthesis engine and its building blocks, each against an independent computation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import zoo
from cnnviz_fast.synthesis import (AlphaNorm, Blur, ClipSmallContribution, ClipSmallNorm, Decay, FourierImage,
                                   Jitter, L2, Objective, PixelImage, RandomAffine, TotalVariation, optimize)
from cnnviz_fast.synthesis.parameterization import COLOR_DECORRELATION, make_image
from cnnviz_fast.synthesis.regularizers import gaussian_blur


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 5))


def class_objective(classes):
    classes = torch.as_tensor(classes)
    return Objective(loss=lambda f, out, index: -out.gather(1, classes[index, None])[:, 0], needs_output=True)


# ----------------------------------------------------------------------------- parameterizations
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("squash", ["sigmoid", "clamp"])
def test_fourier_set_native_inverts_native(channels, squash):
    generator = torch.Generator().manual_seed(1)
    image = FourierImage((2, channels, 12, 10), squash=squash, generator=generator)
    pixels = torch.rand(2, channels, 12, 10, generator=generator) * 0.9 + 0.05
    image.set_native(pixels)
    torch.testing.assert_close(image.native(), pixels, atol=1e-4, rtol=0)


def test_fourier_spectrum_scaling_and_colour():
    image = FourierImage((1, 3, 8, 8), std=0.0)
    # 1/f: the DC term and the lowest frequency are scaled by max(h, w) = 8, f = 1/2 by 2
    assert image.scale[0, 0] == pytest.approx(8.0) and image.scale[0, 1] == pytest.approx(8.0)
    assert image.scale[0, 4] == pytest.approx(2.0)
    # a zero spectrum is the grey image; colours are decorrelated for RGB only
    torch.testing.assert_close(image.native(), torch.full((1, 3, 8, 8), 0.5))
    assert FourierImage((1, 1, 8, 8)).color is None
    assert COLOR_DECORRELATION.norm(dim=0).max() == pytest.approx(1.0)


def test_low_resolution_is_upsampled_bilinearly():
    init = torch.rand(2, 1, 8, 8)
    image = PixelImage(init, size=32)
    expected = F.interpolate(init, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(image(), expected)
    assert make_image("fourier", (2, 1, 32, 32), resolution=8)().shape == (2, 1, 32, 32)


def test_pixel_image_bounds_and_gradient_on_the_bound():
    init = torch.tensor([[[[-0.5, 0.0, 0.5, 1.0, 2.0]]]])
    image = PixelImage(init)
    torch.testing.assert_close(image.native(), init.clamp(0, 1))
    image.pixels.data.copy_(init)  # outside the bounds, as between L-BFGS iterations
    (grad,) = torch.autograd.grad(image.native().sum(), image.pixels)
    assert grad.flatten().tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- regularizers
def test_penalties_match_loops():
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    a = x.numpy()
    tv = np.zeros(2)
    for n in range(2):
        for i in range(4):
            for j in range(5):
                tv[n] += ((a[n, :, i + 1, j] - a[n, :, i, j]) ** 2 + (a[n, :, i, j + 1] - a[n, :, i, j]) ** 2).sum()
    tv /= 3 * 4 * 5
    np.testing.assert_allclose(TotalVariation(2.0)(x).numpy(), 2 * tv)
    np.testing.assert_allclose(L2(3.0, center=0.25)(x).numpy(), 3 * ((a - 0.25) ** 2).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(AlphaNorm(0.5, alpha=6, center=0.5)(x).numpy(),
                               0.5 * (np.abs(a - 0.5) ** 6).mean(axis=(1, 2, 3)))


def test_blur_matches_scipy():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    ours = gaussian_blur(x, 1.0).numpy()
    theirs = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.0, 1.0), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    blur = Blur(1.0, every=3)
    assert blur(x, None, 0) is None and blur(x, None, 2) is not None


def test_step_operations():
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(Decay(0.1, center=0.5)(x, None, 0), 0.5 + 0.9 * (x - 0.5))
    norms = (x - 0.5).norm(dim=1).flatten()
    cut = torch.quantile(norms, 0.25)
    clipped = ClipSmallNorm(25, center=0.5)(x, None, 0)
    for k in range(16):
        pixel = clipped[0, :, k // 4, k % 4]
        expected = x[0, :, k // 4, k % 4] if norms[k] >= cut else torch.full((3,), 0.5, dtype=torch.float64)
        torch.testing.assert_close(pixel, expected)
    grad = torch.randn_like(x)
    contribution = ((x - 0.5) * grad).sum(1).abs().flatten()
    kept = ClipSmallContribution(50, center=0.5)(x, grad, 0)[0].ne(0.5).any(0).flatten()
    assert torch.equal(kept, contribution >= torch.quantile(contribution, 0.5))


def test_jitter_is_a_roll_within_range():
    x = torch.rand(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        shifted = Jitter(2)(x, g)
        assert any(torch.equal(shifted, torch.roll(x, (dy, dx), (2, 3)))
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_affine_geometry():
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    # a quarter turn of a square image maps pixel centres onto pixel centres
    turned = RandomAffine.apply(x, 1.0, 90.0)
    assert any(torch.allclose(turned, torch.rot90(x, k, (2, 3)), atol=1e-12) for k in (1, 3))
    # scaling up by 2 about the centre: the middle 3x3 pixels spread over the image
    zoomed = RandomAffine.apply(x, 2.0, 0.0)
    expected = F.interpolate(x[..., 1:5, 1:5], size=(8, 8), mode="bilinear", align_corners=False)[..., 1:7, 1:7]
    torch.testing.assert_close(zoomed, expected)
    torch.testing.assert_close(RandomAffine((1.0, 1.0), 0.0)(x, torch.Generator()), x)


# ----------------------------------------------------------------------------- the loop
def test_model_parameters_never_get_gradients():
    model = small_model().train()
    flags = [p.requires_grad for p in model.parameters()]
    image = PixelImage(torch.full((2, 3, 8, 8), 0.5))
    result = optimize(model, class_objective([1, 2]), image, steps=3, progress=False)
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():  # gradients a user accumulated are left alone
        p.grad = torch.ones_like(p)
    optimize(model, class_objective([1, 2]), PixelImage(torch.full((2, 3, 8, 8), 0.5)), steps=2, progress=False)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert result.images.shape == (2, 3, 8, 8) and result.history.shape == (3, 2)
    # optimize itself does not guard; the public methods do (tested in test_synthesis_methods)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_batch_equals_separate_runs():
    model = small_model().eval()
    init = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    together = optimize(model, class_objective([0, 1, 2]), PixelImage(init), steps=5, lr=0.05,
                        penalties=[TotalVariation(0.1)], progress=False)
    for i in range(3):
        alone = optimize(model, class_objective([i]), PixelImage(init[i:i + 1]), steps=5, lr=0.05,
                         penalties=[TotalVariation(0.1)], progress=False)
        torch.testing.assert_close(alone.images[0], together.images[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.history[:, 0], together.history[:, i], atol=1e-5, rtol=1e-5)


def test_signed_sgd_step_matches_hand_computation():
    model = small_model().eval()
    init = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    result = optimize(model, class_objective([3, 4]), PixelImage(init), steps=1, lr=0.01, optimizer="sgd",
                      step_norm="sign", progress=False)
    x = init.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(-model(x)[[0, 1], [3, 4]].sum(), x)
    torch.testing.assert_close(result.images, (init - 0.01 * grad.sign()).clamp(0, 1))


def test_done_images_stop_and_leave_the_batch():
    model = small_model().eval()
    seen = []

    def loss(features, output, index):
        seen.append(index.tolist())
        return -output[:, 0]

    def done(features, output, index):
        return index == 0  # image 0 is finished at once

    init = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = optimize(model, Objective(loss=loss, needs_output=True, done=done), PixelImage(init), steps=3,
                      optimizer="sgd", lr=0.1, progress=False)
    assert seen == [[0, 1], [1], [1]]
    torch.testing.assert_close(result.images[0], init[0])
    assert not torch.allclose(result.images[1], init[1])


def test_lbfgs_and_forward_stops_at_the_deepest_layer():
    model = small_model().eval()
    calls = []
    model[4].register_forward_hook(lambda *args: calls.append(1))  # the classifier must never run
    objective = Objective(loss=lambda f, out, index: -f["1"].flatten(1).mean(1), layers=("1",))
    init = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = optimize(model, objective, PixelImage(init), steps=10, optimizer="lbfgs", lr=0.1, progress=False)
    assert not calls
    assert result.history[-1, 0] < result.history[0, 0]
    assert 0 <= float(result.images.min()) and float(result.images.max()) <= 1


def test_callback_progress_and_validation(capsys):
    model = small_model().eval()
    steps_seen = []

    def callback(step, pixels, losses):
        steps_seen.append(step)
        assert pixels.shape == (1, 3, 8, 8) and losses.shape == (1,)
        return step == 2

    result = optimize(model, class_objective([0]), PixelImage(torch.rand(1, 3, 8, 8)), steps=10,
                      callback=callback, progress=True)
    assert steps_seen == [0, 1, 2] and result.history.shape == (3, 1)
    assert "synthesis" in capsys.readouterr().err  # the tqdm bar
    optimize(model, class_objective([0]), PixelImage(torch.rand(1, 3, 8, 8)), steps=2)
    assert capsys.readouterr().err == ""  # not a terminal: no bar by default
    with pytest.raises(ValueError, match="optimizer"):
        optimize(model, class_objective([0]), PixelImage(torch.rand(1, 3, 8, 8)), optimizer="rmsprop")
    with pytest.raises(ValueError, match="step_norm"):
        optimize(model, class_objective([0]), PixelImage(torch.rand(1, 3, 8, 8)), step_norm="l1")


def test_digits_fourier_low_resolution_parameterization_runs_on_zoo_model():
    model = zoo.digits_cnn()
    image = make_image("fourier", (2, 1, 32, 32), resolution=8, generator=torch.Generator().manual_seed(0))
    result = optimize(model, class_objective([3, 7]), image, normalize=zoo.DIGITS_NORMALIZE, steps=5,
                      transforms=[Jitter(2), RandomAffine()], progress=False)
    assert result.images.shape == (2, 1, 32, 32)
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1


def test_prior_object_equals_its_fields_as_keywords():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    options = dict(parameterization="pixels", l2=0.5, tv=0.2, jitter=1, degrees=0.0, scale=None)
    by_keywords = cv.visualize_class(model, 1, (1, 8, 8), steps=3, **options)
    by_object = cv.visualize_class(model, 1, (1, 8, 8), steps=3, prior=cv.Prior(**options))
    torch.testing.assert_close(by_keywords.images, by_object.images, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['l3'\]"):
        cv.visualize_class(model, 1, (1, 8, 8), steps=1, l3=1.0)
    with pytest.raises(ValueError, match="not both"):
        cv.visualize_class(model, 1, (1, 8, 8), steps=1, prior=cv.Prior(), l2=1.0)
