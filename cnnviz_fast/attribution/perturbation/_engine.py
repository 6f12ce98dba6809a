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

from ...core.targets import Target, is_predicted, resolve_target, target_for_rows, target_scores
from ...core.validation import check_positive_int
from .._backprop import detach_output
from ...core.layout import run_in_fast_layout
from ..occlusion.batching import MAX_MEASURED_BUDGET, choose_batch_size, clean_pass

CPU_ROWS = 32  # rows per pass on a CPU when neither batch_size nor memory_budget is given

# A row maker: (image n, first row, end row) -> the images Tensor[rows, C, H, W]
RowMaker = Callable[[int, int, int], Tensor]


class SegmentScorer:
    """Scores of masked copies of ``inputs`` ``[N, C, H, W]`` (see the module docstring).

    ``base``: the baseline, broadcastable to the inputs; ``segments``: ``LongTensor[N, H, W]``.
    Call inside ``model_guard`` and ``torch.no_grad``. After construction: ``clean``
    (``Tensor[N]``, the target scores of the inputs), ``output`` (the clean output when
    ``keep_output``, else None), ``target`` (resolved), ``batch_size``."""

    def __init__(self, model: nn.Module, inputs: Tensor, target: Target, base: Tensor, segments: Tensor,
                 batch_size: Optional[int] = None, memory_budget: Optional[int] = None,
                 keep_output: bool = False):
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        if memory_budget is not None:
            check_positive_int(memory_budget, "memory_budget")
        self.model = model
        self.inputs = inputs
        self.segments = segments
        N = inputs.shape[0]
        self.base = base.expand_as(inputs) if base.shape[0] == N else base.expand(1, *inputs.shape[1:])
        keep = keep_output or is_predicted(target)
        # a copy: a model that writes into its input must not change the images we mask
        scores, output, per_image = clean_pass(model, inputs.clone(), target, keep, measure=batch_size is None)
        self.target = resolve_target(target, output)
        self.clean = scores.detach()
        self.output = detach_output(output) if keep_output else None
        if batch_size is None and memory_budget is None and inputs.device.type == "cpu":
            # CPU passes of 6 ResNet-18 224-px rows (the 64 MiB occlusion default) lost to Captum's
            # 16-64 per pass: up to 32 rows, within occlusion's 1 GiB measuring budget
            batch_size = min(CPU_ROWS, choose_batch_size(per_image, inputs.device, MAX_MEASURED_BUDGET))
        self.batch_size = batch_size or choose_batch_size(per_image, inputs.device, memory_budget)

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
        of at most ``batch_size`` rows (rows of several images share a pass)."""
        device = self.inputs.device
        results = [torch.empty(c, dtype=self.clean.dtype, device=device) for c in counts]
        pending: List[tuple] = []  # (n, r0, r1) pieces of the next pass
        size = 0

        def flush():
            nonlocal pending, size
            if not pending:
                return
            batch = torch.cat([make(n, r0, r1) for n, r0, r1 in pending]) if len(pending) > 1 else \
                make(*pending[0])
            rows = torch.cat([torch.full((r1 - r0,), n, dtype=torch.long, device=device)
                              for n, r0, r1 in pending])
            row_target = target_for_rows(self.target, rows)
            # large CPU batches run channels-last (oneDNN), as occlusion's full passes do
            scores = run_in_fast_layout(self.model, batch, lambda b: target_scores(self.model, b, row_target))
            start = 0
            for n, r0, r1 in pending:
                results[n][r0:r1] = scores[start:start + r1 - r0]
                start += r1 - r0
            pending, size = [], 0

        for n, count in enumerate(counts):
            r = 0
            while r < count:
                take = min(count - r, self.batch_size - size)
                pending.append((n, r, r + take))
                size += take
                r += take
                if size == self.batch_size:
                    flush()
        flush()
        return results


def paint(segments: Tensor, values: List[Tensor], channels: int, dtype: torch.dtype) -> Tensor:
    """Per-segment values ``[Tensor[K_n]]`` painted onto the pixels: ``Tensor[N, C, H, W]``
    (the same value in every channel, as Captum returns a grouped feature's attribution)."""
    maps = torch.stack([v.to(dtype)[s] for v, s in zip(values, segments)])
    return maps.unsqueeze(1).expand(-1, channels, -1, -1).contiguous()
