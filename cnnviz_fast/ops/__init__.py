"""Fused operators for CNN visualisation (namespace ``torch.ops.cnnviz``).

Each public function dispatches to the compiled kernels (``cnnviz_fast._C``, CPU and
CUDA) when they are loaded and otherwise to the pure-PyTorch references in
:mod:`cnnviz_fast.ops.reference`, which give the same results. ``has_extension()``
says which path runs; ``CNNVIZ_FORCE_REFERENCE=1`` forces the reference path.

All ops take batch-first tensors, return tensors on the input's device, and support
float32/float64 (plus float16/bfloat16); outputs are contiguous. Fake kernels and
autograd formulas are registered below, so the ops work under
``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _extension
from . import reference
from ._extension import ExtensionMissingWarning
from .reference import GUIDED_RELU_MODES, _pair, occlusion_grid

__all__ = [
    "ExtensionMissingWarning",
    "GUIDED_RELU_MODES",
    "has_extension",
    "occlusion_grid",
    "occlude",
    "occlusion_accumulate",
    "guided_relu",
    "gram",
    "gram_loss",
]

IntPair = Union[int, Sequence[int]]

_USE_EXT = _extension.USE_EXTENSION


def has_extension() -> bool:
    """True when the compiled kernels run (``_C`` loaded and not ``CNNVIZ_FORCE_REFERENCE``)."""
    return _USE_EXT


# --------------------------------------------------------------------------- #
# occlusion
# --------------------------------------------------------------------------- #
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
    count = reference._check_occlude_args(images, window, stride, first, count)
    if not _USE_EXT:
        return reference.occlude(images, window, stride, baseline, first, count)
    base = reference._baseline_tensor(baseline, images)
    if base.numel() != 1 and tuple(base.shape) != tuple(images.shape):
        base = base.expand(images.shape).contiguous()
    elif base.numel() == 1 and base.dim() != 0:
        base = base.reshape(())
    return torch.ops.cnnviz.occlude(images, _pair(window, "window"), _pair(stride, "stride"), base, first, count)


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
    reference._check_accumulate_args(deltas, H, W, window, stride)
    H, W = int(H), int(W)
    if not _USE_EXT:
        return reference.occlusion_accumulate(deltas, H, W, window, stride)
    return torch.ops.cnnviz.occlusion_accumulate(deltas, H, W, _pair(window, "window"), _pair(stride, "stride"))


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
        ``torch.ops.cnnviz._guided_relu_backward(grad, out, mode, upper)``).
    """
    reference._check_floating(x, "x")
    reference._check_mode(mode)
    upper = reference._check_upper(upper)
    if not _USE_EXT:
        return reference.guided_relu(x, mode, upper)
    return torch.ops.cnnviz.guided_relu(x, mode, upper)


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
        Each symmetric pair of channels is computed once.
    """
    N, C, S = reference._check_features(features)
    if not _USE_EXT:
        return reference.gram(features)
    return torch.ops.cnnviz.gram(features)


def _gram_loss_one(features: Tensor, target_gram: Tensor, weight: float) -> Tensor:
    reference._check_features(features)
    reference._check_target(features, target_gram)
    if target_gram.dtype != features.dtype:
        raise ValueError(f"target_gram must have the features' dtype {features.dtype}, got {target_gram.dtype}")
    if not _USE_EXT:
        return reference._gram_loss_one(features, target_gram, weight)
    return torch.ops.cnnviz.gram_loss(features, target_gram, weight)[0]


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
    if isinstance(features, (list, tuple)):
        return reference._sum_layers(_gram_loss_one, features, target_gram, weight)
    return _gram_loss_one(features, target_gram, reference.gram_weight(weight))


# --------------------------------------------------------------------------- #
# fake kernels + autograd for the compiled ops
# --------------------------------------------------------------------------- #
def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_layout(x: Tensor) -> Tensor:
    # mirrors csrc: keep contiguous / channels_last inputs as they are, else make contiguous
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


if _extension.LOADED:

    # ---- occlude ----
    @torch.library.register_fake("cnnviz::occlude")
    def _occlude_fake(images, window, stride, baseline, first, count):
        N, C, H, W = images.shape
        return images.new_empty((N, count, C, H, W))

    def _occlude_setup(ctx, inputs, output):
        images, window, stride, baseline, first, count = inputs
        ctx.geom = (images.shape[2], images.shape[3], tuple(window), tuple(stride), first, count)
        ctx.baseline_shape = baseline.shape

    def _occlude_backward(ctx, grad):
        H, W, window, stride, first, count = ctx.geom
        masks = reference.occlusion_masks(H, W, window, stride, first, count, grad.device)
        inside = torch.where(masks[None, :, None], grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        inside = inside.sum(1)  # [N, C, H, W]
        grad_images = grad_baseline = None
        if ctx.needs_input_grad[0]:
            grad_images = grad.sum(1) - inside
        if ctx.needs_input_grad[3]:
            if len(ctx.baseline_shape) == 4:
                grad_baseline = inside
            else:
                grad_baseline = inside.sum().reshape(ctx.baseline_shape)
        return grad_images, None, None, grad_baseline, None, None

    torch.library.register_autograd("cnnviz::occlude", _occlude_backward, setup_context=_occlude_setup)

    # ---- occlusion_accumulate ----
    @torch.library.register_fake("cnnviz::occlusion_accumulate")
    def _occlusion_accumulate_fake(deltas, H, W, window, stride):
        return deltas.new_empty((deltas.shape[0], H, W))

    def _occlusion_accumulate_setup(ctx, inputs, output):
        deltas, H, W, window, stride = inputs
        ctx.geom = (H, W, tuple(window), tuple(stride))
        ctx.dtype = deltas.dtype

    def _occlusion_accumulate_backward(ctx, grad):
        # adjoint of the (linear) forward: grad_delta[n, p] = sum over window p of grad / cover
        H, W, window, stride = ctx.geom
        acc = _opmath(grad.dtype)
        cnt = reference.occlusion_cover_counts(H, W, window, stride, grad.device).to(acc)
        q = torch.where(cnt > 0, grad.to(acc) / cnt.clamp_min(1), torch.zeros((), dtype=acc, device=grad.device))
        integral = torch.nn.functional.pad(q.cumsum(1).cumsum(2), (1, 0, 1, 0))  # [N, H+1, W+1]
        r0, r1, c0, c1 = reference.occlusion_window_bounds(H, W, window, stride, device=grad.device)
        g = integral[:, r1, c1] - integral[:, r0, c1] - integral[:, r1, c0] + integral[:, r0, c0]
        return g.to(ctx.dtype), None, None, None, None

    torch.library.register_autograd(
        "cnnviz::occlusion_accumulate", _occlusion_accumulate_backward, setup_context=_occlusion_accumulate_setup
    )

    # ---- guided_relu ----
    @torch.library.register_fake("cnnviz::guided_relu")
    def _guided_relu_fake(x, mode, upper=None):
        return torch.empty_like(_same_layout(x))

    @torch.library.register_fake("cnnviz::_guided_relu_backward")
    def _guided_relu_backward_fake(grad, out, mode, upper=None):
        return torch.empty_like(_same_layout(out))

    def _guided_relu_setup(ctx, inputs, output):
        ctx.mode = inputs[1]
        ctx.upper = inputs[2] if len(inputs) > 2 else None
        ctx.save_for_backward(output)

    def _guided_relu_bwd(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.cnnviz._guided_relu_backward(grad, out, ctx.mode, ctx.upper), None, None

    torch.library.register_autograd("cnnviz::guided_relu", _guided_relu_bwd, setup_context=_guided_relu_setup)

    # ---- gram ----
    @torch.library.register_fake("cnnviz::gram")
    def _gram_fake(features):
        N, C = features.shape[0], features.shape[1]
        return features.new_empty((N, C, C))

    def _gram_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _gram_bwd(ctx, grad):
        (features,) = ctx.saved_tensors
        N, C = features.shape[0], features.shape[1]
        acc = _opmath(features.dtype)
        S = math.prod(features.shape[2:])
        f = features.reshape(N, C, S).to(acc)
        g = grad.to(acc)
        df = torch.bmm(g + g.transpose(1, 2), f) / S
        return df.reshape(features.shape).to(features.dtype)

    torch.library.register_autograd("cnnviz::gram", _gram_bwd, setup_context=_gram_setup)

    # ---- gram_loss ----
    @torch.library.register_fake("cnnviz::gram_loss")
    def _gram_loss_fake(features, target_gram, weight):
        N, C = features.shape[0], features.shape[1]
        return features.new_empty(()), features.new_empty((N, C, C), dtype=_opmath(features.dtype))

    @torch.library.register_fake("cnnviz::_gram_loss_backward")
    def _gram_loss_backward_fake(grad_loss, features, diff, weight):
        return features.new_empty(features.shape)

    def _gram_loss_setup(ctx, inputs, output):
        features, target_gram, weight = inputs
        ctx.weight = weight
        ctx.target_2d = target_gram.dim() == 2
        ctx.target_dtype = target_gram.dtype
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(features, output[1])

    def _gram_loss_bwd(ctx, grad_loss, _grad_diff):
        features, diff = ctx.saved_tensors
        grad_features = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.ops.cnnviz._gram_loss_backward(grad_loss, features, diff, ctx.weight)
        if ctx.needs_input_grad[1]:
            N, C = diff.shape[0], diff.shape[1]
            scale = -2.0 * ctx.weight / max(N * C * C, 1)
            grad_target = diff * (grad_loss.to(diff.dtype) * scale)
            if ctx.target_2d:
                grad_target = grad_target.sum(0)
            grad_target = grad_target.to(ctx.target_dtype)
        return grad_features, grad_target, None

    torch.library.register_autograd("cnnviz::gram_loss", _gram_loss_bwd, setup_context=_gram_loss_setup)


# --------------------------------------------------------------------------- #
# progressive masking (deletion / insertion curves): wrapper, fake and autograd in progressive.py
# --------------------------------------------------------------------------- #
from .progressive import MASK_MODES, progressive_grid, progressive_mask, ranks_from_order  # noqa: E402

__all__ += ["MASK_MODES", "progressive_grid", "progressive_mask", "ranks_from_order"]
