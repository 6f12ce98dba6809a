"""Approximate mode: its knobs (projective-field cap, drill-down fraction, coarse step),
their defaults and checks, and the drill-down: window scores on a coarse grid of
positions, interpolated elsewhere, then computed where the estimate is highest."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ...core.validation import check_positive_int

__all__ = ["COARSE_STEP", "DRILL_DOWN", "FIELD_CAP", "MODES", "check_mode", "drill_down"]

MODES = ("exact", "full", "approximate")
# Approximate mode defaults: the projective-field threshold (rectangles capped at this
# fraction of each map's height and width) and the adaptive drill-down (a pass on every
# COARSE_STEP-th row and column of the window grid, the rest interpolated except for
# this fraction of the positions, the highest estimates, computed exactly). On the trained
# EfficientNet-Lite0 (224 px, window 16, stride 8, 3 photos) these defaults run ~13x faster
# than full recomputation with Pearson 0.58 (worst 0.33) against exact; coarse_step=2,
# field_cap=1, drill_down=0.2 reaches Pearson >= 0.96 and top-5% IoU >= 0.9 at ~3.5x.
# The cap is off by default on a GPU: there the capped plan's many small patch passes ran
# 0.02-2.1x the speed of full recomputation (H200, results/incremental-*-nvidia-h200.md),
# while without it the plan passes PROFITABLE_FRACTION or the drill-down runs full passes.
FIELD_CAP = {"cpu": 0.5, "cuda": 1.0}
DRILL_DOWN = 0.1
COARSE_STEP = 3


def check_mode(mode, field_cap, drill_down, coarse_step,
               device: torch.device) -> Tuple[Optional[float], Optional[float], int]:
    """``(field_cap, drill_down, coarse_step)`` for ``mode``; None where a knob is off."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode != "approximate":
        for name, value in (("field_cap", field_cap), ("drill_down", drill_down), ("coarse_step", coarse_step)):
            if value is not None:
                raise ValueError(f"{name} applies only to mode='approximate', got {name}={value!r} "
                                 f"with mode={mode!r}")
        return None, None, COARSE_STEP
    if coarse_step is None:
        coarse_step = COARSE_STEP
    check_positive_int(coarse_step, "coarse_step")
    knobs = []
    default_cap = FIELD_CAP.get(device.type, FIELD_CAP["cuda"])
    for name, value, default in (("field_cap", field_cap, default_cap), ("drill_down", drill_down, DRILL_DOWN)):
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        knobs.append(None if value >= 1 else float(value))
    return knobs[0], knobs[1], coarse_step


def drill_down(score: Callable[[Tensor], Tensor], rows: int, cols: int, fraction: float, step: int) -> Tensor:
    """Deltas of one image's ``rows x cols`` positions (flat): exact on a coarse grid (every
    ``step``-th row and column, and the last) and on the ``fraction`` of positions with
    the highest bilinear interpolation of it; interpolated elsewhere. ``score(positions)``
    (host int64) gives the exact deltas of those positions."""
    knots_r = sorted(set(range(0, rows, step)) | {rows - 1})
    knots_c = sorted(set(range(0, cols, step)) | {cols - 1})
    coarse = (torch.tensor(knots_r)[:, None] * cols + torch.tensor(knots_c)[None, :]).flatten()
    coarse_deltas = score(coarse)
    grid = coarse_deltas.view(len(knots_r), len(knots_c))
    with torch.autocast(grid.device.type, enabled=False):  # interpolated in the deltas' dtype (dtype=bf16 too)
        estimate = (_interpolation(knots_r, rows).to(grid) @ grid @ _interpolation(knots_c, cols).to(grid).T).flatten()
    estimate[coarse.to(estimate.device)] = coarse_deltas
    todo = torch.ones(rows * cols, dtype=torch.bool)
    todo[coarse] = False
    candidates = todo.nonzero()[:, 0]
    k = min(candidates.numel(), math.ceil(fraction * rows * cols))
    if k:
        chosen = candidates[estimate[candidates.to(estimate.device)].topk(k).indices.cpu()]
        estimate[chosen.to(estimate.device)] = score(chosen)
    return estimate


def _interpolation(knots: List[int], n: int) -> Tensor:
    """``[n, len(knots)]`` weights of linear interpolation at 0..n-1 from values at ``knots``."""
    weights = torch.zeros(n, len(knots), dtype=torch.float64)
    for k, (a, b) in enumerate(zip(knots, knots[1:])):
        t = torch.arange(a, b + 1, dtype=torch.float64)
        weights[a:b + 1, k] = (b - t) / (b - a)
        weights[a:b + 1, k + 1] = (t - a) / (b - a)
    if len(knots) == 1:
        weights[:, 0] = 1
    return weights
