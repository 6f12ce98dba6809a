"""Shapley value sampling over segments (Castro et al. 2009; Captum ``ShapleyValueSampling``).

Along a random permutation of the segments, the image goes from the baseline to the input
one segment at a time; each segment is credited with the score change its addition
causes, averaged over the permutations. The images of a permutation are built
cumulatively (row j keeps the first j segments of the permutation) and scored in shared
passes; the first image (all baseline) is scored once per image and the last (the input
itself) comes from the clean pass.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor, nn

from ...core import model_guard
from ...core.arguments import friendly_arguments
from ...core.targets import Target, check_target
from ...core.validation import check_images, check_model_inputs, check_positive_int
from .._backprop import with_output
from ._engine import SegmentScorer, paint
from .segments import Segments, resolve_baseline, resolve_segments

__all__ = ["shapley_sampling", "draw_permutations"]


def draw_permutations(features: int, samples: int, seed: Optional[int] = None) -> Tensor:
    """``LongTensor[samples, features]``: ``samples`` random permutations, drawn as Captum's
    ``ShapleyValueSampling`` draws them (one ``torch.randperm(features)`` each on the CPU
    generator): with ``seed`` from a fresh generator seeded so, which yields Captum's
    permutations under ``torch.manual_seed(seed)``; without, from the global generator."""
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(features, generator=generator) for _ in range(samples)])


def _check_permutations(permutations, features: int) -> Tensor:
    perms = torch.as_tensor(permutations)
    if perms.dim() == 1:
        perms = perms[None]
    if perms.dim() != 2 or perms.shape[0] < 1 or perms.dtype.is_floating_point or perms.dtype == torch.bool:
        raise ValueError(f"permutations must be integer permutations [samples, {features}], got "
                         f"{tuple(perms.shape)} {perms.dtype}")
    if perms.shape[1] != features or not bool(
            (perms.sort(1).values.cpu() == torch.arange(features)).all()):
        raise ValueError(f"permutations: each row must be a permutation of 0..{features - 1} (the segment ids), "
                         f"got shape {tuple(perms.shape)}")
    return perms.long().cpu()


@friendly_arguments
def shapley_sampling(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    segments: Segments = "slic:100",
    baseline: Union[float, Tensor, str] = 0.0,
    samples: int = 25,
    seed: Optional[int] = None,
    permutations=None,
    batch_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    return_output: bool = False,
):
    """Shapley values of the segments, estimated on ``samples`` random permutations.

    Equal to ``captum.attr.ShapleyValueSampling(model).attribute(inputs, target=target,
    baselines=baseline, feature_mask=segments[:, None], n_samples=samples)`` on the same
    permutations: pass them (``permutations``), or a ``seed`` (Captum's under
    ``torch.manual_seed(seed)``; see :func:`draw_permutations`). The permutations run over
    the ids ``0 .. K - 1`` of the whole batch (K = the largest segment count), as Captum's
    feature mask does; an image with fewer segments skips the ids it lacks.

    Args:
        segments, baseline, batch_size, memory_budget, return_output: as in
            :func:`~cnnviz_fast.attribution.perturbation.feature_ablation`.
        samples: the number of permutations (ignored when ``permutations`` is given).
        seed: draw the permutations from a generator seeded so (default: the global one).
        permutations: ``LongTensor[samples, K]`` (or a list of lists), each row a
            permutation of ``0 .. K - 1``.

    Returns:
        ``Tensor[N, C, H, W]`` (``(attributions, output)`` with ``return_output``). Costs
        ``samples * (K - 1) + 1`` forward passes per image (plus the clean one).
    """
    with model_guard(model), torch.no_grad():
        check_images(inputs)
        check_model_inputs(model, inputs)
        check_target(target, inputs.shape[0])
        segments = resolve_segments(segments, inputs)
        base = resolve_baseline(baseline, inputs)
        K = [int(s.max()) + 1 for s in segments]
        if permutations is None:
            check_positive_int(samples, "samples")
            perms = draw_permutations(max(K), samples, seed)
        else:
            perms = _check_permutations(permutations, max(K))
        scorer = SegmentScorer(model, inputs.detach(), target, base, segments, batch_size, memory_budget,
                               keep_output=return_output)
        device = inputs.device
        orders: List[Tensor] = []  # per image: [P, K_n], each permutation restricted to the image's ids
        tables: List[Tensor] = []
        for k in K:
            order = perms[perms < k].view(perms.shape[0], k)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(k).expand_as(order))
            # row 0: all baseline; then for each permutation, its first j segments kept, j = 1 .. k-1
            steps = torch.arange(1, k)
            keep = rank[:, None, :] < steps[None, :, None]  # [P, k-1, k]
            table = torch.cat([torch.zeros(1, k, dtype=torch.bool), keep.reshape(-1, k)])
            orders.append(order)
            tables.append(table.to(device))
        scores = scorer.scores(tables)
        values = []
        for n, (k, order) in enumerate(zip(K, orders)):
            s = scores[n]
            P = order.shape[0]
            path = torch.cat([s[:1].expand(P, 1), s[1:].view(P, k - 1), scorer.clean[n].expand(P, 1)], 1)
            gains = (path[:, 1:] - path[:, :-1]).double()  # [P, k]: gain of the j-th added segment
            total = torch.zeros(k, dtype=torch.float64, device=device)
            total.index_add_(0, order.flatten().to(device), gains.flatten())
            values.append(total / P)
        attributions = paint(segments, values, inputs.shape[1], scorer.clean.dtype)
        return with_output(attributions, scorer.output, return_output)
