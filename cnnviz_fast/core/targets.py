"""What to explain: one ``target`` argument with the same meaning in every method.

A target is
- an ``int``: the same class score (pre-softmax output column) for every image;
- a sequence / 1-D tensor of N ints: one class per image;
- a :class:`Neuron`: one intermediate unit (or a channel's spatial mean);
- a callable mapping the model output ``Tensor[N, ...]`` to ``Tensor[N]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .layers import forward_to_layers


@dataclass(frozen=True)
class Neuron:
    """One unit of an intermediate layer: ``layer`` is a dotted module name (as in
    ``model.get_submodule``), ``channel`` its channel; with ``y``/``x`` the unit at
    that spatial position, without them the channel's spatial mean. For a layer
    with a 2-D output ``[N, D]`` (a linear layer) ``channel`` indexes D."""

    layer: str
    channel: int
    y: Optional[int] = None
    x: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"Neuron.layer must be a dotted module name, got {self.layer!r}")
        if (self.y is None) != (self.x is None):
            raise ValueError(f"Neuron.y and Neuron.x must be given together, got y={self.y}, x={self.x}")

    def value(self, activation: torch.Tensor) -> torch.Tensor:
        """This neuron's value for each image of ``activation`` ``[N, C, ...]`` → ``Tensor[N]``."""
        if activation.dim() < 2:
            raise ValueError(f"target {self} needs a layer output with a channel dimension, "
                             f"got shape {tuple(activation.shape)}")
        channels = activation.shape[1]
        if not 0 <= self.channel < channels:
            raise ValueError(f"target {self}: channel must be in [0, {channels}), got {self.channel}")
        unit = activation[:, self.channel]
        if self.y is None:
            return unit.reshape(unit.shape[0], -1).mean(1)
        if unit.dim() != 3:
            raise ValueError(f"target {self}: y/x need a spatial layer output [N, C, H, W], "
                             f"got shape {tuple(activation.shape)}")
        height, width = unit.shape[1:]
        if not (0 <= self.y < height and 0 <= self.x < width):
            raise ValueError(f"target {self}: (y, x) must lie in [0, {height}) x [0, {width}), "
                             f"got ({self.y}, {self.x})")
        return unit[:, self.y, self.x]


Target = Union[int, Sequence[int], torch.Tensor, Neuron, Callable[[torch.Tensor], torch.Tensor]]


def target_layer(target: Target) -> Optional[str]:
    """The layer a target reads (a Neuron's), or None when it reads the model output."""
    return target.layer if isinstance(target, Neuron) else None


def _class_indices(target, n: int, device) -> torch.Tensor:
    if isinstance(target, bool):
        raise ValueError(f"target must be an int, N ints, a Neuron or a callable, got {target!r}")
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=device)
    indices = torch.as_tensor(target, device=device)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dim() != 1:
        raise ValueError(f"target must be an int or a 1-D sequence of ints, got {target!r}")
    if indices.numel() != n:
        raise ValueError(f"target must hold one class per image ({n}), got {indices.numel()}")
    return indices.long()


def check_target(target: Target, n: int) -> None:
    """Validate ``target``'s type and length for N images before any forward pass."""
    if target is None:
        raise ValueError("target is required: an int, N ints, a Neuron or a callable")
    if isinstance(target, Neuron) or callable(target):
        return
    _class_indices(target, n, "cpu")


def expand_target(target: Target, repeats: int) -> Target:
    """The target for a batch in which every image is repeated ``repeats`` times in a row
    (``inputs.repeat_interleave(repeats, 0)``), as SmoothGrad and IG build."""
    if isinstance(target, Neuron) or callable(target) or isinstance(target, int):
        return target
    return torch.as_tensor(target).repeat_interleave(repeats)


def select_scores(output: torch.Tensor, target: Target) -> torch.Tensor:
    """Scores ``Tensor[N]`` chosen by a non-Neuron target from a model output."""
    n = output.shape[0]
    if callable(target) and not isinstance(target, (int, torch.Tensor)):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
            raise ValueError(f"target callable must return a Tensor[{n}], got "
                             f"{getattr(scores, 'shape', type(scores).__name__)}")
        return scores
    if output.dim() != 2:
        raise ValueError(f"a class target needs a model output [N, classes], got shape "
                         f"{tuple(output.shape)}; use a Neuron or a callable target")
    indices = _class_indices(target, n, output.device)
    classes = output.shape[1]
    if n and (int(indices.min()) < 0 or int(indices.max()) >= classes):
        raise ValueError(f"target classes must lie in [0, {classes}), got {indices.tolist()}")
    return output.gather(1, indices[:, None])[:, 0]


def target_scores(model: nn.Module, inputs: torch.Tensor, target: Target) -> torch.Tensor:
    """Run the model as far as ``target`` needs and return its score per image, ``Tensor[N]``.

    A Neuron target stops the forward pass at its layer.
    """
    if isinstance(target, Neuron):
        activation = forward_to_layers(model, inputs, [target.layer], argument="target.layer")[target.layer]
        return target.value(activation)
    return select_scores(model(inputs), target)
