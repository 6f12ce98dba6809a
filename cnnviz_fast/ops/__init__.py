"""Fused operators for CNN visualisation (namespace ``torch.ops.cnnviz``): the public API.

Each public function checks its arguments once (:mod:`cnnviz_fast.ops._checks`) and then
runs the compiled kernels (``cnnviz_fast._C``, CPU and CUDA) when they are loaded, or else
the pure-PyTorch references in :mod:`cnnviz_fast.ops.reference`, which give the same
results. ``has_extension()`` says which path runs; ``CNNVIZ_FORCE_REFERENCE=1`` forces the
reference path.

All ops take batch-first tensors, return tensors on the input's device, and support
float32/float64 (plus float16/bfloat16); outputs are contiguous (``segment_mask``'s follow the
images' layout: channels-last in, channels-last out). The compiled ops' fake
kernels and autograd formulas are registered in :mod:`cnnviz_fast.ops._meta`, so the ops
work under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks, _extension, reference
from ._extension import ExtensionMissingWarning
from .reference import GUIDED_RELU_MODES, MASK_MODES

if _extension.LOADED:
    from . import _meta  # noqa: F401  (fake kernels + autograd of the compiled ops)

__all__ = [
    "ExtensionMissingWarning",
    "GUIDED_RELU_MODES",
    "MASK_MODES",
    "has_extension",
    "occlusion_grid",
    "occlude",
    "occlusion_accumulate",
    "guided_relu",
    "guided_relu_backward",
    "gram",
    "gram_loss",
    "progressive_grid",
    "ranks_from_order",
    "progressive_mask",
    "rise_mask",
    "rise_accumulate",
    "rise_masks",
    "segment_mask",
]

IntPair = Union[int, Sequence[int]]

_USE_EXT = _extension.USE_EXTENSION


def has_extension() -> bool:
    """True when the compiled kernels run (``_C`` loaded and not ``CNNVIZ_FORCE_REFERENCE``)."""
    return _USE_EXT


def _kernel_baseline(base: Tensor, images: Tensor) -> Tensor:
    # the kernels take a 0-dim baseline or one of the images' full shape
    if base.numel() != 1 and tuple(base.shape) != tuple(images.shape):
        return base.expand(images.shape).contiguous()
    if base.numel() == 1 and base.dim() != 0:
        return base.reshape(())
    return base


# --------------------------------------------------------------------------- #
# occlusion
# --------------------------------------------------------------------------- #
def occlusion_grid(H: int, W: int, window: IntPair, stride: IntPair):
    """Number of window positions ``(rows, cols)`` of Captum's occlusion grid.

    ``rows = ceil((H - kh) / sh) + 1``, ``cols = ceil((W - kw) / sw) + 1``; the last
    window of a row/column may stick out of the image and is clipped at the border.
    The window must fit in the image.
    """
    window, stride = _checks.occlusion_geometry(H, W, window, stride)
    return reference.occlusion_grid(H, W, window, stride)


def occlude(
    images: Tensor,
    window: IntPair,
    stride: IntPair,
    baseline: Union[float, Tensor] = 0.0,
    first: int = 0,
    count: int = None,
) -> Tensor:
    """Occluded copies of every image, for window positions ``first .. first+count-1``.

    Args:
        images: ``Tensor[N, C, H, W]``.
        window: ``(kh, kw)`` (or an int); must fit in the image.
        stride: ``(sh, sw)`` (or an int).
        baseline: value written inside the window: a number or a tensor broadcastable
            to ``[N, C, H, W]`` (differentiable).
        first, count: the window positions to build; ``count=None`` means all positions
            from ``first`` on.

    Returns:
        ``Tensor[N, count, C, H, W]``, image-major: ``out[n, k]`` is image ``n`` with
        window ``first + k`` set to ``baseline`` (all channels). Use
        ``out.reshape(N * count, C, H, W)`` as a forward batch.

    The position grid is Captum ``Occlusion``'s: ``rows, cols = occlusion_grid(H, W,
    window, stride)`` (``rows = ceil((H-kh)/sh)+1``), window ``p`` has its top-left
    corner at ``((p // cols) * sh, (p % cols) * sw)`` (row-major; note Captum's own
    feature numbering runs down the rows first) and is clipped at the image border.
    """
    window, stride, base, first, count = _checks.occlude_args(images, window, stride, baseline, first, count)
    if not _USE_EXT:
        return reference.occlude(images, window, stride, base, first, count)
    return torch.ops.cnnviz.occlude(images, list(window), list(stride), _kernel_baseline(base, images), first, count)


def occlusion_accumulate(deltas: Tensor, H: int, W: int, window: IntPair, stride: IntPair) -> Tensor:
    """Per-pixel mean of the deltas of every window covering the pixel.

    Args:
        deltas: ``Tensor[N, P]``, one value per window position, ``P = rows * cols``
            (e.g. ``f(image) - f(occluded image)`` for the target).
        H, W: image size; window, stride: as in :func:`occlude`.

    Returns:
        ``Tensor[N, H, W]``: ``sum_p delta[n, p] * mask_p / sum_p mask_p`` (Captum's
        attribution), 0 where no window covers the pixel. Runs in ``O(P + H*W)`` per
        image (difference array + prefix sums); accumulates in float32 (float64 for
        float64 input). Differentiable w.r.t. ``deltas``.
    """
    H, W, window, stride = _checks.accumulate_args(deltas, H, W, window, stride)
    if not _USE_EXT:
        return reference.occlusion_accumulate(deltas, H, W, window, stride)
    return torch.ops.cnnviz.occlusion_accumulate(deltas, H, W, list(window), list(stride))


# --------------------------------------------------------------------------- #
# guided ReLU
# --------------------------------------------------------------------------- #
def guided_relu(x: Tensor, mode: str = "guided", upper: Optional[float] = None) -> Tensor:
    """ReLU (or bounded ReLU: ReLU6, ``Hardtanh(0, upper)``) whose backward is modified
    for gradient visualisation.

    Args:
        x: any-shape floating tensor.
        mode: ``"guided"`` (guided backprop: gradient passes where the input is in the
            linear range and gradient > 0), ``"deconvnet"`` (where gradient > 0 and the
            input is below ``upper``, whatever its sign), or ``"plain"`` (the activation's
            own gradient).
        upper: None (ReLU) or the upper bound ``> 0`` (6 for ReLU6); ``+inf`` is None.
            It is rounded to ``x``'s dtype first (the saturated output is exactly that).

    Returns:
        ``clamp(x, 0, upper)``. The linear range is ``0 < x < upper``, open at both ends
        (like torch's ``relu`` and ``hardtanh`` gradients): ``x == upper`` counts as
        saturated and passes no gradient in any mode. Only the output is saved for
        backward (``0 < out < upper`` iff ``0 < x < upper``), so it can replace an
        in-place activation. Forward and backward are one fused pass each (backward:
        :func:`guided_relu_backward`).
    """
    _checks.floating(x, "x")
    mode = _checks.mode(mode)
    upper = _checks.upper(upper)
    if not _USE_EXT:
        return reference.guided_relu(x, mode, upper)
    return torch.ops.cnnviz.guided_relu(x, mode, upper)


def guided_relu_backward(grad: Tensor, out: Tensor, mode: str, upper: Optional[float] = None) -> Tensor:
    """The backward of :func:`guided_relu` from its saved output ``out`` (for autograd
    Functions that rectify in place): ``grad`` where the mode lets it through, else 0."""
    mode = _checks.mode(mode)
    upper = _checks.upper(upper)
    if not _USE_EXT:
        return reference.guided_relu_backward(grad, out, mode, upper)
    return torch.ops.cnnviz._guided_relu_backward(grad, out, mode, upper)


# --------------------------------------------------------------------------- #
# Gram matrices / texture loss
# --------------------------------------------------------------------------- #
def gram(features: Tensor) -> Tensor:
    """Gram matrices ``G = F F^T / S``.

    Args:
        features: ``Tensor[N, C, *spatial]``; ``S`` = number of spatial positions
            (``prod(spatial)``, 1 for ``[N, C]``).

    Returns:
        ``Tensor[N, C, C]`` in the features' dtype (float32 accumulation for half/bf16).
        On the CPU each symmetric pair of channels is computed once (recursive
        halving); on CUDA one GEMM, which is faster there.
    """
    _checks.features(features)
    if not _USE_EXT:
        return reference.gram(features)
    return torch.ops.cnnviz.gram(features)


def gram_loss(
    features: Union[Tensor, Sequence[Tensor]],
    target_gram: Union[Tensor, Sequence[Tensor]],
    weight: Union[float, Sequence[float]] = 1.0,
) -> Tensor:
    """Gram (texture / style) loss ``weight * mean((gram(features) - target_gram) ** 2)``.

    Args:
        features: ``Tensor[N, C, *spatial]``, or a list of them (one per layer).
        target_gram: ``Tensor[N, C, C]`` or ``Tensor[C, C]`` (broadcast over the batch),
            same dtype as ``features`` (a list when ``features`` is a list). Not assumed
            symmetric; differentiable too.
        weight: a float (or one per layer).

    Returns:
        A 0-dim tensor in the features' dtype (the sum over layers for lists); the mean
        runs over ``N * C * C``; 0 for an empty batch. The backward is one matrix product,
        ``dF = 4 * weight / (N * C^2 * S) * sym(G - T) @ F`` with ``sym(D) = (D + D^T) / 2``.
    """
    total = None
    for f, t, w in _checks.gram_loss_layers(features, target_gram, weight):
        loss = torch.ops.cnnviz.gram_loss(f, t, w)[0] if _USE_EXT else reference.gram_loss_one(f, t, w)
        total = loss if total is None else total + loss
    return total


# --------------------------------------------------------------------------- #
# progressive (rank-ordered) masking: deletion / insertion curves
# --------------------------------------------------------------------------- #
def progressive_grid(H: int, W: int, patch: IntPair = 1):
    """Cells ``(rows, cols)`` of the ranking grid: ``ph x pw`` patches, ``rows = ceil(H / ph)``
    (the last row / column of patches is clipped at the border)."""
    return reference.progressive_grid(H, W, _checks.progressive_geometry(H, W, patch))


def ranks_from_order(order: Tensor, cells: int) -> Tensor:
    """``order[n]`` (cell indices, most important first) -> ``ranks[n, cell]`` (int64, 0 =
    most important). Raises ValueError unless each row is a permutation of ``0..cells-1``."""
    return _checks.ranks(order, cells)


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
    ranks, counts, base, mode, patch = _checks.progressive_args(images, order, counts, baseline, mode, patch)
    insertion = mode == "insertion"
    if not _USE_EXT:
        return reference.progressive_mask_ranks(images, ranks, counts, base, patch, insertion)
    return torch.ops.cnnviz.progressive_mask(images, ranks, _kernel_baseline(base, images), counts, list(patch), insertion)


# --------------------------------------------------------------------------- #
# RISE: random masks generated from a seed inside the kernels
# --------------------------------------------------------------------------- #
def rise_mask(images: Tensor, seed: int, grid: IntPair = 7, p: float = 0.5, first: int = 0, count: int = 1) -> Tensor:
    """Copies of every image multiplied by RISE masks ``first .. first+count-1``.

    Args:
        images: ``Tensor[N, C, H, W]``.
        seed: any 64-bit int; mask ``m`` depends only on ``(seed, m)``, so chunks of masks
            can be built in any order, on any device, with the same values.
        grid: ``(grid_h, grid_w)`` cells (or an int), at most the image size.
        p: probability in (0, 1) of a cell being on.
        first, count: the masks to build.

    Returns:
        ``Tensor[N, count, C, H, W]``: ``out[n, k] = images[n] * mask(first + k)``. Mask ``m``
        is the paper's: a ``grid_h x grid_w`` binary grid resized bilinearly to ``(grid + 1) *
        cell`` pixels (``cell = ceil(size / grid)``) and cropped at a random shift in ``[0,
        cell)`` (see :func:`rise_masks`). The masks are never stored: each is computed inside
        the kernel from counter-based hashes of ``(seed, m, cell)``. Differentiable w.r.t. ``images``.
    """
    seed, grid, p, first, count = _checks.rise_mask_args(images, seed, grid, p, first, count)
    if not _USE_EXT:
        return reference.rise_mask(images, seed, grid, p, first, count)
    return torch.ops.cnnviz.rise_mask(images, seed, list(grid), p, first, count)


def rise_accumulate(scores: Tensor, H: int, W: int, seed: int, grid: IntPair = 7, p: float = 0.5,
                    first: int = 0) -> Tensor:
    """Score-weighted sum of RISE masks: ``out[n] = sum_k scores[n, k] * mask(first + k)``.

    Args:
        scores: ``Tensor[N, count]``, e.g. the target scores of :func:`rise_mask`'s batch.
        H, W: image size; seed, grid, p: as in :func:`rise_mask`.

    Returns:
        ``Tensor[N, H, W]`` in the scores' dtype (accumulated in float32, float64 for
        float64), masks regenerated from the seed in chunks. Differentiable w.r.t. ``scores``.
    """
    H, W, seed, grid, p, first = _checks.rise_accumulate_args(scores, H, W, seed, grid, p, first)
    if not _USE_EXT:
        return reference.rise_accumulate(scores, H, W, seed, grid, p, first)
    return torch.ops.cnnviz.rise_accumulate(scores, H, W, seed, list(grid), p, first)


def rise_masks(H: int, W: int, seed: int, grid: IntPair = 7, p: float = 0.5, first: int = 0, count: int = 1,
               dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The RISE masks ``first .. first+count-1`` themselves, ``Tensor[count, H, W]`` (for
    display and tests; the methods never materialise them): :func:`rise_mask` of an image of ones."""
    ones = torch.ones(1, 1, H, W, dtype=dtype, device=device)
    return rise_mask(ones, seed, grid, p, first, count)[0, :, 0]


# --------------------------------------------------------------------------- #
# segment masking: feature ablation, Shapley sampling, KernelSHAP, LIME
# --------------------------------------------------------------------------- #
def segment_mask(images: Tensor, segments: Tensor, keep: Tensor, rows: Optional[Tensor] = None,
                 baseline: Union[float, Tensor] = 0.0, check_values: bool = True) -> Tensor:
    """Copies of images with some of their segments kept and the others set to the baseline.

    Args:
        images: ``Tensor[N, C, H, W]``.
        segments: ``LongTensor[N, H, W]``: each pixel's segment id, in ``[0, K)``.
        keep: ``BoolTensor[R, K]``: row r keeps segment k where ``keep[r, k]`` (a coalition
            table; K is the largest segment count, an image with fewer ignores the rest).
        rows: ``LongTensor[R]``: the image of each row (default: row r is image r, R = N).
        baseline: a number or a tensor broadcastable to ``[N, C, H, W]`` (differentiable).
        check_values: False skips the checks that read the data (ids and rows in range: a
            host sync on a GPU), for callers that checked them once; the kernels then show
            the baseline at ids outside ``[0, K)``.

    Returns:
        ``Tensor[R, C, H, W]``: ``out[r] = where(keep[r, segments[rows[r]]], images[rows[r]],
        baseline[rows[r]])``, in the images' layout (channels-last images give a channels-last
        batch, ready for a channels-last forward pass). One pass over the output, no per-pixel
        mask tensor. Differentiable w.r.t. ``images`` and ``baseline`` (the gradient is the
        masked output gradient, summed over the rows of each image).
    """
    segments, keep, rows, base = _checks.segment_mask_args(images, segments, keep, rows, baseline, check_values)
    if not _USE_EXT:
        return reference.segment_mask(images, segments, keep, rows, base)
    return torch.ops.cnnviz.segment_mask(images, segments, keep, rows, _kernel_baseline(base, images))
