"""The memory layout of the image batches a method runs through the model.

On the CPU, oneDNN's convolutions run large channels-last (NHWC) batches faster than
contiguous (NCHW) ones, and small ones slower. On the 2-core EPYC (benchmarks/bench_layout.py,
results/layout-*.md), forward and forward + input gradient ran 1.05-1.57x faster from
4x3x224x224 and 16x3x112x112 up (ResNet-18, VGG-16, MobileNetV2, EfficientNet-Lite0), but
ResNet-18 ran 1.5-2.2x slower at 4x3x112x112 and 1x3x112x112. So only batches of at least
MIN_PIXELS pixels (N x H x W) go channels-last: occlusion's full passes and the gradient
methods' batches (a service's batch of one stays contiguous). The model's weights are
left as they are.

A model that takes ``.view`` of a feature map cannot run on channels-last maps (torch
raises "view size is not compatible"); such a model gets contiguous batches from then on.
"""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["fast_layout", "run_in_fast_layout"]

R = TypeVar("R")
MIN_PIXELS = 16 * 112 * 112
_VIEW_REFUSED = "view size is not compatible"
_REFUSING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models that refused channels-last


def fast_layout(model: nn.Module, shape, device) -> torch.memory_format:
    """The layout :func:`run_in_fast_layout` runs a batch of ``shape`` on ``device`` in, so
    that whoever builds the batch can write it so (no copy there)."""
    device = torch.device(device)
    if (device.type != "cpu" or len(shape) != 4 or shape[1] == 1 or model in _REFUSING
            or shape[0] * shape[2] * shape[3] < MIN_PIXELS):
        return torch.contiguous_format
    return torch.channels_last


def run_in_fast_layout(model: nn.Module, batch: Tensor, run: Callable[[Tensor], R]) -> R:
    """``run(batch)`` with ``batch`` in the faster layout for ``model`` on its device: a
    channels-last copy of a large CPU image batch (none if it is one already), else
    ``batch`` itself."""
    if fast_layout(model, tuple(batch.shape), batch.device) is not torch.channels_last:
        return run(batch)
    try:
        return run(batch.contiguous(memory_format=torch.channels_last))
    except RuntimeError as error:
        if _VIEW_REFUSED not in str(error):
            raise
        _REFUSING.add(model)
        return run(batch.contiguous())
