"""``progressive_mask``: the masked batches of deletion / insertion curves in one pass.

Kept in its own module (re-exported by :mod:`cnnviz_fast.ops`): the wrapper, its fake
kernel and its autograd formula.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from . import _extension, reference
from .reference import MASK_MODES, progressive_grid, ranks_from_order

__all__ = ["MASK_MODES", "progressive_grid", "progressive_mask", "ranks_from_order"]

IntPair = Union[int, Sequence[int]]


def progressive_mask(
    images: Tensor,
    order: Tensor,
    counts: Union[Sequence[int], Tensor],
    baseline: Union[float, Tensor] = 0.0,
    mode: str = "deletion",
    patch: IntPair = 1,
) -> Tensor:
    """Copies of every image with its top-ranked pixels (or patches) replaced / revealed.

    Args:
        images: ``Tensor[N, C, H, W]``.
        order: ``Tensor[N, rows*cols]`` (integer): each image's cell indices, most important
            first (e.g. ``map.flatten(1).argsort(1, descending=True)``); a permutation per
            row. A cell is one pixel (``patch=1``; cell ``y * W + x``) or one ``ph x pw``
            patch of the grid ``rows, cols = progressive_grid(H, W, patch)`` (cell
            ``i * cols + j`` covers rows ``i*ph .. i*ph+ph-1``, clipped at the border).
        counts: K ints in ``[0, rows*cols]``: how many top cells step k moves.
        baseline: a number or a tensor broadcastable to ``[N, C, H, W]`` (differentiable).
        mode: ``"deletion"``: step k sets its ``counts[k]`` top cells to the baseline;
            ``"insertion"``: step k shows only its top cells, everything else is baseline.
        patch: ``(ph, pw)`` (or an int).

    Returns:
        ``Tensor[N, K, C, H, W]``, image-major (``out.reshape(N * K, C, H, W)`` is a forward
        batch). Built in one pass: each pixel's rank is compared with the step's count, so
        no K full-size masks are materialised. Differentiable w.r.t. ``images`` and
        ``baseline`` (the gradient is the masked copy of the output gradient).
    """
    ranks, counts, patch, insertion = reference._check_progressive_args(images, order, counts, mode, patch)
    if not _extension.USE_EXTENSION:
        return reference.progressive_mask(images, order, counts, baseline, mode, patch)
    base = reference._baseline_tensor(baseline, images)
    if base.numel() != 1 and tuple(base.shape) != tuple(images.shape):
        base = base.expand(images.shape).contiguous()
    elif base.numel() == 1 and base.dim() != 0:
        base = base.reshape(())
    return torch.ops.cnnviz.progressive_mask(images, ranks, base, counts, list(patch), insertion)


if _extension.LOADED and hasattr(torch.ops.cnnviz, "progressive_mask"):

    @torch.library.register_fake("cnnviz::progressive_mask")
    def _progressive_mask_fake(images, ranks, baseline, counts, patch, insertion):
        N, C, H, W = images.shape
        return images.new_empty((N, len(counts), C, H, W))

    def _progressive_mask_setup(ctx, inputs, output):
        images, ranks, baseline, counts, patch, insertion = inputs
        ctx.geom = (images.shape[2], images.shape[3], tuple(counts), tuple(patch), insertion)
        ctx.baseline_shape = baseline.shape
        ctx.save_for_backward(ranks)

    def _progressive_mask_backward(ctx, grad):
        (ranks,) = ctx.saved_tensors
        H, W, counts, patch, insertion = ctx.geom
        at_base = reference.progressive_baseline_mask(ranks, counts, H, W, patch, insertion)[:, :, None]
        to_base = torch.where(at_base, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).sum(1)
        grad_images = grad_baseline = None
        if ctx.needs_input_grad[0]:
            grad_images = grad.sum(1) - to_base
        if ctx.needs_input_grad[2]:
            grad_baseline = to_base if len(ctx.baseline_shape) == 4 else to_base.sum().reshape(ctx.baseline_shape)
        return grad_images, None, grad_baseline, None, None, None

    torch.library.register_autograd(
        "cnnviz::progressive_mask", _progressive_mask_backward, setup_context=_progressive_mask_setup
    )
