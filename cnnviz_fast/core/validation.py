"""Argument checks shared by all methods: errors name the argument and what was expected.

One home for each kind of argument (the op layer keeps its own small ``ops/_checks.py``,
since ops must not import core): images, ints, numbers, pairs, baselines, and the
model's device and dtype.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .deferred import defer_check, defers


def check_images(images, argument: str = "inputs", allow_empty: bool = False) -> torch.Tensor:
    """Return ``images`` if it is a finite floating Tensor[N, C, H, W]; else raise ValueError."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{argument} must be a Tensor[N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{argument} must be a 4-D tensor [N, C, H, W], got {images.dim()}-D "
                         f"with shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{argument} must be a floating-point tensor, got {images.dtype}")
    if images.is_meta:
        raise ValueError(f"{argument} is a meta tensor (shape only, no values); pass a tensor with data")
    if images.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{argument} must hold at least one image, got shape {tuple(images.shape)}")
    return check_finite(images, argument)


def check_finite(tensor: torch.Tensor, argument: str) -> torch.Tensor:
    """Return ``tensor`` if it has values (not a meta tensor) and, when floating, no NaN or
    infinity; else raise ValueError naming ``argument``."""
    if tensor.is_meta:
        raise ValueError(f"{argument} is a meta tensor (shape only, no values); pass a tensor with data")
    if not tensor.is_floating_point():
        return tensor
    # a finite sum implies finite values: one cheap reduction (25x faster than isfinite().all()
    # on CPU); the exact check runs only when the sum is not finite (NaN, inf or overflow)
    exact = lambda: bool(torch.isfinite(tensor).all())  # noqa: E731
    if defers(tensor):  # a GPU tensor inside a call: no read here (core/deferred.py)
        defer_check(lambda: ~tensor.sum().isfinite(), lambda: f"{argument} contains NaN or infinite values",
                    confirm=lambda: not exact())
    elif not bool(tensor.sum().isfinite()) and not exact():
        raise ValueError(f"{argument} contains NaN or infinite values")
    return tensor


