"""Deletion and insertion curves (Petsiuk et al. 2018, RISE).

The pixels (or patches) of each image are ranked by its attribution map, most important
first. The deletion curve replaces the top fraction of them by a baseline, step by step,
and records the target's probability; the insertion curve starts from the baseline and
reveals the top fraction. A faithful map gives a low deletion AUC (the probability drops
fast) and a high insertion AUC. Every masked batch is built by one
:func:`cnnviz_fast.ops.progressive_mask` call (no per-step masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn

from .. import ops
from ..core import model_guard
from ..core.model_state import check_model
from ..core.validation import check_choice, check_finite, check_int, check_positive_int
from ._common import checked_copy, check_maps, resolve, rows_target, scores

__all__ = ["Curve", "deletion_curve", "insertion_curve", "perturbation_curve", "step_counts"]


@dataclass
class Curve:
    """One perturbation curve per image.

    ``fractions``: ``Tensor[K+1]``, the fraction of cells (pixels or patches) moved at each
    step, from 0 to 1; ``scores``: ``Tensor[N, K+1]``, the target's score at each step;
    ``auc``: ``Tensor[N]``, the trapezoid area under ``scores`` over ``fractions``;
    ``mode``: ``"deletion"`` or ``"insertion"``."""

    fractions: Tensor
    scores: Tensor
    auc: Tensor
    mode: str


def step_counts(cells: int, steps: int) -> list:
    """The number of cells moved at each of the ``steps + 1`` points: ``floor(k * cells / steps)``
    for ``k = 0..steps`` (0 and ``cells`` included)."""
    check_int(cells, "cells", minimum=0)
    check_positive_int(steps, "steps")
    return [k * cells // steps for k in range(steps + 1)]


def _order(maps: Tensor, inputs: Tensor, patch):
    """-> (order [N, cells], patch pair): cells ranked by the map, most important first
    (ties: the lower index first)."""
    N, _, H, W = inputs.shape
    h, w = maps.shape[1:]
    if (h, w) != (H, W):  # a lower-resolution map: one value per patch
        if patch is not None and tuple(ops._checks.pair(patch, "patch")) != (H // h, W // w):
            raise ValueError(f"patch must be {(H // h, W // w)} for maps of size {(h, w)} on {(H, W)} images, "
                             f"got {patch!r}")
        patch = (H // h, W // w)
    elif patch is not None and ops._checks.pair(patch, "patch") != (1, 1):
        # full-resolution map, coarser cells: the map's mean over each (border-clipped) patch
        ph, pw = ops._checks.pair(patch, "patch")
        rows, cols = ops.progressive_grid(H, W, (ph, pw))
        pad = (0, cols * pw - W, 0, rows * ph - H)
        total = nn.functional.pad(maps, pad).reshape(N, rows, ph, cols, pw).sum((2, 4))
        count = nn.functional.pad(torch.ones_like(maps[:1]), pad).reshape(1, rows, ph, cols, pw).sum((2, 4))
        maps = total / count
    else:
        patch = (1, 1)
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    return order, ops._checks.pair(patch, "patch")


def perturbation_curve(
    model: nn.Module,
    inputs: Tensor,
    target,
    attributions: Tensor,
    mode: str = "deletion",
    steps: int = 100,
    baseline: Union[float, Tensor] = 0.0,
    patch=None,
    batch_size: int = 64,
    probability: bool = True,
) -> Curve:
    """Deletion or insertion curve of each image's attribution map (see
    :func:`deletion_curve` for the arguments); ``mode`` is ``"deletion"`` or ``"insertion"``."""
    check_model(model)
    inputs = checked_copy(inputs, model)
    check_choice(mode, ops.MASK_MODES, "mode")
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    maps = check_maps(attributions, inputs)
    if maps.device != inputs.device:
        raise ValueError(f"attributions must be on the inputs' device {inputs.device}, got {maps.device}")
    base = check_finite(ops._checks.baseline(baseline, inputs), "baseline")
    N, C, H, W = inputs.shape
    per_image_base = base.dim() == 4 and base.shape[0] == N and N > 1
    order, patch = _order(maps, inputs, patch)
    rows, cols = ops.progressive_grid(H, W, patch)
    counts = step_counts(rows * cols, steps)
    K1 = len(counts)
    out = torch.empty(N, K1, dtype=torch.float64, device=inputs.device)
    images_per_batch = max(1, batch_size // K1)
    steps_per_batch = min(K1, batch_size)
    with model_guard(model), torch.no_grad():
        target = resolve(model, inputs, target)
        for n0 in range(0, N, images_per_batch):
            n1 = min(N, n0 + images_per_batch)
            for k0 in range(0, K1, steps_per_batch):
                k1 = min(K1, k0 + steps_per_batch)
                batch = ops.progressive_mask(
                    inputs[n0:n1], order[n0:n1], counts[k0:k1], base[n0:n1] if per_image_base else base, mode, patch
                )
                rows_tgt = rows_target(target, torch.arange(n0, n1, device=inputs.device), k1 - k0)
                s = scores(model, batch.reshape(-1, C, H, W), rows_tgt, probability)
                out[n0:n1, k0:k1] = s.reshape(n1 - n0, k1 - k0).double()
    fractions = torch.tensor(counts, dtype=torch.float64, device=inputs.device) / (rows * cols)
    return Curve(fractions, out, torch.trapezoid(out, fractions, dim=1), mode)


def deletion_curve(
    model: nn.Module,
    inputs: Tensor,
    target,
    attributions: Tensor,
    steps: int = 100,
    baseline: Union[float, Tensor] = 0.0,
    patch=None,
    batch_size: int = 64,
    probability: bool = True,
) -> Curve:
    """Deletion curve: the top-ranked pixels (patches) of each map replaced by ``baseline``.

    Args:
        model: the classifier; run in eval mode, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints or ``"predicted"`` (the clean inputs' top class): the score is
            the class's softmax probability (its logit with ``probability=False``); a
            callable ``output -> Tensor[N]`` or a :class:`~cnnviz_fast.Neuron`: its value as is.
        attributions: the maps, ``[N, H, W]`` or ``[N, 1 or C, H, W]`` (channels summed), or
            one value per patch ``[N, h, w]`` with ``h | H`` and ``w | W``.
        steps: K; the curve has K+1 points, ``floor(k * cells / K)`` cells moved at point k.
        baseline: the value of removed pixels: a number or a tensor broadcastable to
            ``inputs`` (RISE deletes to 0; a blurred copy of ``inputs`` is common too).
        patch: rank ``ph x pw`` patches (the map's mean over each) instead of pixels.
        batch_size: masked images per forward pass (on a CPU, small batches such as 8 often
            run faster per image than large ones).
        probability: see ``target``.

    Returns:
        :class:`Curve` (``fractions [K+1]``, ``scores [N, K+1]`` float64, ``auc [N]``).
        Ties in a map are broken by the lower pixel index.
    """
    return perturbation_curve(model, inputs, target, attributions, "deletion", steps, baseline, patch,
                              batch_size, probability)


def insertion_curve(
    model: nn.Module,
    inputs: Tensor,
    target,
    attributions: Tensor,
    steps: int = 100,
    baseline: Union[float, Tensor] = 0.0,
    patch=None,
    batch_size: int = 64,
    probability: bool = True,
) -> Curve:
    """Insertion curve: start from ``baseline`` and reveal the top-ranked pixels (patches).

    Same arguments as :func:`deletion_curve`. RISE inserts into a blurred copy of the image,
    e.g. ``baseline=torchvision.transforms.functional.gaussian_blur(inputs, 51, 10.0)``.
    """
    return perturbation_curve(model, inputs, target, attributions, "insertion", steps, baseline, patch,
                              batch_size, probability)
