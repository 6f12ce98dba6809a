"""Maximally activating patches: for each channel of a layer, the k units (over a whole
dataset) with the largest activations and the input patch each one sees.

One pass over the data with a running top-k per channel, so memory is bounded by the
k results (never by the dataset): per batch, the top-k of the batch's ``B·h·w`` units
of each channel is merged with the running top-k, and the patches of the newcomers are
cut out right away (so any iterable of batches works, read once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from ..core import Neuron, forward_to_layers, get_layer, model_guard
from ..core.data import images_of, checked_batch, iter_batches
from ..core.validation import check_positive_int, model_device_dtype
from ..pictures import image_grid
from .receptive import ReceptiveField, receptive_field


@dataclass
class TopActivations:
    """The result of :func:`max_activating_patches` for C' channels and k units each.

    Rows follow ``channels``; within a row, units are ordered by activation (largest
    first), ties by input index, then y, then x (so the result is deterministic).

    - ``values``: ``Tensor[C', k]`` activations;
    - ``indices``: ``Tensor[C', k]`` position of the input in ``data`` (0-based, in
      iteration order); ``y``, ``x``: ``Tensor[C', k]`` the unit's position in the layer's
      output (0 for a non-spatial layer ``[N, D]``);
    - ``patches``: ``Tensor[C', k, C_in, RF_h, RF_w]``: the input each unit sees (model
      inputs as given in ``data``), padded with ``fill`` where the field leaves the image;
      ``inside``: ``Tensor[C', k, RF_h, RF_w]`` bool, True on pixels of the image;
    - ``guided``: like ``patches``, the guided-backprop picture of each unit, or None;
    - ``receptive_field``: the layer's :class:`ReceptiveField`.
    """

    layer: str
    channels: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    patches: torch.Tensor
    inside: torch.Tensor
    receptive_field: ReceptiveField
    guided: Optional[torch.Tensor] = None


def _batch_top(values: torch.Tensor, take: int):
    """Per row, the ``take`` largest entries ordered by (value desc, column asc):
    ``(values, columns)``, both ``[rows, take]``."""
    top, columns = values.topk(take, dim=1)
    kth = top[:, -1:]
    if bool(((values == kth).sum(1) > (top == kth).sum(1)).any()):
        # Ties straddle the cut: which tied columns topk kept is unspecified; sort fully.
        columns = values.argsort(dim=1, descending=True, stable=True)[:, :take]
        return values.gather(1, columns), columns
    columns, by_column = columns.sort(dim=1)
    top = top.gather(1, by_column)
    order = top.argsort(dim=1, descending=True, stable=True)
    return top.gather(1, order), columns.gather(1, order)


def _cut(inputs: torch.Tensor, image: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
         size, fill: float):
    """Patches ``[S, C, size_h, size_w]`` with top-left corners (top, left) of the images
    ``inputs[image]``, ``fill`` outside them; and the inside mask ``[S, size_h, size_w]``."""
    height, width = inputs.shape[-2:]
    rows = top[:, None] + torch.arange(size[0], device=inputs.device)
    cols = left[:, None] + torch.arange(size[1], device=inputs.device)
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    patches = inputs[image[:, None, None], :, rows.clamp(0, height - 1)[:, :, None],
                     cols.clamp(0, width - 1)[:, None, :]]           # [S, size_h, size_w, C]
    patches = patches.permute(0, 3, 1, 2).masked_fill(~inside[:, None], fill)
    return patches, inside


def _check_channels(channels, count: int) -> torch.Tensor:
    if channels is None:
        return torch.arange(count)
    if isinstance(channels, int) and not isinstance(channels, bool):
        channels = [channels]
    chosen = torch.as_tensor(list(channels) if not isinstance(channels, torch.Tensor) else channels)
    if chosen.dim() != 1 or chosen.numel() == 0 or chosen.dtype.is_floating_point or chosen.dtype == torch.bool:
        raise ValueError(f"channels must be a non-empty sequence of ints, got {channels!r}")
    if int(chosen.min()) < 0 or int(chosen.max()) >= count:
        raise ValueError(f"channels must lie in [0, {count}) (the layer's channels), got {chosen.tolist()}")
    return chosen.long()


def _indexable_image(data, index: int) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[index]
    return images_of(data[index])


def max_activating_patches(
    model: nn.Module, data, layer: str, channels: Union[int, Sequence[int], None] = None, k: int = 9,
    batch_size: int = 64, fill: float = 0.0, guided: bool = False,
    device: Union[str, torch.device, None] = None, progress: Optional[bool] = None,
) -> TopActivations:
    """The k units of each channel of ``layer`` with the largest activations over ``data``,
    and the input patch (receptive field) each one sees.

    Args:
        model: the network (eval mode during the call, left as it was).
        data: model inputs ``Tensor[M, C, H, W]``, a Dataset, a DataLoader or an iterable of
            batches (``x`` or ``(x, y)``); read once.
        layer: dotted module name; output ``[N, C, h, w]`` (or ``[N, D]``: each unit then
            sees the whole input).
        channels: channel indices to report (default: all).
        k: units per channel (at most the number of units per channel in the whole data).
        batch_size: inputs per forward pass.
        fill: value of patch pixels outside the image (the field reaches into padding).
        guided: also compute the guided-backprop picture of each top unit
            (``cnnviz_fast.attribution.guided_backprop`` with target ``Neuron(layer,
            channel, y, x)``), cropped to its field; needs ``data`` to be a Tensor or a
            map-style Dataset (the inputs are read again by index).
        device: where to run the model (default: the model's device).
        progress: tqdm bar (``None``: only on a terminal).

    Memory: the running results, ``C'·k`` patches of ``C_in × RF_h × RF_w``, plus one batch.

    Returns:
        :class:`TopActivations` (on the CPU, or on ``data``'s device for a Tensor).
    """
    get_layer(model, layer)
    check_positive_int(k, "k")
    check_positive_int(batch_size, "batch_size")
    indexable = isinstance(data, torch.Tensor) or (isinstance(data, Dataset) and not isinstance(data, IterableDataset))
    if guided and not indexable:
        raise ValueError(f"guided=True needs data that can be indexed (a Tensor or a map-style Dataset), "
                         f"got {type(data).__name__}")
    device = torch.device(device) if device is not None else model_device_dtype(model)[0]
    result_device = data.device if isinstance(data, torch.Tensor) else torch.device("cpu")

    from tqdm.auto import tqdm
    bar = tqdm(unit="input", desc=f"top units of {layer}", disable=None if progress is None else not progress)
    top, seen = None, 0
    try:
        with model_guard(model):
            for inputs in iter_batches(data, batch_size):
                if inputs.dim() != 4:
                    raise ValueError(f"data must yield image batches [B, C, H, W], got shape {tuple(inputs.shape)}")
                # the model gets its own copy: the patches are cut from inputs afterwards
                batch = checked_batch(model, inputs, seen, device)
                inputs = inputs.to(device, non_blocking=True)
                seen += len(inputs)
                with torch.inference_mode():
                    activation = forward_to_layers(model, batch, [layer])[layer]
                spatial_layer = activation.dim() != 2
                if not spatial_layer:
                    activation = activation[:, :, None, None]
                if activation.dim() != 4:
                    raise ValueError(f"layer {layer!r} must output [N, C, h, w] or [N, D], got shape "
                                     f"{tuple(activation.shape)}")
                if top is None:
                    rf = receptive_field(model, tuple(inputs.shape[1:]), layer)
                    chosen = _check_channels(channels, activation.shape[1]).to(device)
                    top = _RunningTop(k, rf, fill)
                top.update(inputs, activation.index_select(1, chosen))
                bar.update(inputs.shape[0])
    finally:
        bar.close()
    if top is None:
        raise ValueError("data is empty: no input to look at")
    if top.values.shape[1] < k:
        raise ValueError(f"k must be at most the number of units per channel over data "
                         f"({top.values.shape[1]} = {top.seen} inputs × {top.spatial} positions), got {k}")
    image, within = top.units // top.spatial, top.units % top.spatial
    width = top.width
    result = TopActivations(
        layer=layer, channels=chosen.to(result_device), values=top.values.to(result_device),
        indices=image.to(result_device), y=(within // width).to(result_device),
        x=(within % width).to(result_device), patches=top.patches.to(result_device),
        inside=top.inside.to(result_device), receptive_field=rf)
    if guided:
        with model_guard(model):
            result.guided = _guided_patches(model, data, result, spatial_layer, device).to(result_device)
    return result


class _RunningTop:
    """Per channel, the k largest units seen so far (ordered by value desc, then global
    position asc) and their patches. A unit's global position is ``image·h·w + y·w + x``
    with images numbered in iteration order."""

    def __init__(self, k: int, rf: ReceptiveField, fill: float):
        self.k, self.rf, self.fill = k, rf, fill
        self.values = self.units = self.patches = self.inside = None  # [C', m], [C', m, ...]
        self.seen = self.spatial = self.width = 0

    def update(self, inputs: torch.Tensor, activation: torch.Tensor) -> None:
        """Merge one batch: ``inputs [B, C_in, H, W]``, ``activation [B, C', h, w]``."""
        batch, channels, _, width = activation.shape
        self.spatial, self.width = activation.shape[2] * width, width
        # [C', B·h·w]; column b·h·w + y·w + x, so column order is (image, y, x) order.
        flat = activation.transpose(0, 1).reshape(channels, -1).float().nan_to_num(nan=float("-inf"))
        new_values, columns = _batch_top(flat, min(self.k, flat.shape[1]))
        new_units = columns + self.seen * self.spatial
        if self.values is None:
            values, units = new_values, new_units
            from_batch = torch.ones_like(units, dtype=torch.bool)
        else:
            # Earlier units have smaller global positions, so a stable sort on the value
            # alone keeps the (value desc, position asc) order.
            all_values = torch.cat([self.values, new_values], 1)
            order = all_values.argsort(dim=1, descending=True, stable=True)[:, :self.k]
            values, units = all_values.gather(1, order), torch.cat([self.units, new_units], 1).gather(1, order)
            from_batch = order >= self.values.shape[1]
        if bool(from_batch.any()):  # else the running top-k stands as it is
            patches = torch.empty(*units.shape, inputs.shape[1], *self.rf.size, dtype=inputs.dtype,
                                  device=inputs.device)
            inside = torch.empty(*units.shape, *self.rf.size, dtype=torch.bool, device=inputs.device)
            if self.values is not None:
                kept = ~from_batch
                rows = kept.nonzero()[:, 0]
                patches[kept] = self.patches[rows, order[kept]]
                inside[kept] = self.inside[rows, order[kept]]
            position = units[from_batch] - self.seen * self.spatial
            image, within = position // self.spatial, position % self.spatial
            top = self.rf.offset[0] + (within // width) * self.rf.stride[0]
            left = self.rf.offset[1] + (within % width) * self.rf.stride[1]
            patches[from_batch], inside[from_batch] = _cut(inputs, image, top, left, self.rf.size, self.fill)
            self.values, self.units, self.patches, self.inside = values, units, patches, inside
        self.seen += batch


def _guided_patches(model, data, result: TopActivations, spatial_layer: bool, device) -> torch.Tensor:
    """Guided backprop of each top unit w.r.t. its input, cropped to the unit's field."""
    from ..attribution import guided_backprop  # imported here: the attribution suite is optional

    rf = result.receptive_field
    pictures = torch.zeros_like(result.patches, device=device)
    for row, channel in enumerate(result.channels.tolist()):
        for column in range(result.values.shape[1]):
            index = int(result.indices[row, column])
            y, x = int(result.y[row, column]), int(result.x[row, column])
            image = _indexable_image(data, index).unsqueeze(0).to(device)
            target = Neuron(result.layer, channel, y, x) if spatial_layer else Neuron(result.layer, channel)
            gradient = guided_backprop(model, image, target=target)
            top, left = rf.offset[0] + y * rf.stride[0], rf.offset[1] + x * rf.stride[1]
            patch, _ = _cut(gradient.detach(), torch.zeros(1, dtype=torch.long, device=device),
                            torch.tensor([top], device=device), torch.tensor([left], device=device), rf.size, 0.0)
            pictures[row, column] = patch[0]
    return pictures


def patch_grid(result: TopActivations, inverse: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
               padding: int = 1, outside: float = 0.5, guided: Optional[bool] = None) -> torch.Tensor:
    """One row per channel of ``result``: its k patches (largest activation first), then,
    with ``guided`` (default: when ``result.guided`` exists), a gap and the k
    guided-backprop pictures. Returns ``Tensor[C_in, H', W']`` in [0, 1] (see
    ``cnnviz_fast.save_png``).

    ``inverse`` maps model inputs back to pixels (e.g. ``zoo.DIGITS_NORMALIZE.inverse``);
    patches outside [0, 1] afterwards are min-max scaled one by one. Pixels outside the
    image are painted ``outside`` (grey).
    """
    if not isinstance(result, TopActivations):
        raise ValueError(f"result must be a TopActivations from max_activating_patches, got {type(result).__name__}")
    if guided is None:
        guided = result.guided is not None
    if guided and result.guided is None:
        raise ValueError("guided=True needs a result computed with max_activating_patches(..., guided=True)")
    rows, k = result.values.shape
    patches = result.patches.detach().float().cpu().flatten(0, 1)           # [C'·k, C, h, w]
    inside = result.inside.cpu().flatten(0, 1)[:, None].expand_as(patches)
    if inverse is not None:
        patches = inverse(patches)
    if patches.min() < 0 or patches.max() > 1:
        patches = _scale_inside(patches, inside)
    patches = patches.masked_fill(~inside, outside)
    tiles = patches.view(rows, k, *patches.shape[1:])
    if guided:
        pictures = _scale_inside(result.guided.detach().float().cpu().flatten(0, 1), inside)
        pictures = pictures.masked_fill(~inside, outside).view(rows, k, *patches.shape[1:])
        gap = torch.ones(rows, 1, *pictures.shape[2:])
        tiles = torch.cat([tiles, gap, pictures], 1)
    return image_grid(tiles.flatten(0, 1), nrow=tiles.shape[1], padding=padding, scale=False)


def _scale_inside(patches: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Min-max scale each patch over its pixels inside the image."""
    flat, mask = patches.flatten(1), inside.flatten(1)
    low = flat.masked_fill(~mask, float("inf")).min(1)[0]
    high = flat.masked_fill(~mask, float("-inf")).max(1)[0]
    low, high = low.view(-1, 1, 1, 1), high.view(-1, 1, 1, 1)
    return ((patches - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
