"""Argument checks shared by all methods: errors name the argument and what was expected."""
from __future__ import annotations

import itertools
import torch
from torch import nn


def check_images(images, argument: str = "inputs", allow_empty: bool = False) -> torch.Tensor:
    """Return ``images`` if it is a finite floating Tensor[N, C, H, W]; else raise ValueError."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{argument} must be a Tensor[N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{argument} must be a 4-D tensor [N, C, H, W], got {images.dim()}-D "
                         f"with shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{argument} must be a floating-point tensor, got {images.dtype}")
    if images.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{argument} must hold at least one image, got shape {tuple(images.shape)}")
    check_finite(images, argument)
    return images


def check_finite(tensor: torch.Tensor, argument: str) -> torch.Tensor:
    """Return ``tensor`` if it has values (not a meta tensor) and, when floating, no NaN or
    infinity; else raise ValueError naming ``argument``."""
    if tensor.is_meta:
        raise ValueError(f"{argument} is a meta tensor (a shape without values); pass a tensor on a real "
                         f"device (e.g. the CPU)")
    if not tensor.is_floating_point():
        return tensor
    # a finite sum implies finite values: one cheap reduction (25x faster than isfinite().all()
    # on CPU); the exact check runs only when the sum is not finite (NaN, inf or overflow)
    if not bool(tensor.sum().isfinite()) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{argument} contains NaN or infinite values")
    return tensor


def check_model_inputs(model: nn.Module, inputs: torch.Tensor, argument: str = "inputs") -> None:
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


def check_positive_int(value, argument: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    return value


def check_pair(value, argument: str, minimum: int = 1):
    """An int or a pair of ints (>= minimum) as a tuple (a, b)."""
    try:
        pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    except TypeError:  # None, a float, ...: not an int and not iterable
        pair = ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{argument} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair
