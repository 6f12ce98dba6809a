"""Shared mechanics of the perturbation methods: one clean forward pass (scores, output,
an optional layer's activation, and the memory one more image adds to a pass), and the
target scores of many perturbed copies of one image, built and run a bounded batch at a time.

Public methods wrap their body in ``model_guard`` and ``torch.no_grad()``; the helpers
here assume both are active.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import capture_layers, target_scores
from ...core.layout import run_in_fast_layout
from ...core.targets import Neuron, Target, is_predicted, resolve_target, target_for_rows
from ...core.validation import check_positive_int
from .._backprop import prepare_inputs
from ..occlusion import batching as occlusion_batching
from ..occlusion.batching import MAX_MEASURED_BUDGET, choose_batch_size, time_batch_sizes
from ..occlusion.folding import checked_folded_model

__all__ = [
    "Batching", "CleanPass", "UNBOUNDED", "clean_pass", "batch_rows", "layer_clean_pass", "perturbed_scores",
    "scoring_model", "weighted_cam",
]


class CleanPass:
    """Results of :func:`clean_pass`: ``scores Tensor[N]``, ``output`` (or None),
    ``activation Tensor[N, K, h, w]`` of the layer (or None) and ``bytes_per_image``, the
    estimated memory one more image adds to a forward pass."""

    def __init__(self, scores: Tensor, output, activation: Optional[Tensor], bytes_per_image: int):
        self.scores, self.output, self.activation, self.bytes_per_image = scores, output, activation, bytes_per_image


def clean_pass(model: nn.Module, x: Tensor, target: Target, keep_output: bool, layer: Optional[str] = None,
               method: str = "") -> CleanPass:
    """One forward pass of the clean inputs ``x`` (a copy the model may write into), with
    ``layer``'s output (its first call) captured when given."""
    if layer is None:
        scores, output, per_image = occlusion_batching.clean_pass(model, x, target, keep_output, measure=True)
        return CleanPass(scores, output, None, per_image)
    with capture_layers(model, [layer]) as captured:
        scores, output, per_image = occlusion_batching.clean_pass(model, x, target, keep_output, measure=True)
    activation = captured.get(layer)
    if activation is None:
        if isinstance(target, Neuron):
            raise ValueError(f"layer {layer!r} did not run before the forward pass stopped at the target "
                             f"Neuron's layer {target.layer!r}: the Neuron must lie after layer")
        raise ValueError(f"layer {layer!r} was not executed during the forward pass of {type(model).__name__}")
    if activation.dim() != 4:
        raise ValueError(f"layer {layer!r} must output a feature map Tensor[N, K, h, w] for {method}, "
                         f"got shape {tuple(activation.shape)}")
    # the model may later write into its own buffers (in-place ops): keep a private copy
    return CleanPass(scores, output, activation.detach().clone(), per_image)


def layer_clean_pass(model: nn.Module, inputs: Tensor, target: Target, layer: str, return_output: bool,
                     method: str) -> Tuple[Tensor, CleanPass, Target]:
    """The channel-masking CAMs' start: ``(x, clean, target)``: a checked copy ``x`` of the
    inputs, its clean pass with ``layer``'s activation, and the target resolved on it."""
    x = prepare_inputs(inputs, target, copy=True, model=model)
    clean = clean_pass(model, x.clone(), target, return_output or is_predicted(target), layer, method)
    return x, clean, resolve_target(target, clean.output)


def weighted_cam(weights: Tensor, activation: Tensor, size: Tuple[int, int]) -> Tensor:
    """``relu(sum_k weights[n, k] A[n, k])`` upsampled bilinearly to ``size``: ``Tensor[N, H, W]``."""
    cam = F.relu((weights[:, :, None, None].to(activation.dtype) * activation).sum(1, keepdim=True))
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]


def scoring_model(model: nn.Module, x: Tensor, target: Target, scores: Tensor) -> nn.Module:
    """The model the perturbed passes run: ``model`` with batch norm folded into its
    convolutions when that reproduces the clean ``scores`` of ``x`` for the resolved
    ``target`` (:func:`~cnnviz_fast.attribution.occlusion.folding.checked_folded_model`)."""
    return checked_folded_model(model, x, target, scores)


# batch_rows' ``total`` when the number of rows is not known in advance
UNBOUNDED = 2**62

# Without batch_size or memory_budget, passes of these sizes (within MAX_MEASURED_BUDGET
# bytes) are timed on the first image's first passes and the fastest per row is kept
# (occlusion's rule: on the 2-core EPYC the best CPU batch depends on the model and image size).
MEASURED_BATCH_SIZES = (8, 16, 32, 64)


class Batching:
    """Rows per forward pass: fixed (``rows``), or None until measured on the first passes
    among ``candidates``."""

    def __init__(self, rows: Optional[int], candidates: Tuple[int, ...] = ()):
        self.rows, self.candidates = rows, candidates


def batch_rows(batch_size: Optional[int], memory_budget: Optional[int], bytes_per_row: int, device,
               total: int) -> Batching:
    """``batch_size`` when given; else as many rows as fit in ``memory_budget`` at
    ``bytes_per_row`` each; with neither, the fastest of MEASURED_BATCH_SIZES that fit in
    1 GiB (CPU) or half the free memory (CUDA: the largest that fits). At least 1, at most ``total``."""
    if batch_size is not None:
        return Batching(max(1, min(check_positive_int(batch_size, "batch_size"), total)))
    if memory_budget is not None:
        check_positive_int(memory_budget, "memory_budget")
        return Batching(max(1, min(choose_batch_size(bytes_per_row, device, memory_budget), total)))
    if torch.device(device).type != "cpu":
        return Batching(max(1, min(choose_batch_size(bytes_per_row, device), total)))
    largest = choose_batch_size(bytes_per_row, device, MAX_MEASURED_BUDGET)
    candidates = tuple(b for b in MEASURED_BATCH_SIZES if b <= min(largest, total))
    return Batching(None, candidates) if len(candidates) > 1 else Batching(max(1, min(largest, total)))


def perturbed_scores(model: nn.Module, target: Target, image: int, total: int, batching: Batching,
                     make_batch: Callable[[int, int], Tensor], fast_layout: bool = True) -> Tensor:
    """Target scores ``Tensor[total]`` of ``total`` perturbed copies of image ``image``:
    ``make_batch(first, count)`` builds copies ``first .. first+count-1`` (``Tensor[count, ...]``),
    ``model`` maps a batch to the output ``target`` reads (images in the faster memory
    layout with ``fast_layout``); ``batching.rows`` copies per pass (measured on the first
    passes when None), so one batch lives at a time."""
    out: List[Tensor] = []

    def run(first: int, count: int) -> None:
        batch = make_batch(first, count)
        rows_target = target_for_rows(target, torch.full((count,), image, device=batch.device))
        if fast_layout:
            out.append(run_in_fast_layout(model, batch, lambda b: target_scores(model, b, rows_target)))
        else:
            out.append(target_scores(model, batch, rows_target))

    first = 0
    if batching.rows is None:
        seconds, first = time_batch_sizes(run, batching.candidates, total // 2, torch.device("cpu"),
                                          stop_when_slower=True)
        batching.rows = min(seconds, key=seconds.get) if seconds else batching.candidates[0]
    for start in range(first, total, batching.rows):
        run(start, min(batching.rows, total - start))
    return torch.cat(out)
