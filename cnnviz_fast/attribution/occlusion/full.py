"""Full recomputation: every occluded image runs through the whole model.

One path: occluded images are built by :func:`cnnviz_fast.ops.occlude` (one call per run
of consecutive window positions) and scored by :func:`_score_rows`, whether all positions
are wanted (:func:`full_deltas`) or some (:func:`full_scorer`, for the drill-down).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ...core import target_scores
from ...core.layout import run_in_fast_layout
from ...core.targets import target_for_rows
from ...ops import occlude, occlusion_grid
from .batching import MAX_MEASURED_BUDGET, MEASURED_BATCH_SIZES, choose_batch_size, time_batch_sizes

__all__ = ["Scorer", "baseline_rows", "full_deltas", "full_scorer"]

# score(n, positions) -> deltas of image n at those window positions (Tensor[len(positions)])
Scorer = Callable[[int, Tensor], Tensor]


def full_deltas(model: nn.Module, inputs: Tensor, base: Tensor, scores: Tensor, target, window, stride,
                batch_size: Optional[int], memory_budget: Optional[int], per_image: Optional[int]) -> Tensor:
    """``deltas [N, positions]`` by full recomputation, in passes of ``batch_size`` occluded
    images; without one, the memory budget's size, or (no budget given and more work than
    one pass of it) the fastest of MEASURED_BATCH_SIZES timed on the first passes."""
    N, C, H, W = inputs.shape
    positions = math.prod(occlusion_grid(H, W, window, stride))
    deltas = scores.new_empty((N, positions))

    def run(n0, n1, first, count):
        batch = occlude(inputs[n0:n1], window, stride, baseline_rows(base, n0, n1), first, count)
        images = torch.arange(n0, n1, device=inputs.device).repeat_interleave(count)
        occluded = _score_rows(model, batch.reshape(-1, C, H, W), target, images)
        deltas[n0:n1, first:first + count] = scores[n0:n1, None] - occluded.view(n1 - n0, count)

    if batch_size is None:
        batch_size = choose_batch_size(per_image, inputs.device, memory_budget)
        if memory_budget is None and N * positions > batch_size:
            largest = choose_batch_size(per_image, inputs.device, max(memory_budget or 0, MAX_MEASURED_BUDGET))
            candidates = [b for b in MEASURED_BATCH_SIZES if b <= min(largest, positions)] or [batch_size]
            return _measured_passes(run, N, positions, candidates, inputs.device, deltas)
    for chunk in _passes(N, positions, batch_size):
        run(*chunk)
    return deltas


def full_scorer(model: nn.Module, inputs: Tensor, base: Tensor, scores: Tensor, target, window, stride,
                batch_size: int) -> Scorer:
    """Deltas of image ``n`` at some positions (any order), each occluded image run through
    the model, ``batch_size`` per pass."""
    N, C, H, W = inputs.shape

    def score(n: int, positions: Tensor) -> Tensor:
        image, fill = inputs[n:n + 1], baseline_rows(base, n, n + 1)
        out = []
        for chunk in positions.cpu().split(batch_size):
            batch = torch.cat([occlude(image, window, stride, fill, first, count)[0]
                               for first, count in _runs(chunk.tolist())])
            out.append(_score_rows(model, batch, target, torch.full((len(chunk),), n, device=inputs.device)))
        return scores[n] - torch.cat(out).to(scores.dtype)  # a 0-dim minuend would not promote
    return score


def _score_rows(model: nn.Module, batch: Tensor, target, images: Tensor) -> Tensor:
    """Target scores ``Tensor[B]`` of occluded images ``batch [B, C, H, W]``, row ``b`` a
    copy of image ``images[b]`` (whose target it is scored for)."""
    rows = target_for_rows(target, images)
    return run_in_fast_layout(model, batch, lambda b: target_scores(model, b, rows))


def _runs(positions: List[int]) -> List[Tuple[int, int]]:
    """``positions`` as ``(first, count)`` runs of consecutive positions, in order."""
    runs: List[List[int]] = []
    for p in positions:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [(first, count) for first, count in runs]


def _measured_passes(run, n_images: int, positions: int, candidates: List[int], device, deltas: Tensor) -> Tensor:
    """Run image 0's first passes with each candidate batch size (ascending) while they take
    at most a quarter of all the work and each is faster per image than the one before
    (trials past the best size cost ever more time), then everything left with the size
    that was fastest per image."""
    seconds, first = time_batch_sizes(lambda start, size: run(0, 1, start, size), candidates,
                                      min(positions, n_images * positions // 4), device, stop_when_slower=True)
    best = min(seconds, key=seconds.get) if seconds else candidates[0]
    for start in range(first, positions, best):
        run(0, 1, start, min(best, positions - start))
    for n0, n1, start, count in _passes(n_images - 1, positions, best):
        run(n0 + 1, n1 + 1, start, count)
    return deltas


def _passes(n_images: int, positions: int, batch_size: int) -> List[Tuple[int, int, int, int]]:
    """Forward passes as ``(n0, n1, first, count)``: images ``n0:n1`` occluded at window
    positions ``first:first+count``, with at most ``batch_size`` images per pass. Whole
    images are grouped when all their positions fit; otherwise each image's positions are
    split into equal-sized passes (no small last pass)."""
    if batch_size >= positions:
        group = batch_size // positions
        return [(n0, min(n0 + group, n_images), 0, positions) for n0 in range(0, n_images, group)]
    passes = -(-positions // batch_size)
    size = -(-positions // passes)
    return [(n, n + 1, first, min(size, positions - first))
            for n in range(n_images) for first in range(0, positions, size)]


def baseline_rows(base: Tensor, n0: int, n1: int) -> Tensor:
    """The baseline for images ``n0:n1`` (a per-image baseline is sliced)."""
    if base.shape[0] == 1:
        return base.reshape(()) if base.numel() == 1 else base
    return base[n0:n1]
