"""Pointing game (Zhang et al. 2016): does each map's maximum fall on the object?"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.validation import check_finite, check_number

__all__ = ["pointing_game"]


def pointing_game(
    attributions: Tensor, boxes: Optional[Tensor] = None, masks: Optional[Tensor] = None, tolerance: float = 0.0
) -> Tensor:
    """Hits ``Tensor[N]`` (bool): the map's maximum lies within ``tolerance`` pixels of the object.

    Args:
        attributions: maps ``[N, H, W]`` or ``[N, C, H, W]`` (channels summed).
        boxes: ``[N, 4]`` ``(x1, y1, x2, y2)`` in pixels, half-open (torchvision's convention):
            pixel ``(y, x)`` is inside when ``x1 <= x < x2`` and ``y1 <= y < y2``.
        masks: ``[N, H, W]`` (bool or 0/1): the object's pixels. Give boxes or masks.
        tolerance: the hit radius in pixels (Euclidean); the paper uses 15 at 224 x 224.

    The maximum is the first one in row-major order when several pixels share it.
    """
    if (boxes is None) == (masks is None):
        raise ValueError("give exactly one of boxes or masks")
    if not isinstance(attributions, Tensor) or attributions.dim() not in (3, 4) or not attributions.is_floating_point():
        raise ValueError(f"attributions must be a floating Tensor[N, H, W] or [N, C, H, W], got "
                         f"{tuple(getattr(attributions, 'shape', ())) or type(attributions).__name__}")
    maps = attributions.sum(1) if attributions.dim() == 4 else attributions
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("attributions contains NaN or infinite values")
    check_number(tolerance, "tolerance")
    N, H, W = maps.shape
    peak = maps.flatten(1).argmax(1)
    py, px = (peak // W).double(), (peak % W).double()
    ys = torch.arange(H, dtype=torch.float64, device=maps.device)[:, None].expand(H, W)
    xs = torch.arange(W, dtype=torch.float64, device=maps.device)[None, :].expand(H, W)
    if boxes is not None:
        if not isinstance(boxes, Tensor) or boxes.shape != (N, 4):
            raise ValueError(f"boxes must be a Tensor[N, 4] = [{N}, 4] (x1, y1, x2, y2), got "
                             f"{tuple(getattr(boxes, 'shape', ())) or type(boxes).__name__}")
        b = check_finite(boxes.to(device=maps.device, dtype=torch.float64), "boxes")
        x1, y1, x2, y2 = (b[:, i, None, None] for i in range(4))
        region = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)  # [N, H, W]
    else:
        if not isinstance(masks, Tensor) or tuple(masks.shape) != (N, H, W):
            raise ValueError(f"masks must be a Tensor[N, H, W] = [{N}, {H}, {W}], got "
                             f"{tuple(getattr(masks, 'shape', ())) or type(masks).__name__}")
        region = masks.to(maps.device).bool()
    d2 = (ys - py[:, None, None]) ** 2 + (xs - px[:, None, None]) ** 2
    return (region & (d2 <= float(tolerance) ** 2)).flatten(1).any(1)
