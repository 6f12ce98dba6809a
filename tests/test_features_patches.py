"""max_activating_patches against a brute-force full sort, patch contents, guided
backprop option, patch_grid and filter_grid pictures."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnnviz_fast import (filter_grid, max_activating_patches, patch_grid, receptive_field,
                         save_png, zoo)
from cnnviz_fast.core import forward_to_layers

OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "features"


def brute_force(model, inputs, layer, channels, k, batch_size):
    """All activations (same batches, so the same floating-point results), then per channel
    a full sort by (value desc, image, y, x)."""
    with torch.no_grad():
        activation = torch.cat([forward_to_layers(model.eval(), inputs[i:i + batch_size], [layer])[layer]
                                for i in range(0, len(inputs), batch_size)])
    if activation.dim() == 2:
        activation = activation[:, :, None, None]
    n, y, x = (grid.flatten().numpy() for grid in torch.meshgrid(
        *(torch.arange(s) for s in (activation.shape[0],) + activation.shape[2:]), indexing="ij"))
    result = []
    for channel in channels:
        values = activation[:, channel].flatten().double().numpy()
        order = np.lexsort((x, y, n, -values))[:k]  # last key is the primary one
        result.append([(-values[i], n[i], y[i], x[i]) for i in order])
    return result


def assert_same_as_brute_force(top, expected):
    for row, units in enumerate(expected):
        assert top.values[row].tolist() == [-u[0] for u in units]
        assert top.indices[row].tolist() == [u[1] for u in units]
        assert top.y[row].tolist() == [u[2] for u in units]
        assert top.x[row].tolist() == [u[3] for u in units]


def digits_inputs(count):
    pixels, _ = zoo.digits("test")
    return zoo.DIGITS_NORMALIZE(pixels[:count])


@pytest.mark.parametrize("layer, channels", [("features.conv3", [0, 5, 17, 63]),
                                             ("features.relu2", None),
                                             ("classifier.fc1", None)])
def test_equals_brute_force(layer, channels):
    model = zoo.digits_cnn()
    inputs = digits_inputs(40)
    top = max_activating_patches(model, inputs, layer, channels=channels, k=7, batch_size=9, progress=False)
    chosen = channels if channels is not None else list(range(top.values.shape[0]))
    assert top.channels.tolist() == chosen
    assert_same_as_brute_force(top, brute_force(model, inputs, layer, chosen, 7, batch_size=9))


def test_ties_follow_image_then_position():
    # A ReLU layer on mostly-black digits: many exact zeros, so the cut falls inside ties.
    model = zoo.digits_cnn()
    pixels, _ = zoo.digits("test")
    inputs = zoo.DIGITS_NORMALIZE(pixels[:12])
    layer, channels, k = "features.relu5", [0, 1, 2, 3, 4, 5], 300
    with torch.no_grad():
        positive = (forward_to_layers(model, inputs, [layer])[layer][:, channels] > 0).flatten(2).sum((0, 2))
    assert (positive < k).any(), "the test needs ties at the cut"
    top = max_activating_patches(model, inputs, layer, channels=channels, k=k, batch_size=5, progress=False)
    assert_same_as_brute_force(top, brute_force(model, inputs, layer, channels, k, batch_size=5))


def test_patches_are_the_receptive_fields():
    model = zoo.digits_cnn()
    inputs = digits_inputs(20)
    top = max_activating_patches(model, inputs, "features.conv5", channels=[1, 2], k=5, fill=-7.0,
                                 batch_size=8, progress=False)
    rf = receptive_field(model, (1, 32, 32), "features.conv5")
    assert top.receptive_field == rf
    assert top.patches.shape == (2, 5, 1, 24, 24) and top.inside.shape == (2, 5, 24, 24)
    for row in range(2):
        for column in range(5):
            y, x, index = int(top.y[row, column]), int(top.x[row, column]), int(top.indices[row, column])
            top_, left, bottom, right = rf.box(y, x)
            canvas = torch.full((1, 32 + 48, 32 + 48), -7.0)  # the image on a big fill border
            canvas[:, 24:56, 24:56] = inputs[index]
            expected = canvas[:, top_ + 24:bottom + 24, left + 24:right + 24]
            torch.testing.assert_close(top.patches[row, column], expected, rtol=0, atol=0)
            assert torch.equal(top.inside[row, column], expected[0] != -7.0)


def test_any_iterable_of_batches_is_read_once():
    model = zoo.digits_cnn()
    inputs = digits_inputs(30)
    labels = torch.zeros(30)
    reference = max_activating_patches(model, inputs, "features.conv4", channels=[4, 9], k=6, progress=False)
    batches = ((inputs[i:i + 7], labels[i:i + 7]) for i in range(0, 30, 7))
    streamed = max_activating_patches(model, batches, "features.conv4", channels=[4, 9], k=6, progress=False)
    for name in ("values", "indices", "y", "x", "patches", "inside"):
        assert torch.equal(getattr(streamed, name), getattr(reference, name)), name


def test_bad_arguments_name_the_argument():
    model = zoo.digits_cnn()
    inputs = digits_inputs(2)
    with pytest.raises(ValueError, match="k must be at most the number of units per channel"):
        max_activating_patches(model, inputs, "features.pool3", k=33, progress=False)
    with pytest.raises(ValueError, match="layer 'features.conv7'"):
        max_activating_patches(model, inputs, "features.conv7")
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 16\)"):
        max_activating_patches(model, inputs, "features.conv1", channels=[16], progress=False)
    with pytest.raises(ValueError, match="k must be an integer"):
        max_activating_patches(model, inputs, "features.conv1", k=0)
    with pytest.raises(ValueError, match="guided=True needs data that can be indexed"):
        max_activating_patches(model, iter([inputs]), "features.conv1", guided=True)


def test_patch_grid_picture():
    model = zoo.digits_cnn()
    top = max_activating_patches(model, digits_inputs(120), "features.conv5", channels=range(8), k=8,
                                 progress=False)
    grid = patch_grid(top, inverse=zoo.DIGITS_NORMALIZE.inverse)
    assert grid.shape == (1, 8 * 25 + 1, 8 * 25 + 1)
    assert 0 <= grid.min() and grid.max() <= 1
    save_png(grid, OUTPUT / "patches_conv5.png", upscale=3)
    # The first tile is the first patch, as pixels, with grey outside the image.
    tile = grid[0, 1:25, 1:25]
    expected = zoo.DIGITS_NORMALIZE.inverse(top.patches[0, 0][None])[0, 0].clamp(0, 1)
    expected = torch.where(top.inside[0, 0], expected, torch.tensor(0.5))
    torch.testing.assert_close(tile, expected)


def test_guided_backprop_beside_the_patches():
    from cnnviz_fast.attribution import guided_backprop
    model = zoo.digits_cnn()
    inputs = digits_inputs(10)
    try:
        guided_backprop(model, inputs[:1], target=3)
    except NotImplementedError:
        pytest.skip("cnnviz_fast.attribution.guided_backprop is not implemented yet")
    top = max_activating_patches(model, inputs, "features.conv4", channels=[0, 1], k=3, guided=True,
                                 progress=False)
    assert top.guided.shape == top.patches.shape
    from cnnviz_fast.core import Neuron
    gradient = guided_backprop(model, inputs[int(top.indices[1, 2])][None],
                               target=Neuron("features.conv4", 1, int(top.y[1, 2]), int(top.x[1, 2])))
    top_, left, bottom, right = top.receptive_field.clipped_box(int(top.y[1, 2]), int(top.x[1, 2]))
    inside = top.guided[1, 2][:, top.inside[1, 2]]
    torch.testing.assert_close(inside.flatten(), gradient[0, :, top_:bottom, left:right].flatten())
    grid = patch_grid(top)
    assert grid.shape[-1] == (2 * 3 + 1) * (top.patches.shape[-1] + 1) + 1
    save_png(grid, OUTPUT / "patches_guided_conv4.png", upscale=4)


def test_filter_grid_first_layer_rgb():
    model = zoo.resnet18(num_classes=10)
    grid = filter_grid(model)  # conv1: 64 filters of 3×7×7
    assert grid.shape == (3, 8 * 8 + 1, 8 * 8 + 1)
    weight = model.conv1.weight.detach()
    for index in (0, 13, 63):
        row, column = divmod(index, 8)
        tile = grid[:, 1 + row * 8:1 + row * 8 + 7, 1 + column * 8:1 + column * 8 + 7]
        w = weight[index]
        torch.testing.assert_close(tile, (w - w.min()) / (w.max() - w.min()))
    save_png(grid, OUTPUT / "filters_resnet18_conv1.png", upscale=6)


def test_filter_grid_deeper_layer_rows_of_grayscale_tiles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 5), nn.ReLU(), nn.Conv2d(16, 20, 7))
    grid = filter_grid(model, "2")  # the lecture's 20 × 16 × 7×7 second layer
    assert grid.shape == (1, 20 * 8 + 1, 16 * 8 + 1)
    w = model[2].weight.detach()[4]
    tile = grid[0, 1 + 4 * 8:1 + 4 * 8 + 7, 1 + 3 * 8:1 + 3 * 8 + 7]
    torch.testing.assert_close(tile, (w[3] - w.min()) / (w.max() - w.min()))
    save_png(grid, OUTPUT / "filters_20x16x7x7.png", upscale=4)
    digits = filter_grid(zoo.digits_cnn())  # 16 grayscale 3×3 filters
    assert digits.shape == (1, 4 * 4 + 1, 4 * 4 + 1)
    with pytest.raises(ValueError, match="layer '1' must be an nn.Conv2d"):
        filter_grid(model, "1")
    with pytest.raises(ValueError, match="per_channel=False"):
        filter_grid(model, "2", per_channel=False)
