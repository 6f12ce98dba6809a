"""What to explain: one ``target`` argument with the same meaning in every method.

A target is
- an ``int``: the same class score (pre-softmax output column) for every image;
- a sequence / 1-D tensor of N ints: one class per image;
- a :class:`Neuron`: one intermediate unit (or a channel's spatial mean);
- a callable mapping the model output ``Tensor[N, ...]`` to ``Tensor[N]``;
- ``"predicted"``: the top class of each input, read from the same forward pass whose
  score is explained (a classifier's ``[N, classes]`` output), so prediction and
  explanation cost one forward pass.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .deferred import defer_check, defers
from .layers import capture_layers, forward_to_layers


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
        for name in ("channel", "y", "x"):
            value = getattr(self, name)
            if value is None and name != "channel":
                continue
            try:  # ints and int-like values (numpy ints, 0-dim integer tensors), stored as int
                if isinstance(value, bool):
                    raise TypeError
                object.__setattr__(self, name, operator.index(value))
            except TypeError:
                raise ValueError(f"Neuron.{name} must be an int, got {value!r}") from None

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


Target = Union[int, Sequence[int], torch.Tensor, Neuron, Callable[[torch.Tensor], torch.Tensor], str]

PREDICTED = "predicted"
_EXPECTED = "an int, N ints, a Neuron, a callable or 'predicted'"


def is_predicted(target) -> bool:
    """Whether ``target`` asks for each input's top class."""
    return isinstance(target, str) and target == PREDICTED


def target_layer(target: Target) -> Optional[str]:
    """The layer a target reads (a Neuron's), or None when it reads the model output."""
    return target.layer if isinstance(target, Neuron) else None


def _class_indices(target, n: int, device, classes: Optional[int] = None) -> torch.Tensor:
    """``Tensor[n]`` of class indices on ``device`` (None: where they are); with ``classes``,
    each checked to lie in ``[0, classes)``. The checks run where the target is given (ints,
    lists and CPU tensors on the host), so that a GPU model is not stopped between its
    forward and backward passes; a target already on the GPU is checked on the device inside
    a call (:mod:`.deferred`: the verdict is read at the call's end, the indices clamped
    meanwhile so that no kernel reads out of range), else with one read back."""
    if isinstance(target, (bool, str)):
        raise ValueError(f"target must be {_EXPECTED}, got {target!r}")
    if isinstance(target, int):
        if classes is not None and not 0 <= target < classes:
            raise ValueError(f"target classes must lie in [0, {classes}), got {target}")
        return torch.full((n,), target, dtype=torch.long, device=device)
    if isinstance(target, torch.Tensor) and target.is_meta:
        raise ValueError("target is a meta tensor (shape only, no values); pass the classes as ints or a tensor "
                         "with data")
    try:  # a dict, a set, ragged sequences: not classes
        indices = None if isinstance(target, (dict, set, frozenset)) else torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        indices = None
    if indices is None:
        raise ValueError(f"target must be {_EXPECTED}, got {type(target).__name__} {target!r}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dim() != 1:
        raise ValueError(f"target must be an int or a 1-D sequence of ints, got {target!r}")
    if indices.numel() != n:
        raise ValueError(f"target must hold one class per image ({n}), got {indices.numel()}")
    given = indices
    message = lambda: f"target classes must lie in [0, {classes}), got {given.tolist()}"  # noqa: E731
    if classes is not None and n and defers(indices):
        def failed():
            low, high = given.aminmax()
            return (low < 0) | (high >= classes)
        defer_check(failed, message)
        indices = indices.clamp(0, classes - 1)
    elif classes is not None and n:
        low, high = indices.aminmax()
        if int(low) < 0 or int(high) >= classes:
            raise ValueError(message())
    if device is None:
        return indices
    indices = indices.to(dtype=torch.long)
    if indices.device.type == "cpu" and torch.device(device).type == "cuda":
        # from pinned memory, without blocking: the host does not wait for the GPU's queue
        return indices.pin_memory().to(device, non_blocking=True)
    return indices.to(device=device)


def check_target(target: Target, n: int, allow_predicted: bool = True) -> None:
    """Validate ``target``'s type and length for N images before any forward pass."""
    if target is None:
        raise ValueError(f"target is required: {_EXPECTED}")
    if is_predicted(target):
        if not allow_predicted:
            raise ValueError("target='predicted' needs inputs to predict from; give the class(es) explicitly")
        return
    if isinstance(target, Neuron) or _is_function(target):
        return
    _class_indices(target, n, None)  # types and length only: a GPU target stays there, unread


def _is_function(target) -> bool:
    return callable(target) and not isinstance(target, (int, torch.Tensor, Neuron))


def target_for_rows(target: Target, images: torch.Tensor) -> Target:
    """The target for a batch whose row ``r`` is a copy (noisy, interpolated, occluded) of
    image ``images[r]`` (``images``: a LongTensor of image indices). Per-image classes are
    gathered; every other kind of target applies to each row as it is."""
    if isinstance(target, (int, Neuron, str)) or _is_function(target):
        return target
    return torch.as_tensor(target, device=images.device)[images]


def resolve_target(target: Target, output) -> Target:
    """``"predicted"`` → the top class of each row of ``output`` (``LongTensor[N]``), so that
    later passes over copies of the inputs explain the clean inputs' prediction; every
    other target is returned unchanged."""
    if not is_predicted(target):
        return target
    return _checked_logits(output, target).argmax(1)


def _checked_logits(output, target) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"target {target!r} needs a model output Tensor[N, classes], got "
                         f"{type(output).__name__}; use a callable target that picks the score from it")
    if output.dim() != 2:
        raise ValueError(f"target {target!r} needs a model output [N, classes], got shape "
                         f"{tuple(output.shape)}; use a Neuron or a callable target")
    return output


def select_scores(output: torch.Tensor, target: Target) -> torch.Tensor:
    """Scores ``Tensor[N]`` chosen by a non-Neuron target from a model output."""
    if _is_function(target):
        scores = target(output)
        n = output.shape[0] if isinstance(output, torch.Tensor) else None
        if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or (n is not None and scores.shape[0] != n):
            raise ValueError(f"target callable must return a Tensor[{n or 'N'}] (one score per input), got "
                             f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
        return scores
    output = _checked_logits(output, target)
    n = output.shape[0]
    if is_predicted(target):
        return output.gather(1, output.argmax(1, keepdim=True))[:, 0]
    indices = _class_indices(target, n, output.device, classes=output.shape[1])
    return output.gather(1, indices[:, None])[:, 0]


def target_scores(model: nn.Module, inputs: torch.Tensor, target: Target, keep_output: bool = False):
    """Run the model as far as ``target`` needs and return its score per image, ``Tensor[N]``.

    A Neuron target stops the forward pass at its layer, unless ``keep_output``: then the
    whole model runs and ``(scores, output)`` is returned (the output of that same pass).
    """
    if isinstance(target, Neuron):
        if not keep_output:
            activation = forward_to_layers(model, inputs, [target.layer], argument="target.layer")[target.layer]
            return target.value(activation)
        with capture_layers(model, [target.layer], argument="target.layer") as captured:
            output = model(inputs)
        if target.layer not in captured:
            raise ValueError(f"target.layer {target.layer!r} was not executed during the forward pass of "
                             f"{type(model).__name__}")
        return target.value(captured[target.layer]), output
    output = model(inputs)
    scores = select_scores(output, target)
    return (scores, output) if keep_output else scores
