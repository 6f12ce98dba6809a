"""Natural-image priors for the synthesis engine, in three composable kinds.

- *Penalties* ``R(pixels) -> Tensor[N]`` are added to each image's loss and
  differentiated: :class:`L2` (Simonyan et al. 2014), :class:`TotalVariation` and
  :class:`AlphaNorm` (Mahendran & Vedaldi 2015).
- *Step operations* ``op(native, grad, step) -> new native pixels or None`` run on
  the pixels after each optimiser step (Yosinski et al. 2015): :class:`Decay`
  (L2 decay), :class:`Blur` (Gaussian blur every k steps), :class:`ClipSmallNorm`
  and :class:`ClipSmallContribution`.
- *Transforms* ``t(pixels, generator) -> pixels`` are random, differentiable and
  applied between the image and the model on every step, so the image must work
  under small shifts, scalings and rotations (Mordvintsev et al. 2015, Olah et al.
  2017): :class:`Jitter`, :class:`RandomAffine`.

Pixels are in [0, 1]; ``center`` is the pixel value that means "nothing" (the
value decays and clipping pull towards): e.g. the dataset's mean colour, or 0 for a
dark background.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.validation import check_int, check_number

Center = Union[float, Sequence[float], Tensor]


def _center(center: Center, like: Tensor) -> Tensor:
    return torch.as_tensor(center, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


# --------------------------------------------------------------------------- penalties
class L2:
    """``weight * mean((pixels - center)^2)`` per image."""

    def __init__(self, weight: float, center: Center = 0.5):
        self.weight, self.center = check_number(weight, "L2 weight"), center

    def __call__(self, pixels: Tensor) -> Tensor:
        return self.weight * (pixels - _center(self.center, pixels)).pow(2).flatten(1).mean(1)


class TotalVariation:
    """``weight * mean((dx^2 + dy^2)^(beta/2))`` per image (finite differences to the
    right and below; ``beta=2`` the usual quadratic TV, ``beta=1`` the edge-preserving one)."""

    def __init__(self, weight: float, beta: float = 2.0):
        self.weight, self.beta = check_number(weight, "TotalVariation weight"), float(beta)

    def __call__(self, pixels: Tensor) -> Tensor:
        dy = pixels[..., 1:, :-1] - pixels[..., :-1, :-1]
        dx = pixels[..., :-1, 1:] - pixels[..., :-1, :-1]
        squared = dx.pow(2) + dy.pow(2)
        tv = squared if self.beta == 2 else (squared + 1e-8).pow(self.beta / 2)
        # an image 1 pixel high or wide has no pairs of neighbours: its variation is 0
        return self.weight * tv.flatten(1).sum(1) / max(1, tv[0].numel())


class AlphaNorm:
    """``weight * mean(|pixels - center|^alpha)`` per image (Mahendran & Vedaldi use
    alpha = 6: it keeps pixels in range without pulling them all to the centre)."""

    def __init__(self, weight: float, alpha: float = 6.0, center: Center = 0.5):
        self.weight, self.alpha, self.center = check_number(weight, "AlphaNorm weight"), float(alpha), center

    def __call__(self, pixels: Tensor) -> Tensor:
        return self.weight * (pixels - _center(self.center, pixels)).abs().pow(self.alpha).flatten(1).mean(1)


# --------------------------------------------------------------------------- step operations
class Decay:
    """L2 decay: ``x <- center + (1 - rate) * (x - center)`` after every step."""

    needs_grad = False

    def __init__(self, rate: float, center: Center = 0.5):
        self.rate, self.center = check_number(rate, "Decay rate"), center

    def __call__(self, pixels: Tensor, grad: Optional[Tensor], step: int) -> Tensor:
        center = _center(self.center, pixels)
        return center + (1 - self.rate) * (pixels - center)


def gaussian_blur(pixels: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``Tensor[N, C, H, W]`` (reflected borders)."""
    radius = min(max(1, math.ceil(3 * sigma)), min(pixels.shape[-2:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=pixels.dtype, device=pixels.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = pixels.shape[1]
    out = F.pad(pixels, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class Blur:
    """Gaussian blur of standard deviation ``sigma`` pixels every ``every`` steps."""

    needs_grad = False

    def __init__(self, sigma: float = 0.5, every: int = 4):
        if not sigma > 0:
            raise ValueError(f"Blur sigma must be > 0, got {sigma!r}")
        check_int(every, "Blur every", minimum=1)
        self.sigma, self.every = float(sigma), every

    def __call__(self, pixels: Tensor, grad: Optional[Tensor], step: int) -> Optional[Tensor]:
        return gaussian_blur(pixels, self.sigma) if (step + 1) % self.every == 0 else None


def _clip_below(pixels: Tensor, score: Tensor, percentile: float, center: Center) -> Tensor:
    """Set pixels whose ``score [N, H, W]`` is below the per-image percentile to ``center``."""
    threshold = torch.quantile(score.flatten(1), percentile / 100, dim=1).view(-1, 1, 1)
    keep = (score >= threshold).unsqueeze(1)
    return torch.where(keep, pixels, _center(center, pixels).expand_as(pixels))


def _check_percentile(value) -> float:
    return check_number(value, "percentile", 0, 100)


class ClipSmallNorm:
    """Set pixels whose colour vector ``||x - center||`` is in the lowest ``percentile``
    percent of the image to ``center`` (Yosinski et al. 2015)."""

    needs_grad = False

    def __init__(self, percentile: float, center: Center = 0.5):
        self.percentile, self.center = _check_percentile(percentile), center

    def __call__(self, pixels: Tensor, grad: Optional[Tensor], step: int) -> Tensor:
        norm = (pixels - _center(self.center, pixels)).norm(dim=1)
        return _clip_below(pixels, norm, self.percentile, self.center)


class ClipSmallContribution:
    """Set pixels whose contribution ``|sum_c (x - center) * dLoss/dx|`` (the linear
    estimate of the loss change if the pixel were set to ``center``) is in the lowest
    ``percentile`` percent to ``center`` (Yosinski et al. 2015)."""

    needs_grad = True

    def __init__(self, percentile: float, center: Center = 0.5):
        self.percentile, self.center = _check_percentile(percentile), center

    def __call__(self, pixels: Tensor, grad: Optional[Tensor], step: int) -> Tensor:
        contribution = ((pixels - _center(self.center, pixels)) * grad).sum(1).abs()
        return _clip_below(pixels, contribution, self.percentile, self.center)


# --------------------------------------------------------------------------- transforms
def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator))


class Jitter:
    """Shift the whole batch by a random ``(dy, dx)`` in ``[-pixels, pixels]`` (wrapping round)."""

    def __init__(self, pixels: int = 2):
        check_int(pixels, "Jitter pixels", minimum=0)
        self.pixels = pixels

    def __call__(self, pixels: Tensor, generator: torch.Generator) -> Tensor:
        dy, dx = _randint(-self.pixels, self.pixels, generator), _randint(-self.pixels, self.pixels, generator)
        return torch.roll(pixels, (dy, dx), (2, 3)) if dy or dx else pixels


class RandomAffine:
    """Scale the batch by a random factor in ``scale`` and rotate it by a random angle in
    ``[-degrees, degrees]`` about its centre (bilinear, borders replicated)."""

    def __init__(self, scale: Sequence[float] = (0.95, 1.05), degrees: float = 5.0):
        low, high = scale
        if not 0 < low <= high:
            raise ValueError(f"RandomAffine scale must be (low, high) with 0 < low <= high, got {scale!r}")
        self.scale, self.degrees = (float(low), float(high)), float(degrees)

    def __call__(self, pixels: Tensor, generator: torch.Generator) -> Tensor:
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        factor = self.scale[0] + u[0] * (self.scale[1] - self.scale[0])
        return self.apply(pixels, factor, (2 * u[1] - 1) * self.degrees)

    @staticmethod
    def apply(pixels: Tensor, factor: float, degrees: float) -> Tensor:
        """Scale the batch by ``factor`` and rotate it by ``degrees`` about its centre."""
        if factor == 1 and degrees == 0:
            return pixels
        angle = math.radians(degrees)
        cos, sin = math.cos(angle) / factor, math.sin(angle) / factor
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=pixels.dtype, device=pixels.device)
        grid = F.affine_grid(theta.expand(pixels.shape[0], 2, 3), list(pixels.shape), align_corners=False)
        return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
