"""Texture synthesis and style transfer on a random-weight VGG-19, judged by a plain
PyTorch Gatys computation (bmm Gram matrices, MSE) written here."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cnnviz_fast as cv
from cnnviz_fast import zoo
from cnnviz_fast.core import forward_to_layers
from cnnviz_fast.pictures import image_grid, save_png

OUT = Path(__file__).resolve().parents[1] / "test-output" / "synthesis"
NORM = zoo.IMAGENET_NORMALIZE
STYLE_LAYERS = ["features.1", "features.6", "features.11", "features.20", "features.29"]  # relu1_1 .. relu5_1
# relu2_2: deeper features of a random-weight VGG hardly depend on the image (relu4_2 of
# the china and flower photos differ by 0.008% of their energy), so they keep no content
CONTENT_LAYER = "features.8"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vgg():
    return zoo.vgg("vgg19", width_divisor=4)


@pytest.fixture(scope="module")
def photos():
    return zoo.sample_images(size=64)


def plain_gram(features):
    n, c = features.shape[:2]
    flat = features.reshape(n, c, -1)
    return torch.bmm(flat, flat.transpose(1, 2)) / flat.shape[-1]


def plain_style_loss(model, pixels, style, layers):
    """sum_l (1/L) mean((G_l - T_l)^2) / mean(T_l^2), with bmm Grams of the plain features."""
    with torch.no_grad():
        ours = forward_to_layers(model, NORM(pixels), layers)
        theirs = forward_to_layers(model, NORM(style), layers)
    total = 0.0
    for name in layers:
        target = plain_gram(theirs[name])
        total += F.mse_loss(plain_gram(ours[name]), target) / target.pow(2).mean() / len(layers)
    return float(total)


def test_texture_synthesis_matches_the_gram_matrices(vgg, photos):
    texture = photos["china"]
    layers = STYLE_LAYERS[:4]
    start = []

    def remember_start(step, pixels, losses):
        if step == 0:
            start.append(pixels.clone())

    result = cv.synthesize_texture(vgg, texture, layers, normalize=NORM, steps=100, callback=remember_start,
                                   progress=False)
    initial = plain_style_loss(vgg, start[0], texture, layers)
    final = plain_style_loss(vgg, result.images, texture, layers)
    assert float(result.history[0, 0]) == pytest.approx(initial, rel=1e-4)
    assert final <= 0.05 * initial, (initial, final)
    assert result.images.shape == texture.shape
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    save_png(image_grid(torch.cat([texture, result.images]), nrow=2), OUT / "texture.png", upscale=3)


def test_texture_batch_and_output_size(vgg, photos):
    textures = torch.cat([photos["china"], photos["flower"]])
    start = []
    result = cv.synthesize_texture(vgg, textures, STYLE_LAYERS[:2], size=(48, 40), normalize=NORM, steps=5,
                                   optimizer="adam", lr=0.05, progress=False,
                                   callback=lambda step, pixels, losses: start.append(pixels) if step == 0 else None)
    assert result.images.shape == (2, 3, 48, 40) and result.history.shape == (5, 2)
    for i in range(2):  # each image is measured against its own texture
        expected = plain_style_loss(vgg, start[0][i:i + 1], textures[i:i + 1], STYLE_LAYERS[:2])
        assert float(result.history[0, i]) == pytest.approx(expected, rel=1e-4)


def test_objective_equals_plain_gatys_loss_and_gradient(vgg, photos):
    """One evaluation of our style-transfer objective (fused gram_loss, truncated forward)
    against plain PyTorch (bmm Gram, mse_loss, the full features Sequential)."""
    from cnnviz_fast.synthesis.style import _gram_losses, _style_grams

    style = photos["flower"]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    grams = _style_grams(vgg, style, NORM, STYLE_LAYERS, "style")
    features = forward_to_layers(vgg, NORM(x), STYLE_LAYERS)
    ours = _gram_losses(features, grams, STYLE_LAYERS, [0.2] * 5, torch.arange(1))
    (ours_grad,) = torch.autograd.grad(ours.sum(), x)

    plain = 0.0
    h = NORM(x)
    with torch.no_grad():
        s = NORM(style)
    for index, module in enumerate(vgg.features[:30]):
        h, s = module(h.clone()), module(s)  # clone: the ReLUs are in place
        if f"features.{index}" in STYLE_LAYERS:
            target = plain_gram(s)
            plain = plain + 0.2 * F.mse_loss(plain_gram(h), target) / target.pow(2).mean()
    (plain_grad,) = torch.autograd.grad(plain, x)
    torch.testing.assert_close(ours[0], plain, rtol=1e-4, atol=0)
    torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-3, atol=1e-3 * float(plain_grad.abs().max()))


def test_style_transfer(vgg, photos):
    content, style = photos["china"], photos["flower"]
    result = cv.style_transfer(vgg, content, style, CONTENT_LAYER, STYLE_LAYERS, normalize=NORM, steps=60,
                               progress=False)
    assert result.images.shape == content.shape
    assert result.history[-1, 0] < 0.2 * result.history[0, 0]
    # more of the style's statistics than the content photo had, more of the content than the style photo
    assert plain_style_loss(vgg, result.images, style, STYLE_LAYERS) < 0.2 * plain_style_loss(
        vgg, content, style, STYLE_LAYERS)
    with torch.no_grad():
        kept = forward_to_layers(vgg, NORM(content), [CONTENT_LAYER])[CONTENT_LAYER]
        ours = forward_to_layers(vgg, NORM(result.images), [CONTENT_LAYER])[CONTENT_LAYER]
        other = forward_to_layers(vgg, NORM(style), [CONTENT_LAYER])[CONTENT_LAYER]
    assert F.mse_loss(ours, kept) < 0.5 * F.mse_loss(other, kept)
    save_png(image_grid(torch.cat([content, style, result.images]), nrow=3), OUT / "style_transfer.png", upscale=3)


def test_style_arguments(vgg, photos):
    content, style = photos["china"], photos["flower"]
    with pytest.raises(ValueError, match="style_layers"):
        cv.style_transfer(vgg, content, style, CONTENT_LAYER, ["features.99"], normalize=NORM)
    with pytest.raises(ValueError, match="content_layer"):
        cv.style_transfer(vgg, content, style, "features.nope", STYLE_LAYERS, normalize=NORM)
    with pytest.raises(ValueError, match="style"):
        cv.style_transfer(vgg, content, style[:, :1], CONTENT_LAYER, STYLE_LAYERS, normalize=NORM)
    with pytest.raises(ValueError, match="layers"):
        cv.synthesize_texture(vgg, style, [], normalize=NORM)
    with pytest.raises(ValueError, match="layer_weights"):
        cv.synthesize_texture(vgg, style, STYLE_LAYERS[:2], layer_weights=[1.0], normalize=NORM)
    with pytest.raises(ValueError, match="texture"):
        cv.synthesize_texture(vgg, style * 2, STYLE_LAYERS[:2], normalize=NORM)
    assert all(p.grad is None for p in vgg.parameters())
