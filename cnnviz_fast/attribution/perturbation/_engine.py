"""Masked batches over segments, scored in passes of bounded size.

Every segment method asks the same question: the target score of image ``n`` with some of
its segments kept and the others replaced by the baseline. A *coalition table*
``BoolTensor[R, K_n]`` lists R such images for image n (row r keeps segment k where
``table[r, k]``). :class:`SegmentScorer` runs the clean pass once (target scores, output,
``"predicted"`` fixed, the memory one more image costs), then scores any number of tables:
rows of several images share a forward pass, at most ``batch_size`` rows per pass, and
each pass's images are built there by one ``ops.segment_mask`` call (row r shows image n
where ``table[r, segments[n]]``, else the baseline; in the layout the pass runs in), so
memory stays bounded whatever the number of rows.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from ... import ops
from ...core.layout import fast_layout, run_in_fast_layout
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
        self._base_given = base
        self._masking = {}  # memory format -> (images, kernel baseline) for ops.segment_mask
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
        """Rows of image n from its coalition table ``BoolTensor[R, K_n]``; its ``pass_rows``
        builds a whole pass (pieces of several images) in one ``ops.segment_mask`` call."""
        return _TableRows(self, tables)

    def masked(self, keep: Tensor, rows: Tensor) -> Tensor:
        """``ops.segment_mask`` of the inputs: ``Tensor[R, C, H, W]``, row r image ``rows[r]``
        with the segments where ``keep[r]`` (``BoolTensor[R, K]``, K >= every K_n), the
        baseline elsewhere; channels-last when the pass will run so (no copy there)."""
        layout = fast_layout(self.runner, (keep.shape[0],) + tuple(self.inputs.shape[1:]), self.inputs.device)
        if layout not in self._masking:
            # once per layout: the images and a full-size baseline (a 1-element one as is)
            given = self._base_given
            base = given.reshape(()) if given.numel() == 1 else \
                given.expand_as(self.inputs).contiguous(memory_format=layout)
            self._masking[layout] = (self.inputs.contiguous(memory_format=layout), base)
        images, base = self._masking[layout]
        # the ids were checked when the segments were resolved (0 .. K_n - 1)
        return ops.segment_mask(images, self.segments, keep, rows, base, check_values=False)

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
            if hasattr(make, "pass_rows"):  # the whole pass in one call
                batch = make.pass_rows(pieces)
            else:
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


class _TableRows:
    """The row maker of :meth:`SegmentScorer.table_maker`: ``(n, r0, r1)`` -> rows ``r0 .. r1 - 1``
    of image n's table; ``pass_rows(pieces)`` -> the rows of several pieces, in one op call."""

    def __init__(self, scorer: SegmentScorer, tables: List[Optional[Tensor]]):
        self.scorer = scorer
        self.tables = tables
        self.width = max((t.shape[1] for t in tables if t is not None), default=0)

    def __call__(self, n: int, r0: int, r1: int) -> Tensor:
        return self.pass_rows([(n, r0, r1)])

    def pass_rows(self, pieces) -> Tensor:
        device = self.scorer.inputs.device
        # tables of images with fewer segments get False columns (their ids never look them up)
        keep = torch.zeros(sum(r1 - r0 for _, r0, r1 in pieces), self.width, dtype=torch.bool, device=device)
        start = 0
        for n, r0, r1 in pieces:
            table = self.tables[n]
            keep[start:start + r1 - r0, :table.shape[1]] = table[r0:r1]
            start += r1 - r0
        rows = torch.cat([torch.full((r1 - r0,), n, dtype=torch.long, device=device) for n, r0, r1 in pieces])
        return self.scorer.masked(keep, rows)


def paint(segments: Tensor, values: List[Tensor], channels: int, dtype: torch.dtype) -> Tensor:
    """Per-segment values ``[Tensor[K_n]]`` painted onto the pixels: ``Tensor[N, C, H, W]``
    (the same value in every channel, as Captum returns a grouped feature's attribution)."""
    maps = torch.stack([v.to(dtype)[s] for v, s in zip(values, segments)])
    return maps.unsqueeze(1).expand(-1, channels, -1, -1).contiguous()
