"""IROF: Iterative Removal Of Features (Rieger & Hansen 2020).

Each image is cut into superpixels (SLIC), ranked by the map's mean over each, most relevant
first, and removed one after the other: step k replaces the k-th superpixel by the mean of
the image as it is after step k - 1. The target's probability after each step, divided by
the clean one, is the curve; IROF is the area over it, ``K - trapezoid(curve)`` in units of
segments (higher: the prediction falls faster, the map is more faithful).

Equal to Quantus' ``IROF`` (its defaults: SLIC on the inputs, ``perturb_baseline="mean"``,
softmax) evaluated one image per batch: Quantus takes the mean of the whole batch at each
step, here each image's own. The value each segment takes is known up front from the running
means (a scalar recursion), so the clean images and every removal step are rows of one
coalition table, built pass by pass by ``ops.segment_mask`` (channels-last where the pass
runs so) and scored in shared passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..attribution.perturbation.segments import resolve_segments, slic_segments
from ..core import model_guard
from ..core.layout import fast_layout, run_in_fast_layout
from ..core.model_state import check_model
from ..core.validation import check_positive_int
from ._common import check_maps, checked_copy, resolve, rows_target, scores

__all__ = ["Irof", "irof"]


@dataclass
class Irof:
    """IROF results. ``curves``: ``Tensor[N, K]`` float64, the score after removing 1 .. K
    segments divided by the clean score (NaN past an image's own K_n); ``segments``:
    ``Tensor[N]`` (K_n); ``aoc``: ``Tensor[N]``, ``K_n - trapezoid(curve)``."""

    curves: Tensor
    segments: Tensor
    aoc: Tensor


def irof(
    model: nn.Module,
    inputs: Tensor,
    target,
    attributions: Tensor,
    segments: Optional[Union[Tensor, str]] = None,
    baseline: Union[str, float] = "mean",
    batch_size: int = 32,
    probability: bool = True,
) -> Irof:
    """Iterative removal of features of each image's attribution map.

    Args:
        model: the classifier; eval mode during the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints or ``"predicted"``: the class's softmax probability (its logit
            with ``probability=False``); a callable or Neuron: its value as is.
        attributions: ``[N, H, W]`` or ``[N, 1 or C, H, W]`` (channels summed) at the inputs' size.
        segments: the features: default SLIC superpixels of the inputs as Quantus computes them
            (scikit-image ``slic(x, start_label=0)`` on each input, channels last, float64); or
            a label map ``LongTensor[N, H, W]`` / ``[H, W]``, or ``"slic:K"`` / ``"grid:K"``.
        baseline: ``"mean"`` (the current image's mean at each step, Quantus' default) or a number.
        batch_size: perturbed images per forward pass.

    Returns:
        :class:`Irof` (``curves [N, K]``, ``segments [N]``, ``aoc [N]``).
    """
    check_model(model)
    inputs = checked_copy(inputs, model)
    maps = check_maps(attributions, inputs, same_size=True)
    check_positive_int(batch_size, "batch_size")
    if not (baseline == "mean" or (isinstance(baseline, (int, float)) and not isinstance(baseline, bool))):
        raise ValueError(f"baseline must be 'mean' or a number, got {baseline!r}")
    N, C, H, W = inputs.shape
    labels = slic_segments(inputs) if segments is None else resolve_segments(segments, inputs)
    K = [int(s.max()) + 1 for s in labels]
    if min(K) < 2:
        raise ValueError("segments: IROF needs at least 2 segments per image, got "
                         f"{min(K)} (a uniform image, or too coarse a segmentation)")
    device = inputs.device
    fills, keeps = [], []  # per image: the value each pixel gets when removed; rows keep tables
    for n in range(N):
        seg, k = labels[n], K[n]
        flat = seg.flatten()
        count = torch.bincount(flat, minlength=k).double()
        relevance = torch.zeros(k, dtype=torch.float64, device=device)
        relevance.index_add_(0, flat, maps[n].flatten().double())
        order = torch.argsort(-(relevance / count), stable=True)  # most relevant first
        rank = torch.empty_like(order)
        rank[order] = torch.arange(k, device=device)
        fills.append(_fills(inputs[n], flat, order, count, baseline).to(inputs.dtype)[seg])
        # row 0: the clean image; row j: the j most relevant segments removed, j = 1 .. k
        steps = torch.arange(k + 1, device=device)
        keeps.append(rank[None, :] >= steps[:, None])
    base = torch.stack(fills)[:, None].expand(N, C, H, W)
    keep = torch.zeros(sum(k + 1 for k in K), max(K), dtype=torch.bool, device=device)  # False past K_n
    start = 0
    for table in keeps:
        keep[start:start + table.shape[0], :table.shape[1]] = table
        start += table.shape[0]
    image_of_row = torch.cat([torch.full((k + 1,), n, dtype=torch.long, device=device) for n, k in enumerate(K)])
    out = torch.empty(keep.shape[0], dtype=torch.float64, device=device)
    with model_guard(model), torch.no_grad():
        target = resolve(model, inputs, target)
        masking = {}  # memory format -> (images, baseline) in it
        for r0 in range(0, keep.shape[0], batch_size):
            r1 = min(keep.shape[0], r0 + batch_size)
            # every row (clean or not) is built by one segment_mask call, in the layout its pass runs in
            layout = fast_layout(model, (r1 - r0, C, H, W), device)
            if layout not in masking:
                masking[layout] = (inputs.contiguous(memory_format=layout), base.contiguous(memory_format=layout))
            images, fill = masking[layout]
            batch = ops.segment_mask(images, labels, keep[r0:r1], image_of_row[r0:r1], fill, check_values=False)
            tgt = rows_target(target, image_of_row[r0:r1], 1)
            out[r0:r1] = run_in_fast_layout(model, batch, lambda b: scores(model, b, tgt, probability)).double()
    curves = torch.full((N, max(K)), float("nan"), dtype=torch.float64, device=device)
    start = 0
    for n, k in enumerate(K):
        curves[n, :k] = out[start + 1:start + k + 1] / out[start]
        start += k + 1
    aoc = torch.stack([k - torch.trapezoid(curves[n, :k]) for n, k in enumerate(K)])
    return Irof(curves, torch.tensor(K, device=device), aoc)


def _fills(image: Tensor, flat: Tensor, order: Tensor, count: Tensor, baseline) -> Tensor:
    """The value each segment is given when removed: a number, or the mean of the image as it
    is just before (the running sum updated by each replaced segment, in float64)."""
    k = count.numel()
    if baseline != "mean":
        return torch.full((k,), float(baseline), dtype=torch.float64, device=image.device)
    C = image.shape[0]
    sums = torch.zeros(k, dtype=torch.float64, device=image.device)
    sums.index_add_(0, flat, image.double().sum(0).flatten())
    total = float(image.double().sum())
    size = image.numel()
    counts, sums = count.tolist(), sums.tolist()
    fill = [0.0] * k
    for s in order.tolist():  # K scalar steps on the host
        mean = total / size
        fill[s] = mean
        total += mean * C * counts[s] - sums[s]
    return torch.tensor(fill, dtype=torch.float64, device=image.device)
