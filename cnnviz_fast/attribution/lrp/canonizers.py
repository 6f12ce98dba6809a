"""Canonization, done at the level of the calls the forward pass makes, never on the model.

- **Batch norm** right after a convolution / linear layer (its input is that layer's output,
  unmodified): merged into the layer's rule (``LinearCall.merge_batch_norm``); the batch
  norm itself then passes relevance unchanged. A batch norm anywhere else (on the inputs,
  after a ReLU), in training mode, or another normalisation (layer / group / instance
  norm) cannot be merged: refused with the reason.
- **Sums of two activations** (residual additions ``out += identity``, ``a + b``,
  ``torch.add``): relevance split in proportion to each summand,
  ``R_a = a ⊙ R / stab(a + b)`` (Zennit's ``ResNetCanonizer`` turns these into a ``Sum``
  module with the ``Norm`` rule; here every such call is one).
- **Average pools** (``avg_pool*``, ``adaptive_avg_pool*``): the same proportional split
  over each window (Zennit's ``Norm`` rule for ``AvgPool``).

The model's parameters, buffers, modules and forward methods are never modified, so there
is nothing to undo after the call, whether it returns or raises.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .rules import stabilize


class NormSum(torch.autograd.Function):
    """``a + b`` whose backward splits relevance in proportion to ``a`` and ``b``."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, stabilizer: float):
        out = a + b
        ctx.save_for_backward(a, b, stabilize(out, stabilizer))
        return out

    @staticmethod
    def backward(ctx, relevance: Tensor):
        a, b, denominator = ctx.saved_tensors
        s = relevance / denominator
        return a * s, b * s, None


class NormSumInPlace(torch.autograd.Function):
    """``a += b`` (``a.add_(b)``) with the backward of :class:`NormSum`; ``a`` stays the
    tensor the caller holds."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, stabilizer: float):
        before = a.clone()
        a.add_(b)
        ctx.mark_dirty(a)
        ctx.save_for_backward(before, b, stabilize(a, stabilizer))
        return a

    @staticmethod
    def backward(ctx, relevance: Tensor):
        a, b, denominator = ctx.saved_tensors
        s = relevance / denominator
        return a * s, b * s, None


class NormPool(torch.autograd.Function):
    """A linear pooling ``pool(x)`` whose backward is ``x ⊙ poolᵀ(R / stab(pool(x)))``."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: Callable[[Tensor], Tensor], stabilizer: float):
        out = pool(x)
        ctx.pool = pool
        ctx.save_for_backward(x, stabilize(out, stabilizer))
        return out

    @staticmethod
    def backward(ctx, relevance: Tensor):
        x, denominator = ctx.saved_tensors
        with torch.enable_grad():  # the pool's transpose, by autograd (a pool costs little)
            probe = x.detach().requires_grad_(True)
            (transposed,) = torch.autograd.grad(ctx.pool(probe), probe, relevance / denominator)
        return x * transposed, None, None


class PassThrough(torch.autograd.Function):
    """``compute(x)`` whose backward passes relevance unchanged (rectifiers, merged batch
    norms: Zennit's ``Pass`` rule). ``compute`` may work in place (``x.relu_()``): ``x`` is
    then marked as modified and stays the tensor the caller holds."""

    @staticmethod
    def forward(ctx, x: Tensor, compute: Callable[[Tensor], Tensor]):
        out = compute(x)
        if out is x:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, relevance: Tensor):
        return relevance, None


def batch_norm_name(model, running_mean) -> str:
    """The dotted name of the batch-norm module that holds ``running_mean`` (for messages)."""
    for name, module in model.named_modules():
        if getattr(module, "running_mean", None) is running_mean and running_mean is not None:
            return repr(name)
    return "(functional)"
