"""Fake kernels and autograd formulas of the compiled ``torch.ops.cnnviz`` ops.

Imported by :mod:`cnnviz_fast.ops` once ``cnnviz_fast._C`` has loaded (registering for an op
that does not exist fails). The fake kernels give output shapes and dtypes for
``torch.compile``; the backward formulas reuse the references' geometry helpers.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from .reference import opmath_dtype


def _same_layout(x: Tensor) -> Tensor:
    # mirrors csrc: keep contiguous / channels_last inputs as they are, else make contiguous
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _masked_copy_grads(ctx, grad: Tensor, at_base: Tensor, baseline_index: int):
    """Gradients (images, baseline) of ``out[:, k] = where(at_base[:, k], baseline, images)``:
    ``grad`` is ``[N, K, C, H, W]``, ``at_base`` broadcasts to it."""
    to_base = torch.where(at_base, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).sum(1)
    grad_images = grad_baseline = None
    if ctx.needs_input_grad[0]:
        grad_images = grad.sum(1) - to_base
    if ctx.needs_input_grad[baseline_index]:  # summed back to the (full-size or 0-dim) baseline
        grad_baseline = to_base if len(ctx.baseline_shape) == 4 else to_base.sum().reshape(ctx.baseline_shape)
    return grad_images, grad_baseline


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
    grad_images, grad_baseline = _masked_copy_grads(ctx, grad, masks[None, :, None], 3)
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
    acc = opmath_dtype(grad.dtype)
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
    acc = opmath_dtype(features.dtype)
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
    return features.new_empty(()), features.new_empty((N, C, C), dtype=opmath_dtype(features.dtype))


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


# ---- progressive_mask ----
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
    at_base = reference.progressive_baseline_mask(ranks, counts, H, W, patch, insertion)
    grad_images, grad_baseline = _masked_copy_grads(ctx, grad, at_base[:, :, None], 2)
    return grad_images, None, grad_baseline, None, None, None


torch.library.register_autograd(
    "cnnviz::progressive_mask", _progressive_mask_backward, setup_context=_progressive_mask_setup
)


# ---- rise_mask / rise_accumulate (linear in images / scores; masks re-derived from the seed) ----
@torch.library.register_fake("cnnviz::rise_mask")
def _rise_mask_fake(images, seed, grid, p, first, count):
    N, C, H, W = images.shape
    return images.new_empty((N, count, C, H, W))


def _rise_mask_setup(ctx, inputs, output):
    images, seed, grid, p, first, count = inputs
    ctx.args = (seed, tuple(grid), p, images.shape[2], images.shape[3], first, count)


def _rise_mask_backward(ctx, grad):
    # grad_images[n, c] = sum_k grad[n, k, c] * mask_k: the masks of this chunk (count x H x W,
    # smaller than the output) materialised once
    seed, grid, p, H, W, first, count = ctx.args
    masks = reference.rise_masks(seed, grid, p, H, W, first, count, grad.dtype, grad.device)
    return (grad * masks[None, :, None]).sum(1), None, None, None, None, None


torch.library.register_autograd("cnnviz::rise_mask", _rise_mask_backward, setup_context=_rise_mask_setup)


@torch.library.register_fake("cnnviz::rise_accumulate")
def _rise_accumulate_fake(scores, H, W, seed, grid, p, first):
    return scores.new_empty((scores.shape[0], H, W))


def _rise_accumulate_setup(ctx, inputs, output):
    scores, H, W, seed, grid, p, first = inputs
    ctx.args = (seed, tuple(grid), p, H, W, first, scores.shape[1])


def _rise_accumulate_backward(ctx, grad):
    seed, grid, p, H, W, first, count = ctx.args
    acc = opmath_dtype(grad.dtype)
    masks = reference.rise_masks(seed, grid, p, H, W, first, count, acc, grad.device)
    grad_scores = grad.to(acc).flatten(1) @ masks.flatten(1).T
    return grad_scores.to(grad.dtype), None, None, None, None, None, None


torch.library.register_autograd(
    "cnnviz::rise_accumulate", _rise_accumulate_backward, setup_context=_rise_accumulate_setup
)


# ---- segment_mask ----
@torch.library.register_fake("cnnviz::segment_mask")
def _segment_mask_fake(images, segments, keep, rows, baseline):
    N, C, H, W = images.shape
    return torch.empty((keep.shape[0], C, H, W), dtype=images.dtype, device=images.device,
                       memory_format=reference.output_layout(images))


def _segment_mask_setup(ctx, inputs, output):
    images, segments, keep, rows, baseline = inputs
    ctx.num_images = images.shape[0]
    ctx.baseline_shape = baseline.shape
    ctx.save_for_backward(segments, keep, rows)


def _segment_mask_backward(ctx, grad):
    # out[r] = where(kept[r], images[rows[r]], baseline[rows[r]]): each row's masked gradient
    # summed back onto its image (index_add over rows)
    segments, keep, rows = ctx.saved_tensors
    kept = reference.segment_keep_mask(segments, keep, rows)[:, None]
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    shape = (ctx.num_images,) + tuple(grad.shape[1:])
    grad_images = grad_baseline = None
    if ctx.needs_input_grad[0]:
        grad_images = grad.new_zeros(shape).index_add_(0, rows, torch.where(kept, grad, zero))
    if ctx.needs_input_grad[4]:
        to_base = torch.where(kept, zero, grad)
        if len(ctx.baseline_shape) == 4:
            grad_baseline = grad.new_zeros(shape).index_add_(0, rows, to_base)
        else:
            grad_baseline = to_base.sum().reshape(ctx.baseline_shape)
    return grad_images, None, None, None, grad_baseline


torch.library.register_autograd("cnnviz::segment_mask", _segment_mask_backward, setup_context=_segment_mask_setup)