def is_int(value) -> bool:
    """A Python int that is not a bool (``True`` is an int to Python, never to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, argument: str, minimum: Optional[int] = None) -> int:
    """``value`` if it is an int (>= ``minimum`` when given); else ValueError."""
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{argument} must be an integer{bound}, got {value!r}")
    return value


def check_positive_int(value, argument: str, minimum: int = 1) -> int:
    return check_int(value, argument, minimum)


def check_number(value, argument: str, minimum: float = 0.0, maximum: Optional[float] = None,
                 allow_none: bool = False) -> Optional[float]:
    """``value`` as a finite float in ``[minimum, maximum]`` (None passes with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < minimum or (maximum is not None and value > maximum)):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{argument} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_pair(value, argument: str, minimum: int = 1) -> Tuple[int, int]:
    """An int or a pair of ints (>= minimum) as a tuple (a, b)."""
    try:
        pair = (value, value) if is_int(value) else tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(is_int(v) and v >= minimum for v in pair):
        raise ValueError(f"{argument} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair


def check_baseline(baseline, inputs: Tensor) -> Tensor:
    """The reference input a method compares with: a number, or a tensor broadcastable to
    ``inputs`` ``[N, C, H, W]`` (``[C, H, W]``, a per-channel ``[1, C, 1, 1]``, one per
    image ``[N, C, H, W]``...). Returned as a finite 4-D tensor ``[1 or N, 1 or C, 1 or H,
    1 or W]`` on the inputs' device and dtype (broadcast it where a full copy is needed)."""
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
        raise ValueError(f"baseline must be a number or a Tensor broadcastable to {tuple(inputs.shape)}, "
                         f"got {type(baseline).__name__}")
    if isinstance(baseline, Tensor) and baseline.is_meta:
        raise ValueError("baseline is a meta tensor (shape only, no values); pass a tensor with data")
    base = torch.as_tensor(baseline).to(device=inputs.device, dtype=inputs.dtype)
    try:
        fits = base.dim() <= 4 and torch.broadcast_shapes(base.shape, inputs.shape) == inputs.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"baseline must be broadcastable to inputs {tuple(inputs.shape)}, "
                         f"got shape {tuple(base.shape)}")
    if not bool(torch.isfinite(base).all()):
        raise ValueError("baseline contains NaN or infinite values")
    return base.reshape((1,) * (4 - base.dim()) + tuple(base.shape))


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter or buffer
    (CPU / float32 for a model without any)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def check_model_inputs(model: nn.Module, inputs: Tensor, argument: str = "inputs") -> None:
    """Refuse, with the fix, what would otherwise fail deep inside the forward pass with
    PyTorch's message: a model whose weights are on the meta device, and float64 inputs to a
    model of lower precision ("Input type (double) and bias type (float)"; autocast does not
    cast float64 either). Inputs are never converted silently: the result's dtype is the
    inputs' dtype."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_meta:
            raise ValueError("model has parameters on the meta device (shapes without values); load its "
                             "weights first (model.to_empty(device='cpu') then load_state_dict)")
        if tensor.is_floating_point():
            if inputs.dtype == torch.float64 and tensor.dtype != torch.float64:
                name = str(tensor.dtype).replace("torch.", "")
                raise ValueError(f"{argument} are float64 but the model's parameters are {name}; pass "
                                 f"{argument}.to(torch.{name}) (or convert the model with model.double())")
            return


def check_choice(value, choices, argument: str):
    """``value`` if it is one of ``choices``; else ValueError listing them."""
    if value not in choices:
        shown = list(choices)
        if isinstance(choices, (set, frozenset)):  # no order of its own: show a stable one
            shown = sorted(shown, key=repr)
        raise ValueError(f"{argument} must be one of {shown}, got {value!r}")
    return value


def check_positive_number(value, argument: str, maximum: Optional[float] = None) -> float:
    """``value`` as a finite float > 0 (and <= ``maximum`` when given); else ValueError."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            or (maximum is not None and value > maximum)):
        bound = f"in (0, {maximum}]" if maximum is not None else "> 0"
        raise ValueError(f"{argument} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_device(device, argument: str = "device") -> Optional[torch.device]:
    """``device`` as a ``torch.device`` (None passes); a name torch does not know
    (``"gpu"``) is a ValueError naming ``argument``."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{argument} must be a torch.device or a device name such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None


def check_layer_name(layer, argument: str = "layer") -> str:
    """``layer`` if it is a dotted module name (a non-empty str); else ValueError (a list of
    names, a module object: the function takes one name here)."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"{argument} must be a dotted module name (a str), got {type(layer).__name__} {layer!r}")
    return layer


def check_model_dtype(images: Tensor, dtype: torch.dtype, argument: str) -> Tensor:
    """Refuse floating ``images`` of another dtype than the model's: they would be converted
    (float64 pixels optimised in float32, or half pixels widened) without a word."""
    if images.dtype != dtype:
        have, want = (str(t).replace("torch.", "") for t in (images.dtype, dtype))
        raise ValueError(f"{argument} are {have} but the model's parameters are {want}; pass "
                         f"{argument}.to(torch.{want}) (values are never converted silently)")
    return images


def check_out_folder(out, argument: str = "out") -> "Path":
    """``out`` as a ``Path`` of a folder that exists or can be created: a str or path-like,
    not an existing file, not below a file, and inside a writable folder; else ValueError
    naming ``argument`` (found before any work, not at the first write)."""
    from pathlib import Path
    import os

    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ValueError(f"{argument} must be a folder path (str or pathlib.Path), got {type(out).__name__} {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{argument} {str(path)!r} is an existing file, not a folder")
    existing = path
    while not existing.exists():  # the nearest existing ancestor: where the folder would be made
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{argument} {str(path)!r} lies below {str(existing)!r}, which is a file")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{argument} {str(path)!r}: the folder {str(existing)!r} is not writable")
    return path


def check_image_batch(batch, argument: str = "data") -> Tensor:
    """``batch`` if it is a Tensor of images ``[N, C, H, W]`` with values (N may be 0: a
    dataset's tensor or one of its batches); else ValueError naming ``argument``. Values
    are checked where the batch is used (:func:`check_finite`)."""
    if not isinstance(batch, Tensor):
        raise ValueError(f"{argument} must hold image batches Tensor[N, C, H, W], got {type(batch).__name__}")
    if batch.dim() != 4:
        raise ValueError(f"{argument} must hold images [N, C, H, W], got a {batch.dim()}-D tensor of shape "
                         f"{tuple(batch.shape)}")
    if batch.is_meta:
        raise ValueError(f"{argument} is a meta tensor (shape only, no values); pass a tensor with data")
    return batch
