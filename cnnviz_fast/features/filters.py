"""Pictures of convolution weights: first-layer filters as colour tiles, deeper ones as
rows of per-input-channel grayscale tiles."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core import get_layer
from ..core.validation import check_int
from ..pictures import image_grid


def _conv_layers(model: nn.Module):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def filter_grid(model: nn.Module, layer: Optional[str] = None, per_channel: Optional[bool] = None,
                nrow: Optional[int] = None, padding: int = 1) -> torch.Tensor:
    """The filters of a convolution layer as one picture ``Tensor[C, H', W']`` in [0, 1]
    (C = 3 or 1); make it a ``PIL.Image`` with ``cnnviz_fast.to_pil`` or save it with
    ``cnnviz_fast.save_png(grid, path, upscale=8)``.

    Args:
        model: the network (only read).
        layer: dotted name of an ``nn.Conv2d`` (default: the first one of the model).
        per_channel: ``False``: one tile per filter, RGB for 3 input channels, grayscale
            for 1 (``nrow`` tiles per row, default ≈ √filters). ``True``: one row per
            filter, one grayscale tile per input channel (the lecture's 20 × 16 × 7×7
            picture of a second layer). Default: ``False`` for 1 or 3 input channels,
            ``True`` otherwise.
        padding: pixels between tiles.

    Each filter is min-max scaled over all its weights (so a row keeps the relative
    strength of its input channels); a constant filter shows as black.
    """
    if nrow is not None:
        check_int(nrow, "nrow", minimum=1)
    check_int(padding, "padding", minimum=0)
    if layer is None:
        convs = _conv_layers(model)
        if not convs:
            raise ValueError("layer: model has no nn.Conv2d layer; pass the name of one")
        layer, conv = convs[0]
    else:
        conv = get_layer(model, layer)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"layer {layer!r} must be an nn.Conv2d, got {type(conv).__name__}")
    weight = conv.weight.detach().float().cpu()  # [filters, in_channels / groups, kh, kw]
    filters, channels = weight.shape[:2]
    if per_channel is None:
        per_channel = channels not in (1, 3)
    if not per_channel and channels not in (1, 3):
        raise ValueError(f"per_channel=False needs filters with 1 or 3 input channels, layer {layer!r} "
                         f"has {channels}")
    flat = weight.reshape(filters, -1)
    low, high = flat.min(1)[0].view(-1, 1, 1, 1), flat.max(1)[0].view(-1, 1, 1, 1)
    scaled = (weight - low) / (high - low).clamp_min(1e-12)
    if per_channel:
        tiles = scaled.reshape(filters * channels, 1, *weight.shape[2:])
        return image_grid(tiles, nrow=channels, padding=padding, scale=False)
    return image_grid(scaled, nrow=nrow, padding=padding, scale=False)
