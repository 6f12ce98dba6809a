"""TensorFlow-style ``SAME`` padding as one function, so that a model using it can be
captured by ``torch.fx`` (with ``torch.fx.wrap("pad_same")`` where it is called): the
padding depends on the input's size, which symbolic tracing cannot compute with."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor

__all__ = ["pad_same", "same_padding"]


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """``(before, after)`` padding of one dimension of length ``size`` so that a
    convolution's output has ``ceil(size / stride)`` elements; the odd pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int] = (1, 1),
             value: float = 0.0) -> Tensor:
    """``x [..., H, W]`` padded with ``value`` for a ``SAME`` convolution (timm's signature)."""
    (top, bottom), (left, right) = (same_padding(int(n), k, s, d)
                                    for n, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation))
    pads = (left, right, top, bottom)
    return F.pad(x, pads, value=value) if any(pads) else x
