"""Argument checks and target handling shared by the metrics."""
from __future__ import annotations


import torch
from torch import Tensor, nn

from ..core.validation import check_images
from ..core.targets import (
    Neuron, check_target, is_predicted, resolve_target, select_scores, target_for_rows, target_scores,
)


def check_maps(attributions, inputs: Tensor, argument: str = "attributions", same_size: bool = False) -> Tensor:
    """``attributions`` as a finite floating ``Tensor[N, h, w]`` (channels summed) for ``inputs``
    ``[N, C, H, W]``; maps may be ``[N, H, W]``, ``[N, 1 or C, H, W]``, or (unless ``same_size``)
    at a lower resolution ``h x w`` that divides ``H x W`` (one value per patch)."""
    if not isinstance(attributions, Tensor):
        raise ValueError(f"{argument} must be a Tensor, got {type(attributions).__name__}")
    if not attributions.is_floating_point():
        raise ValueError(f"{argument} must be a floating-point tensor, got {attributions.dtype}")
    N, C, H, W = inputs.shape
    maps = attributions
    if maps.dim() == 4 and maps.shape[1] in (1, C):
        maps = maps.sum(1)
    ok = maps.dim() == 3 and maps.shape[0] == N
    if ok and same_size:
        ok = tuple(maps.shape[1:]) == (H, W)
    elif ok:
        h, w = maps.shape[1:]
        ok = h > 0 and w > 0 and H % h == 0 and W % w == 0
    if not ok:
        raise ValueError(
            f"{argument} must have shape [N, H, W] or [N, 1 or C, H, W] matching inputs "
            f"{tuple(inputs.shape)}" + ("" if same_size else " (or a lower resolution h x w dividing H x W)")
            + f", got {tuple(attributions.shape)}"
        )
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{argument} contains NaN or infinite values")
    return maps


def checked_copy(inputs) -> Tensor:
    """Checked ``inputs`` as a private copy: the metrics run the model on them many times,
    and a model may write into its input; the caller's tensor stays as it was (a copy made
    here is also an ordinary tensor when the caller is in ``inference_mode``)."""
    with torch.inference_mode(False):
        return check_images(inputs).detach().clone()


def resolve(model: nn.Module, inputs: Tensor, target):
    """Check ``target`` for N inputs; ``"predicted"`` becomes the clean inputs' top classes."""
    check_target(target, inputs.shape[0])
    if is_predicted(target):
        with torch.no_grad():
            target = resolve_target(target, model(inputs))
    return target


def rows_target(target, images: Tensor, repeats: int):
    """The target for a batch holding ``repeats`` consecutive copies of each of ``images``
    (a LongTensor of image indices)."""
    return target_for_rows(target, images.repeat_interleave(repeats))


def is_class_target(target) -> bool:
    return not isinstance(target, Neuron) and not (callable(target) and not isinstance(target, Tensor))


def scores(model: nn.Module, batch: Tensor, target, probability: bool) -> Tensor:
    """Per-row score ``Tensor[B]``: a class target's softmax probability (or its logit with
    ``probability=False``); a callable's or a Neuron's value as it is."""
    if probability and is_class_target(target):
        output = model(batch)
        if not isinstance(output, Tensor) or output.dim() != 2:
            raise ValueError(f"a class target needs a model output [N, classes], got shape "
                             f"{tuple(getattr(output, 'shape', ()))}; use a callable target")
        return select_scores(output.softmax(1), target)
    return target_scores(model, batch, target)


BOOTSTRAP_RESAMPLES = 2000


def interval95(values: Tensor):
    """``(mean, low, high, n)``: the mean and its 95% percentile-bootstrap interval
    (2,000 resamples, seeded: the same values give the same interval). The bounds are
    means of resampled values, so they stay inside the metric's range (an AUC in [0, 1]
    gets bounds in [0, 1]); NaN bounds for a single value."""
    v = values.detach().double().flatten().cpu()
    v = v[torch.isfinite(v)]
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(v.mean())
    if n == 1:
        return mean, float("nan"), float("nan"), 1
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, n, (BOOTSTRAP_RESAMPLES, n), generator=generator)
    means = v[rows].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return mean, low, high, n
