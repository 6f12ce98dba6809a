"""Pictures of activations: the feature maps of one layer for an image as a grid of small
grayscale tiles, one per channel (the deep-visualization toolbox's view, Yosinski et al.
2015: a conv5 map of 128 × 13 × 13 shown as 128 tiles)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor, nn

from ..core import forward_to_layers, layer_name, model_guard
from ..core.validation import check_choice, check_images, check_int, check_model_inputs
from ..pictures import image_grid

ORDERS = ("mean", "index")
SCALES = ("channel", "shared")


@dataclass
class ActivationGrid:
    """What :func:`activation_grid` returns.

    ``grids``: one picture per image, ``Tensor[N, 1, H', W']`` in [0, 1] on the CPU (save
    one with ``cnnviz_fast.save_png(result.grids[0], path, upscale=4)``); ``tiles``:
    ``Tensor[N, K, h, w]`` in [0, 1], the scaled maps drawn, in grid order (raster);
    ``channels``: ``LongTensor[N, K]``, the channel each tile shows; ``means``:
    ``Tensor[N, K]``, each shown channel's mean activation. ``tiles``, ``channels`` and
    ``means`` are on the inputs' device."""

    grids: Tensor
    tiles: Tensor
    channels: Tensor
    means: Tensor
    layer: str

    def captions(self, index: int = 0) -> List[str]:
        """``"channel c (mean m)"`` for each tile of image ``index``, in grid order."""
        return [f"channel {int(c)} (mean {float(m):.3g})" for c, m in zip(self.channels[index], self.means[index])]


def activation_grid(model: nn.Module, inputs: Tensor, layer, top_k: Optional[int] = None, order: str = "mean",
                    scale: str = "channel", nrow: Optional[int] = None, padding: int = 1) -> ActivationGrid:
    """The feature maps of ``layer`` for each input as a grid of grayscale tiles.

    Args:
        model: the network (run once, in eval mode, without gradients; left as it was).
        inputs: model inputs ``Tensor[N, C, H, W]``; one grid per input.
        layer: a dotted module name or the module itself, whose output is a feature map
            ``[N, K, h, w]``.
        top_k: show only the ``top_k`` channels with the largest mean activation (per
            input); None: every channel.
        order: ``"mean"``: tiles by decreasing mean activation; ``"index"``: by channel
            index (the toolbox's fixed layout).
        scale: ``"channel"``: each tile min-max scaled on its own (every map's pattern
            visible); ``"shared"``: all tiles of one input on one scale, from the minimum
            to the maximum over the channels shown (strong and weak channels comparable).
            A constant tile (or a constant layer under ``"shared"``) is black.
        nrow: tiles per row (default ≈ √K); padding: white pixels between tiles.

    Returns:
        :class:`ActivationGrid` (grids, tiles, channels, means, layer).
    """
    check_images(inputs)
    check_model_inputs(model, inputs)
    name = layer_name(model, layer, "layer")
    if top_k is not None:
        check_int(top_k, "top_k", minimum=1)
    check_choice(order, ORDERS, "order")
    check_choice(scale, SCALES, "scale")
    if nrow is not None:
        check_int(nrow, "nrow", minimum=1)
    check_int(padding, "padding", minimum=0)
    with model_guard(model), torch.no_grad():
        maps = forward_to_layers(model, inputs, [name])[name]
    if not isinstance(maps, Tensor) or maps.dim() != 4 or not maps.is_floating_point():
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"layer {name!r} must output a feature map [N, K, h, w], got {shape}; pick a "
                         "convolutional layer (see `cnnviz layers`)")
    maps = maps.detach().float()
    n, k = maps.shape[:2]
    if top_k is not None and top_k > k:
        raise ValueError(f"top_k must be at most the {k} channels of layer {name!r}, got {top_k}")
    means = maps.mean((2, 3))  # [N, K]
    # stable sort: equal means keep channel order, so the result never depends on ties
    channels = means.argsort(dim=1, descending=True, stable=True)[:, :top_k or k]
    if order == "index":
        channels = channels.sort(1)[0]
    shown = maps.gather(1, channels[:, :, None, None].expand(-1, -1, *maps.shape[2:]))  # [N, K', h, w]
    if scale == "channel":
        low, high = shown.amin((2, 3), keepdim=True), shown.amax((2, 3), keepdim=True)
    else:
        low, high = shown.amin((1, 2, 3), keepdim=True), shown.amax((1, 2, 3), keepdim=True)
    span = high - low
    tiles = torch.where(span > 0, (shown - low) / span.clamp_min(torch.finfo(shown.dtype).tiny), 0.0)
    grids = torch.stack([image_grid(t[:, None], nrow=nrow, padding=padding, scale=False) for t in tiles.cpu()])
    return ActivationGrid(grids, tiles, channels, means.gather(1, channels), name)
