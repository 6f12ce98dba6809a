"""Feature ablation over segments: the score drop when one segment is replaced by a baseline."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ...core import model_guard
from ...core.arguments import friendly_arguments
from ...core.targets import Target, check_target
from ...core.validation import check_images, check_model_inputs
from .._backprop import with_output
from ._engine import SegmentScorer, paint
from .local_segments import ablated_scores
from .segments import Segments, resolve_baseline, resolve_segments

__all__ = ["feature_ablation"]


@friendly_arguments
def feature_ablation(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    segments: Segments = "slic:100",
    baseline: Union[float, Tensor, str] = 0.0,
    batch_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    incremental: bool = True,
    return_output: bool = False,
):
    """Attribution of each segment: ``f(x) - f(x with the segment replaced by baseline)``.

    Equal to ``captum.attr.FeatureAblation(model).attribute(inputs, target=target,
    baselines=baseline, feature_mask=segments[:, None])`` (one value per segment, painted
    on its pixels in every channel).

    Args:
        model: the network; eval mode during the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints, a Neuron, a callable ``output -> Tensor[B]`` or ``"predicted"``.
        segments: ``LongTensor[N, H, W]`` or ``[H, W]`` (each image's ids ``0 .. K_n - 1``),
            or ``"slic:K"`` / ``"grid:K"`` (see :func:`.segments.resolve_segments`).
        baseline: a number, a tensor broadcastable to the inputs, or ``"blur"`` /
            ``"blur:SIGMA"`` (a Gaussian-blurred copy of the inputs).
        batch_size: ablated images per forward pass (segments of several images share a
            pass); default: as many as fit in ``memory_budget`` (64 MiB on a CPU, half the
            free memory on CUDA), estimated from the clean pass.
        memory_budget: bytes per pass when ``batch_size`` is None.
        incremental: score small segments with occlusion's incremental engine (only
            what the segment changes is recomputed; see :mod:`.local_segments`), the
            rest by full passes; False: full passes only.
        return_output: also return the clean inputs' model output.

    Returns:
        ``Tensor[N, C, H, W]`` in the scores' dtype (``(attributions, output)`` with
        ``return_output``).
    """
    with model_guard(model), torch.no_grad():
        check_images(inputs)
        check_model_inputs(model, inputs)
        check_target(target, inputs.shape[0])
        segments = resolve_segments(segments, inputs)
        base = resolve_baseline(baseline, inputs)
        scorer = SegmentScorer(model, inputs.detach(), target, base, segments, batch_size, memory_budget,
                               keep_output=return_output)
        K = [int(s.max()) + 1 for s in segments]
        scores = ablated_scores(scorer, segments, K, incremental)
        drops = [scorer.clean[n] - s for n, s in enumerate(scores)]
        attributions = paint(segments, drops, inputs.shape[1], scorer.clean.dtype)
        return with_output(attributions, scorer.output, return_output)
