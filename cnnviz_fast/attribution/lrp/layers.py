"""One intercepted linear layer call (``F.conv1d/2d/3d``, ``F.linear``): what an LRP rule
needs to know about it.

A rule evaluates the layer with modified parameters (``forward``) and multiplies by the
transposed layer (``transpose``: the input gradient of the layer for given output
gradients, without the weight gradient). A batch norm that follows the layer is merged
into ``weight`` / ``bias`` here (:meth:`LinearCall.merge_batch_norm`), never in the model.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _arg(args, kwargs, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _tuple(value, dims: int) -> Tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


class LinearCall:
    """``func(x, weight, bias, *settings)`` as called by the model; ``kind`` is "conv" or
    "linear". ``weight`` / ``bias`` are detached (LRP computes no parameter gradients) and
    are the batch-norm-merged ones once :meth:`merge_batch_norm` ran."""

    def __init__(self, func: Callable, args: tuple, kwargs: dict):
        self.func = func
        self.kind = "conv" if func in _CONVOLUTIONS else "linear"
        self.weight = _arg(args, kwargs, 1, "weight").detach()
        bias = _arg(args, kwargs, 2, "bias")
        self.bias = None if bias is None else bias.detach()
        if self.kind == "conv":
            dims = _CONVOLUTIONS[func]
            self.dims = dims
            self.stride = _tuple(_arg(args, kwargs, 3, "stride", 1), dims)
            self.padding = _arg(args, kwargs, 4, "padding", 0)
            self.dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), dims)
            self.groups = int(_arg(args, kwargs, 6, "groups", 1))
        self.merged = False
        self.nonnegative_input = False  # set by the relevance pass when x is known to be >= 0

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The layer on ``x`` with the given parameters (same stride, padding, ...)."""
        weight = weight.to(x.dtype)  # autocast: the model ran this layer in x's dtype
        bias = None if bias is None else bias.to(x.dtype)
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return self.func(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def transpose(self, grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        """``J^T grad``: the gradient of ``<forward(x, weight, .), grad>`` with respect to ``x``
        (the layer is linear in ``x``, so ``x`` only gives the shape)."""
        weight = weight.to(grad.dtype)
        if self.kind == "linear":
            return grad.matmul(weight)
        padding = self._numeric_padding(weight)
        if padding is None:  # padding="same" with an even kernel: let autograd find the transpose
            with torch.enable_grad():
                probe = x.detach().requires_grad_(True)
                (result,) = torch.autograd.grad(self.forward(probe, weight, None), probe, grad)
            return result
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, self.stride, padding, self.dilation, False, (0,) * self.dims, self.groups,
            (True, False, False))[0]

    def _numeric_padding(self, weight: Tensor) -> Optional[Tuple[int, ...]]:
        if not isinstance(self.padding, str):
            return _tuple(self.padding, self.dims)
        if self.padding == "valid":
            return (0,) * self.dims
        total = [d * (k - 1) for d, k in zip(self.dilation, weight.shape[2:])]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)

    # ------------------------------------------------------------------ canonization
    def merge_batch_norm(self, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], eps: float) -> None:
        """Fold an eval-mode batch norm applied right after this layer into its parameters:
        ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``
        per output channel. Only this record changes; the model's tensors are not touched."""
        scale = (1.0 if weight is None else weight.detach()) / (running_var.detach() + eps) ** 0.5
        shift = 0.0 if bias is None else bias.detach()
        old_bias = 0.0 if self.bias is None else self.bias
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        self.weight = self.weight * scale.reshape(shape)
        self.bias = (old_bias - running_mean.detach()) * scale + shift
        self.merged = True
