"""Argument checks shared by all methods: errors name the argument and what was expected."""
from __future__ import annotations

import torch


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
    # a finite sum implies finite values: one cheap reduction (25x faster than isfinite().all()
    # on CPU); the exact check runs only when the sum is not finite (NaN, inf or overflow)
    if not bool(images.sum().isfinite()) and not bool(torch.isfinite(images).all()):
        raise ValueError(f"{argument} contains NaN or infinite values")
    return images


def check_positive_int(value, argument: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    return value


def check_pair(value, argument: str, minimum: int = 1):
    """An int or a pair of ints (>= minimum) as a tuple (a, b)."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{argument} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair
