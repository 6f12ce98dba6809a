"""receptive_field against a gradient probe: with positive weights, average instead of
max pooling and positive inputs, the gradient of a unit w.r.t. the input is nonzero
exactly on the input pixels inside its receptive field."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnviz_fast import ReceptiveField, receptive_field, zoo
from cnnviz_fast.core import forward_to_layers


def positive_copy(model):
    """Same geometry, no vanishing gradients: weights > 0, max pools → average pools."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.abs() + 0.01)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1)
    return model


def gradient_box(model, layer, size, y, x):
    """Bounding box (top, left, bottom, right) of the input pixels with nonzero gradient,
    and whether the nonzero set fills that box."""
    inputs = (torch.rand(1, *size, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_(True)
    activation = forward_to_layers(model, inputs, [layer])[layer]
    unit = activation[0, :, y, x] if activation.dim() == 4 else activation[0]
    unit.sum().backward()
    support = inputs.grad[0].abs().sum(0) > 0
    rows, cols = support.nonzero(as_tuple=True)
    box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    filled = bool(support[box[0]:box[2], box[1]:box[3]].all())
    return box, filled


def check_against_gradients(model, layer, size, units):
    rf = receptive_field(model, size, layer)
    probe = positive_copy(model)
    for y, x in units:
        box, filled = gradient_box(probe, layer, size, y, x)
        assert box == rf.clipped_box(y, x), f"{layer} unit ({y}, {x}): {rf}"
        assert filled
    return rf


def test_digits_cnn_layers():
    model = zoo.digits_cnn(pretrained=False)
    size = (1, 32, 32)
    # Three 3×3 convs at stride 1 and 2, pool: hand-computed sizes.
    assert check_against_gradients(model, "features.conv1", size, [(0, 0), (5, 9)]) == \
        ReceptiveField((3, 3), (1, 1), (-1, -1), (32, 32), (32, 32))
    rf = check_against_gradients(model, "features.conv5", size, [(0, 0), (3, 4), (7, 7)])
    assert (rf.size, rf.stride, rf.offset, rf.output_size) == ((24, 24), (4, 4), (-10, -10), (8, 8))
    assert rf.center == (1.5, 1.5)
    rf = check_against_gradients(model, "features.pool3", size, [(1, 2), (2, 1)])
    assert rf.size == (28, 28) and rf.stride == (8, 8)


def test_functional_relu_variant_gives_the_same_field():
    size = (1, 32, 32)
    assert receptive_field(zoo.digits_cnn(relu="functional"), size, "features.pool2") == \
        receptive_field(zoo.digits_cnn(), size, "features.pool2")


def test_resnet_residual_blocks():
    model = zoo.resnet18(num_classes=10)
    size = (3, 96, 96)
    rf = check_against_gradients(model, "layer1", size, [(0, 0), (6, 5), (12, 12)])
    assert rf.size == (43, 43) and rf.stride == (4, 4)
    # The downsampling block: its 1×1 shortcut sees less than the main branch.
    rf = check_against_gradients(model, "layer2.0", size, [(0, 0), (5, 6)])
    assert rf.size == (67, 67) and rf.stride == (8, 8)
    check_against_gradients(model, "layer2.1.conv1", size, [(6, 6)])


def test_vgg():
    model = zoo.vgg11(num_classes=10, width_divisor=16, hidden=32)
    check_against_gradients(model, "features.10", (3, 64, 64), [(0, 0), (3, 4)])


class Odd(nn.Module):
    """Dilation, asymmetric kernels and strides, F.pad, a functional pool, concatenation
    of branches with different extents."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, (3, 5), stride=(1, 2), padding=(1, 0), dilation=(2, 1))
        self.b = nn.Conv2d(2, 2, 3, padding="same", dilation=2)
        self.c = nn.Conv2d(2, 2, 1)
        self.out = nn.Identity()

    def forward(self, x):
        x = F.pad(self.a(x), (1, 2, 0, 1))
        x = F.avg_pool2d(x, 2, stride=1)
        return self.out(torch.cat([F.relu(self.b(x)), self.c(x)], 1) * 2)


def test_unusual_layers():
    model = Odd()
    rf = check_against_gradients(model, "out", (1, 40, 40), [(0, 0), (9, 3), (20, 7)])
    # Hand-computed: a: size (5, 5), stride (1, 2), offset (-1, 0); pad: offset (-1, -2);
    # pool 2/1: size (6, 7); b: 3×3 dilated by 2 → +4 pixels × stride.
    assert rf.size == (10, 15) and rf.stride == (1, 2) and rf.offset == (-3, -6)


def test_linear_layer_sees_the_whole_input():
    rf = receptive_field(zoo.digits_cnn(pretrained=False), (1, 32, 32), "classifier.fc1")
    assert rf == ReceptiveField((32, 32), (0, 0), (0, 0), (32, 32), (1, 1))
    assert rf.clipped_box(0, 0) == (0, 0, 32, 32)


def test_unsupported_ops_and_bad_arguments():
    class Upsampling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.conv(F.interpolate(x, scale_factor=2))

    with pytest.raises(ValueError, match="interpolate"):
        receptive_field(Upsampling(), (1, 8, 8), "conv")
    model = zoo.digits_cnn(pretrained=False)
    with pytest.raises(ValueError, match="layer 'features.conv9'"):
        receptive_field(model, (1, 32, 32), "features.conv9")
    with pytest.raises(ValueError, match="input_size"):
        receptive_field(model, (32, 32), "features.conv1")
    model.train()
    receptive_field(model, (1, 32, 32), "features.conv1")
    assert model.training
