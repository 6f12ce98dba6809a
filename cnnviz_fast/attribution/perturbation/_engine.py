"""Masked batches over segments, scored in passes of bounded size.

Every segment method asks the same question: the target score of image ``n`` with some of
its segments kept and the others replaced by the baseline. A *coalition table*
``BoolTensor[R, K_n]`` lists R such images for image n (row r keeps segment k where
``table[r, k]``). :class:`SegmentScorer` runs the clean pass once (target scores, output,
``"predicted"`` fixed, the memory one more image costs), then scores any number of tables:
rows of several images share a forward pass, at most ``batch_size`` rows per pass, and
each pass's images are built there with one gather and one ``torch.where`` (the pixel mask
of row r is ``table[r, segments[n]]``), so memory stays bounded whatever the number of rows.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from ...core.layout import run_in_fast_layout
from ...core.targets import Target, is_predicted, resolve_target, target_for_rows, target_scores
from .._backprop import detach_output
from ..occlusion.batching import time_batch_sizes
from ._chunks import UNBOUNDED, batch_rows, clean_pass, scoring_model

# A row maker: (image n, first row, end row) -> the images Tensor[rows, C, H, W]
RowMaker = Callable[[int, int, int], Tensor]


class SegmentScorer:
    """Scores of masked copies of ``inputs`` ``[N, C, H, W]`` (see the module docstring).

    ``base``: the baseline, broadcastable to the inputs; ``segments``: ``LongTensor[N, H, W]``.
    Call inside ``model_guard`` and ``torch.no_grad``. After construction: ``clean``
    (``Tensor[N]``, the target scores of the inputs), ``output`` (the clean output when
    ``keep_output``, else None), ``target`` (resolved), ``runner`` (the model the masked
    passes run: :func:`scoring_model`) and ``batching`` (rows per pass, see
    :func:`._chunks.batch_rows`: measured on the first passes when neither ``batch_size``
    nor ``memory_budget`` is given)."""

    def __init__(self, model: nn.Module, inputs: Tensor, target: Target, base: Tensor, segments: Tensor,
                 batch_size: Optional[int] = None, memory_budget: Optional[int] = None,
                 keep_output: bool = False):
        self.model = model
        self.inputs = inputs
        self.segments = segments
        N = inputs.shape[0]
        self.base = base.expand_as(inputs) if base.shape[0] == N else base.expand(1, *inputs.shape[1:])
        # a copy: a model that writes into its input must not change the images we mask
        clean = clean_pass(model, inputs.clone(), target, keep_output or is_predicted(target))
        self.target = resolve_target(target, clean.output)
        self.clean = clean.scores.detach()
        self.output = detach_output(clean.output) if keep_output else None
        self.runner = scoring_model(model, inputs, self.target, self.clean)
        self.batching = batch_rows(batch_size, memory_budget, clean.bytes_per_image, inputs.device, UNBOUNDED)

    def base_of(self, n: int) -> Tensor:
        return self.base[n if self.base.shape[0] > 1 else 0]

    def table_maker(self, tables: List[Optional[Tensor]]) -> RowMaker:
        """Rows of image n from its coalition table ``BoolTensor[R, K_n]``."""
        def make(n: int, r0: int, r1: int) -> Tensor:
            keep = tables[n][r0:r1].index_select(1, self.segments[n].flatten())
            keep = keep.view(r1 - r0, 1, *self.segments.shape[1:])
            return torch.where(keep, self.inputs[n], self.base_of(n))
        return make

    def scores(self, tables: List[Optional[Tensor]]) -> List[Tensor]:
        """Target scores ``[Tensor[R_n]]`` of the rows of each image's coalition table (None
        or zero rows: nothing to score)."""
        counts = [0 if t is None else t.shape[0] for t in tables]
        return self.run(counts, self.table_maker(tables))

    def run(self, counts: List[int], make: RowMaker) -> List[Tensor]:
        """Target scores ``[Tensor[counts[n]]]`` of the rows ``make`` builds, packed into passes
        of ``batching.rows`` rows (rows of several images share a pass)."""
        device = self.inputs.device
        results = [torch.empty(c, dtype=self.clean.dtype, device=device) for c in counts]
        queue = [(n, c) for n, c in enumerate(counts) if c]  # images with rows left, and where they end
        taken = [0] * len(counts)

        def one_pass(_first: int, size: int) -> None:
            pieces = []  # (n, r0, r1)
            while size and queue:
                n, end = queue[0]
                r1 = min(end, taken[n] + size)
                pieces.append((n, taken[n], r1))
                size -= r1 - taken[n]
                taken[n] = r1
                if r1 == end:
                    queue.pop(0)
            batch = torch.cat([make(*piece) for piece in pieces]) if len(pieces) > 1 else make(*pieces[0])
            rows = torch.cat([torch.full((r1 - r0,), n, dtype=torch.long, device=device) for n, r0, r1 in pieces])
            row_target = target_for_rows(self.target, rows)
            # large CPU batches run channels-last (oneDNN), as occlusion's full passes do
            scores = run_in_fast_layout(self.runner, batch, lambda b: target_scores(self.runner, b, row_target))
            start = 0
            for n, r0, r1 in pieces:
                results[n][r0:r1] = scores[start:start + r1 - r0]
                start += r1 - r0

        total = sum(counts)
        if self.batching.rows is None:  # time the candidate sizes on the first passes
            seconds, _ = time_batch_sizes(one_pass, self.batching.candidates, total // 2, device,
                                          stop_when_slower=True)
            self.batching.rows = min(seconds, key=seconds.get) if seconds else self.batching.candidates[0]
        while queue:
            one_pass(0, self.batching.rows)
        return results


def paint(segments: Tensor, values: List[Tensor], channels: int, dtype: torch.dtype) -> Tensor:
    """Per-segment values ``[Tensor[K_n]]`` painted onto the pixels: ``Tensor[N, C, H, W]``
    (the same value in every channel, as Captum returns a grouped feature's attribution)."""
    maps = torch.stack([v.to(dtype)[s] for v, s in zip(values, segments)])
    return maps.unsqueeze(1).expand(-1, channels, -1, -1).contiguous()
