"""Per-channel normalisation that knows its inverse, so methods can work in pixel space."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for images in pixel space [0, 1].

    ``inverse`` maps model inputs back to pixels; ``pixel_range`` gives the valid
    model-input interval per channel ([N, C, 1, 1]-broadcastable tensors).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean.to(pixels)) / self.std.to(pixels)

    def inverse(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * self.std.to(inputs) + self.mean.to(inputs)

    def pixel_range(self, like: torch.Tensor):
        """(low, high) bounds of model inputs that correspond to pixels in [0, 1]."""
        mean, std = self.mean.to(like), self.std.to(like)
        return -mean / std, (1 - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
