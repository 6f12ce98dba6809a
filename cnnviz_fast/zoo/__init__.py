"""The embedded default: models and data that ship with the package (nothing is downloaded).

- :func:`digits_cnn`: a small CNN trained by :mod:`cnnviz_fast.zoo.train_digits` on
  scikit-learn's digits (1×32×32, 100% on the 450 held-out test digits), weights
  committed with their SHA-256; ``relu="functional"`` gives the same network written
  with functional and in-place ReLUs.
- :func:`digits`, :func:`sample_images`: the data, as tensors in pixel space [0, 1];
  ``DIGITS_NORMALIZE`` / ``IMAGENET_NORMALIZE`` map pixels to model inputs.
- :func:`resnet18`, :func:`vgg11`, :func:`vgg19`: torchvision-style architectures with
  random weights (for tests, texture synthesis and style transfer).
- :func:`fast_style_network`: a feed-forward style-transfer network for two styles
  ("brick", "stain"), trained by :mod:`cnnviz_fast.zoo.train_fast_style`, weights committed
  with their SHA-256 (used by :func:`cnnviz_fast.synthesis.stylize`).
- :func:`efficientnet_lite0`: an ImageNet classifier (extra ``cnnviz_fast[imagenet]``),
  :func:`imagenet_classes` its 1000 class names, :func:`photos` real photos for it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..core.validation import check_choice
from .architectures import DigitsCNN, DigitsCNNFunctional, ResNet, VGG, resnet18, vgg, vgg11, vgg19
from .data import DIGITS_NORMALIZE, DIGITS_SIZE, IMAGENET_NORMALIZE, digits, photos, sample_images
from .style_network import StyleNetwork
from .efficientnet import (EFFICIENTNET_LITE0_NORMALIZE, EFFICIENTNET_LITE0_SIZE, EfficientNetLite,
                           efficientnet_lite0, imagenet_classes)

DIGITS_WEIGHTS = Path(__file__).parent / "weights" / "digits_cnn.pt"
DIGITS_WEIGHTS_SHA256 = "0c5671518c16346ec73c3c8d9e399b72716385b4c4e15b6dce33f49f286ace11"
DIGITS_CLASSES = tuple(str(i) for i in range(10))
FAST_STYLE_WEIGHTS = Path(__file__).parent / "weights" / "fast_style.pt"
FAST_STYLE_WEIGHTS_SHA256 = "0e7ed4ff2f420d98680a8b17fed51eea03bdbf0804484a2086e2112ce3f5bf46"

__all__ = [
    "DIGITS_CLASSES", "DIGITS_NORMALIZE", "DIGITS_SIZE", "DigitsCNN", "DigitsCNNFunctional",
    "EFFICIENTNET_LITE0_NORMALIZE", "EFFICIENTNET_LITE0_SIZE", "EfficientNetLite", "IMAGENET_NORMALIZE",
    "ResNet", "StyleNetwork", "VGG", "digits", "digits_cnn", "efficientnet_lite0", "fast_style_network", "imagenet_classes", "photos", "resnet18",
    "sample_images", "vgg", "vgg11", "vgg19",
]


def digits_cnn(pretrained: bool = True, relu: str = "module", check: bool = True) -> DigitsCNN:
    """The zoo's digits classifier in eval mode; inputs ``DIGITS_NORMALIZE(pixels)``.

    ``relu="module"`` uses ``nn.ReLU`` modules; ``relu="functional"`` the same weights
    with functional/in-place ReLUs. ``check`` verifies the weights' SHA-256.
    """
    classes = {"module": DigitsCNN, "functional": DigitsCNNFunctional}
    check_choice(relu, classes, "relu")
    model = classes[relu]()
    if pretrained:
        data = DIGITS_WEIGHTS.read_bytes()
        if check and hashlib.sha256(data).hexdigest() != DIGITS_WEIGHTS_SHA256:
            raise RuntimeError(f"{DIGITS_WEIGHTS} does not match its SHA-256; retrain with "
                               "`python -m cnnviz_fast.zoo.train_digits` or reinstall the package")
        model.load_state_dict(torch.load(DIGITS_WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def fast_style_network(check: bool = True) -> StyleNetwork:
    """The zoo's :class:`StyleNetwork` (styles
    ``"brick"`` and ``"stain"``) in eval mode on the CPU. ``check`` verifies the weights'
    SHA-256."""
    data = FAST_STYLE_WEIGHTS.read_bytes()
    if check and hashlib.sha256(data).hexdigest() != FAST_STYLE_WEIGHTS_SHA256:
        raise RuntimeError(f"{FAST_STYLE_WEIGHTS} does not match its SHA-256; retrain with "
                           "`python -m cnnviz_fast.zoo.train_fast_style` or reinstall the package")
    return StyleNetwork.from_checkpoint(torch.load(FAST_STYLE_WEIGHTS, map_location="cpu", weights_only=True)).eval()
