"""Feature ablation's rows through the incremental engine.

Replacing one segment by the baseline changes the image inside the segment's bounding
box only, as an occluding window does, so occlusion's incremental engine
(:class:`~cnnviz_fast.attribution.occlusion.IncrementalOcclusion`) scores it by
recomputing each layer only where that box reaches. Segments go smallest box first, a
batch of similar boxes per engine pass; once a pass costs more multiply-adds than
``PROFITABLE_FRACTION`` of full passes (big segments reach most of every map), the
remaining segments are scored by full passes (:class:`._engine.SegmentScorer`), which
also takes every image the engine cannot run (an untraceable model, a clean score the
trace does not reproduce).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..occlusion import IncrementalOcclusion
from ..occlusion.entry import PROFITABLE_FRACTION
from ..occlusion.incremental_scorer import image_target
from ._engine import SegmentScorer

__all__ = ["ablated_scores", "segment_boxes"]

# segments per engine pass: on the 2-core EPYC (ResNet-18, 224 px, ~55 SLIC segments)
# 16 and 32 ran alike and 64 slower; a GPU batches the boxes' gathers better
ENGINE_ROWS = {"cpu": 16, "cuda": 64}

# A box over half the image reaches every map of a CNN's deeper half whole: not worth a try.
BIG_BOX_FRACTION = 0.5


def segment_boxes(labels: Tensor, count: int) -> Tensor:
    """Bounding boxes ``LongTensor[count, 4]`` (top, bottom, left, right; bottom and right
    exclusive) of the segments ``0 .. count - 1`` of a label map ``[H, W]``."""
    H, W = labels.shape
    rows = torch.arange(H).view(H, 1).expand(H, W).flatten()
    cols = torch.arange(W).view(1, W).expand(H, W).flatten()
    ids = labels.flatten()

    def reduce(values: Tensor, how: str, start: int) -> Tensor:
        return torch.full((count,), start).scatter_reduce(0, ids, values, how, include_self=True)

    return torch.stack([reduce(rows, "amin", H), reduce(rows, "amax", -1) + 1,
                        reduce(cols, "amin", W), reduce(cols, "amax", -1) + 1], 1)


def ablated_scores(scorer: SegmentScorer, segments: Tensor, counts: List[int], incremental: bool = True,
                   batch_size: Optional[int] = None) -> List[Tensor]:
    """Scores ``[Tensor[K_n]]``: entry k of image n is the target score of image n with
    segment k replaced by the baseline (``segments``: ``LongTensor[N, H, W]``)."""
    device = scorer.inputs.device
    results = [torch.empty(k, dtype=scorer.clean.dtype, device=device) for k in counts]
    left: List[Optional[Tensor]] = [torch.arange(k) for k in counts]  # segments for full passes
    engine = IncrementalOcclusion.build(scorer.runner, scorer.target) if incremental else None
    if engine is not None:
        fraction = PROFITABLE_FRACTION.get(device.type, PROFITABLE_FRACTION["cuda"])
        rows = batch_size or ENGINE_ROWS.get(device.type, ENGINE_ROWS["cuda"])
        for n, k in enumerate(counts):
            left[n] = _engine_scores(engine, scorer, n, segments[n].cpu(), k, rows, fraction, results[n])
    tables = [None if rest is None or not len(rest) else
              ~torch.eye(k, dtype=torch.bool, device=device)[rest.to(device)] for k, rest in zip(counts, left)]
    for n, scores in enumerate(scorer.scores(tables)):
        if len(scores):
            results[n][left[n].to(device)] = scores
    return results


def _engine_scores(engine: IncrementalOcclusion, scorer: SegmentScorer, n: int, labels: Tensor, count: int,
                   rows: int, fraction: float, out: Tensor) -> Tensor:
    """Scores of image n's segments from the engine into ``out``, smallest box first, until
    a pass is unprofitable; returns the segments left for full passes."""
    image = scorer.inputs[n:n + 1]
    clean = engine.clean(image, scorer.base_of(n)[None], image_target(scorer.target, n)).to(out.dtype)
    if clean.shape != (1,) or not torch.allclose(clean, scorer.clean[n:n + 1], rtol=1e-3, atol=1e-5):
        return torch.arange(count)  # the trace missed something: full passes only
    boxes = segment_boxes(labels, count)
    areas = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    order = areas.argsort()
    small = int((areas <= BIG_BOX_FRACTION * labels.numel()).sum())
    for start in range(0, small, rows):
        chunk = order[start:min(start + rows, small)]
        before = engine.macs_incremental
        scores = engine.scores(*boxes[chunk].unbind(1), labels=labels, ids=chunk)
        out[chunk.to(out.device)] = scores.to(out.dtype)
        if engine.macs_incremental - before > fraction * len(chunk) * engine.macs_clean:
            return order[start + len(chunk):]
    return order[small:]
