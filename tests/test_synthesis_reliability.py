"""Every synthesis method as a service calls it: inside the caller's ``torch.no_grad()`` /
``torch.inference_mode()``, on channels_last and non-contiguous images, with a model that
writes into its input, on tiny images. Each call is compared with a plain call."""
import pytest
import torch
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Neuron
from cnnviz_fast.synthesis import Objective, PixelImage, optimize

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """conv, ReLU, conv, ReLU, global pool, linear: any image size works.
    ``scale_input`` multiplies the input in place (a model that writes into its input)."""

    def __init__(self, scale_input: bool = False):
        super().__init__()
        self.scale_input = scale_input
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x):
        if self.scale_input:
            x.mul_(0.5)
        return self.head(self.features(x))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def pixels(n=2, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# Each entry: a call with the images as its one tensor argument (None: the method takes none).
CALLS = {
    "visualize_class": lambda model, x: cv.visualize_class(model, [1, 2], (3, 8, 8), init=x, steps=2,
                                                           progress=False),
    "visualize_neuron": lambda model, x: cv.visualize_neuron(model, [Neuron("features.2", 0), Neuron("features.2", 1)],
                                                             (3, 8, 8), init=x, steps=2, progress=False),
    "adversarial": lambda model, x: cv.adversarial(model, x, [0, 1], "pgd", steps=2),
    "adversarial_ascent": lambda model, x: cv.adversarial(model, x, [0, 1], "ascent", steps=2),
    "invert_features": lambda model, x: cv.invert_features(model, x, "features.2", steps=2, progress=False),
    "deep_dream": lambda model, x: cv.deep_dream(model, x, "features.2", steps=2, octaves=2, progress=False),
    "synthesize_texture": lambda model, x: cv.synthesize_texture(model, x, ["features.1", "features.3"], steps=2,
                                                                 progress=False),
    "style_transfer": lambda model, x: cv.style_transfer(model, x, x.flip(0), "features.2",
                                                         ["features.1", "features.3"], steps=2, progress=False),
}


def assert_same_result(result, expected):
    assert torch.equal(result.images, expected.images)
    assert torch.equal(result.history, expected.history)
    assert torch.isfinite(result.history).all()


@pytest.mark.parametrize("method", CALLS)
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "inference_tensor"])
def test_synthesis_works_inside_the_callers_grad_mode(net, method, grad_mode):
    x = pixels()
    expected = CALLS[method](net, x)
    if grad_mode == "no_grad":
        with torch.no_grad():
            result = CALLS[method](net, x)
    elif grad_mode == "inference_mode":
        with torch.inference_mode():
            result = CALLS[method](net, x)
    else:  # the caller's images were made under inference_mode, the call is outside it
        with torch.inference_mode():
            inference_x = x.clone()
        result = CALLS[method](net, inference_x)
    assert_same_result(result, expected)
    assert not result.images.is_inference()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("method", CALLS)
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_synthesis_on_channels_last_and_non_contiguous_images(net, method, layout):
    x = pixels()
    expected = CALLS[method](net, x)
    if layout == "channels_last":
        other = x.contiguous(memory_format=torch.channels_last)
    else:
        wide = torch.zeros(2, 3, 8, 16)
        wide[..., ::2] = x
        other = wide[..., ::2]
        assert not other.is_contiguous()
    assert_same_result(CALLS[method](net, other), expected)


@pytest.mark.parametrize("method", CALLS)
def test_a_model_writing_into_its_input_leaves_the_callers_images_alone(method):
    torch.manual_seed(0)
    model = Net(scale_input=True)
    x = pixels()
    before = x.clone()
    result = CALLS[method](model, x)
    assert torch.equal(x, before)
    assert torch.isfinite(result.history).all()


def test_optimize_guards_the_model_itself(net):
    net.train()
    image = PixelImage(torch.full((1, 3, 8, 8), 0.5))
    objective = Objective(loss=lambda features, output, index: -output[:, 0], needs_output=True)
    with torch.no_grad():
        result = optimize(net, objective, image, steps=2, progress=False)
    assert result.history.shape == (2, 1) and torch.isfinite(result.history).all()
    assert all(m.training for m in net.modules())  # restored to training mode
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("size", [(6, 20), (1, 1), (4, 4), (20, 6)])
def test_deep_dream_keeps_the_image_size(net, size):
    image = torch.rand(1, 3, *size)
    result = cv.deep_dream(net, image, "features.2", steps=1, octaves=3, progress=False)
    assert result.images.shape == image.shape
    assert torch.isfinite(result.history).all()


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1)])
def test_invert_features_on_a_one_pixel_high_or_wide_image(net, size):
    result = cv.invert_features(net, torch.rand(1, 3, *size), "features.2", steps=3, progress=False)
    assert result.images.shape == (1, 3) + size
    assert torch.isfinite(result.history).all() and torch.isfinite(result.relative_error).all()


def test_total_variation_of_an_image_without_neighbours_is_zero():
    tv = cv.synthesis.TotalVariation(1.0)
    assert torch.equal(tv(torch.rand(2, 3, 1, 7)), torch.zeros(2))
    image = torch.rand(2, 3, 4, 5)
    dy = image[..., 1:, :-1] - image[..., :-1, :-1]
    dx = image[..., :-1, 1:] - image[..., :-1, :-1]
    torch.testing.assert_close(tv(image), (dx ** 2 + dy ** 2).flatten(1).mean(1))
