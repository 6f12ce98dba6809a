"""Model definitions of the zoo: the digits CNN (module-ReLU and functional-ReLU
variants sharing one state dict) and torchvision-style ResNet/VGG constructors
with random weights, written here so the package never needs torchvision."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from ..core.validation import check_choice


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


class DigitsCNN(nn.Module):
    """Small CNN for 1×32×32 digits: 3 conv stages with ``nn.ReLU`` modules.

    Layers (dotted names): ``features.conv1`` … ``features.conv5``, ``features.relu1`` …,
    ``features.pool1`` … ``features.pool3``, ``classifier.fc1`` (the 128-D feature layer),
    ``classifier.relu``, ``classifier.fc2`` (10 class scores).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", _conv(in_channels, 16)), ("relu1", nn.ReLU()),
            ("conv2", _conv(16, 32)), ("relu2", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),   # 16×16
            ("conv3", _conv(32, 64)), ("relu3", nn.ReLU()),
            ("conv4", _conv(64, 64)), ("relu4", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),   # 8×8
            ("conv5", _conv(64, 128)), ("relu5", nn.ReLU()), ("pool3", nn.MaxPool2d(2)),  # 4×4
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()), ("dropout", nn.Dropout(0.3)),
            ("fc1", nn.Linear(128 * 4 * 4, 128)), ("relu", nn.ReLU()),
            ("fc2", nn.Linear(128, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsCNNFunctional(DigitsCNN):
    """The same network and state dict, but its ReLUs are every other spelling a user
    writes: ``F.relu``, ``torch.relu``, ``Tensor.relu``, ``Tensor.relu_``,
    ``F.relu(inplace=True)`` and ``nn.ReLU(inplace=True)``. Methods that only hook
    ``nn.ReLU`` modules get this model wrong; ours must not."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(num_classes, in_channels)
        self.features.relu5 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features
        x = F.relu(f.conv1(x))
        x = f.pool1(torch.relu(f.conv2(x)))
        x = f.conv3(x).relu()
        x = f.pool2(f.conv4(x).relu_())
        x = f.pool3(f.relu5(f.conv5(x)))
        c = self.classifier
        x = F.relu(c.fc1(c.dropout(c.flatten(x))), inplace=True)
        return c.fc2(x)


# --- torchvision-style architectures (same module names as torchvision) -------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks (``layer1`` … ``layer4``, ``fc``)."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000,
                 in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for index, blocks in enumerate(layers):
            cout = width * 2 ** index
            stage = [BasicBlock(cin, cout, 1 if index == 0 else 2)]
            stage += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, seed: int = 0, **kwargs) -> ResNet:
    """ResNet-18 (torchvision layout and names) with random weights from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet((2, 2, 2, 2), num_classes, **kwargs).eval()


_VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """torchvision's VGG (``features``, ``avgpool``, ``classifier``), optional width scaling."""

    def __init__(self, config: List, num_classes: int = 1000, in_channels: int = 3,
                 width_divisor: int = 1, hidden: int = 4096):
        super().__init__()
        layers: List[nn.Module] = []
        cin = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = item // width_divisor
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        hidden //= width_divisor
        self.classifier = nn.Sequential(
            nn.Linear(cin * 49, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg(name: str = "vgg11", num_classes: int = 1000, seed: int = 0, **kwargs) -> VGG:
    """VGG-11/16/19 (torchvision layout and names) with random weights from ``seed``."""
    check_choice(name, _VGG_CONFIGS, "name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VGG(_VGG_CONFIGS[name], num_classes, **kwargs).eval()


def vgg11(num_classes: int = 1000, seed: int = 0, **kwargs) -> VGG:
    return vgg("vgg11", num_classes, seed, **kwargs)


def vgg19(num_classes: int = 1000, seed: int = 0, **kwargs) -> VGG:
    return vgg("vgg19", num_classes, seed, **kwargs)
