"""Image parameterizations: what the optimiser actually changes.

Every parameterization holds a batch of N images as trainable tensors (first
dimension = image) and turns them into pixels in [0, 1]:

- :class:`PixelImage`: the pixels themselves, clamped to their bounds after each
  step (the bounds can be an L∞ ball, as adversarial attacks need);
- :class:`FourierImage`: Lucid's parameterization (Olah et al. 2017): a spectrum whose
  frequencies are scaled by 1/f, so all frequencies are equally easy to change,
  colours decorrelated with the square root of ImageNet's colour covariance, and a
  sigmoid (or clamp) into [0, 1].

Both can live at a lower ``resolution`` than the model's input and are upsampled
bilinearly (a strong natural-image prior for small, blurry data such as the digits).
The images at their own resolution are the *native* pixels; step operations such as
blurring act on them (``native()`` / ``set_native()``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.validation import check_pair, is_int

# Square root (via SVD) of ImageNet's RGB colour covariance, as published with Lucid
# (Olah et al., "Feature Visualization", 2017); columns scaled to a maximum norm of 1.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]])
COLOR_DECORRELATION = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()

Size = Union[int, Sequence[int]]


def check_shape(shape, argument: str = "input_shape") -> Tuple[int, int, int, int]:
    """A batch shape (N, C, H, W) of positive ints."""
    shape = tuple(shape)
    if len(shape) != 4 or not all(is_int(v) and v >= 1 for v in shape):
        raise ValueError(f"{argument} must hold 4 positive ints (N, C, H, W), got {shape!r}")
    return shape


class ImageParameterization:
    """Base class: ``parameters()`` are optimised; ``native()`` gives the pixels at the
    parameterization's own resolution, ``upsample(native)`` the model-size pixels
    ``Tensor[N, C, H, W]`` in [0, 1]; ``project()`` runs after every optimiser step (with L-BFGS
    only at the end: a projection between iterations would break its curvature pairs)."""

    shape: Tuple[int, int, int, int]   # model-size (N, C, H, W)
    resolution: Tuple[int, int]        # native (h, w)

    def parameters(self) -> List[Tensor]:
        raise NotImplementedError

    def native(self) -> Tensor:
        raise NotImplementedError

    def set_native(self, pixels: Tensor) -> None:
        raise NotImplementedError

    def project(self) -> None:
        pass

    def upsample(self, native: Tensor) -> Tensor:
        if tuple(native.shape[-2:]) == tuple(self.shape[-2:]):
            return native
        return F.interpolate(native, size=self.shape[-2:], mode="bilinear", align_corners=False)

    def __call__(self) -> Tensor:
        return self.upsample(self.native())


class PixelImage(ImageParameterization):
    """Raw pixels in ``[low, high]`` (default [0, 1]): clamped in the forward pass and
    projected into the bounds after every step (at the end only with L-BFGS).

    Args:
        init: starting pixels ``Tensor[N, C, h, w]`` (copied); ``h, w`` is the native
            resolution.
        size: model-size ``(H, W)`` the pixels are upsampled to (default: ``init``'s).
        low, high: bounds broadcastable to ``init`` (e.g. an ε-ball intersected with
            [0, 1]); the initial pixels are clamped into them.
    """

    def __init__(self, init: Tensor, size: Optional[Size] = None,
                 low: Union[float, Tensor] = 0.0, high: Union[float, Tensor] = 1.0):
        n, c, h, w = init.shape
        self.resolution = (h, w)
        self.shape = (n, c) + (check_pair(size, "size") if size is not None else (h, w))
        self.low, self.high = low, high
        self.pixels = torch.clamp(init.detach().clone(), low, high).requires_grad_(True)

    def parameters(self) -> List[Tensor]:
        return [self.pixels]

    def native(self) -> Tensor:
        # Clamped here too, so pixels are valid between projections (L-BFGS). Pixels on a
        # bound keep their gradient (torch.clamp's would be 0 there and they would stick).
        x = self.pixels
        outside = (x < self.low) | (x > self.high)
        return torch.where(outside, torch.clamp(x, self.low, self.high).detach(), x)

    def set_native(self, pixels: Tensor) -> None:
        with torch.no_grad():
            self.pixels.copy_(torch.clamp(pixels, self.low, self.high))

    def project(self) -> None:
        self.set_native(self.pixels)


class FourierImage(ImageParameterization):
    """Lucid's decorrelated parameterization.

    ``pixels = squash(decorrelate(irfft2(spectrum * scale) / 4))`` with
    ``scale = 1 / max(f, 1/max(h, w)) ** decay_power`` (f: spatial frequency in cycles
    per pixel), ``decorrelate`` the colour matrix :data:`COLOR_DECORRELATION` for
    3-channel images (skipped for other channel counts) and ``squash`` a sigmoid or a
    clamp to [0, 1]. The spectrum starts as Gaussian noise of ``std``
    (a nearly uniform grey image), or as the spectrum of ``init`` pixels.

    Args:
        shape: model-size ``(N, C, H, W)``.
        resolution: native ``(h, w)`` (default ``(H, W)``).
        generator: the random generator of the initial spectrum.
    """

    def __init__(self, shape: Sequence[int], resolution: Optional[Size] = None, *,
                 decay_power: float = 1.0, std: float = 0.01, decorrelate: bool = True,
                 squash: str = "sigmoid", init: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32):
        if squash not in ("sigmoid", "clamp"):
            raise ValueError(f"squash must be 'sigmoid' or 'clamp', got {squash!r}")
        self.shape = check_shape(shape, "shape")
        n, c, height, width = self.shape
        h, w = self.resolution = check_pair(resolution, "resolution") if resolution else (height, width)
        self.squash = squash
        freq = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.rfftfreq(w)[None, :] ** 2)
        self.scale = (1.0 / freq.clamp_min(1.0 / max(h, w)) ** decay_power).to(device, dtype)
        self.color = COLOR_DECORRELATION.to(device, dtype) if decorrelate and c == 3 else None
        spectrum_shape = (n, c, h, w // 2 + 1, 2)
        if init is None:
            spectrum = torch.randn(spectrum_shape, generator=generator, dtype=dtype) * std
        else:  # no random draw, so the generator's later draws (transforms) do not depend on N
            spectrum = torch.zeros(spectrum_shape, dtype=dtype)
        self.spectrum = spectrum.to(device).requires_grad_(True)
        if init is not None:
            self.set_native(init)

    def parameters(self) -> List[Tensor]:
        return [self.spectrum]

    def native(self) -> Tensor:
        h, w = self.resolution
        image = torch.fft.irfft2(torch.view_as_complex(self.spectrum) * self.scale, s=(h, w), norm="ortho") / 4
        if self.color is not None:
            image = torch.einsum("nchw,dc->ndhw", image, self.color)
        return torch.sigmoid(image) if self.squash == "sigmoid" else image.clamp(0, 1)

    def set_native(self, pixels: Tensor) -> None:
        """Set the spectrum so that ``native()`` gives ``pixels`` (clipped into (0, 1))."""
        with torch.no_grad():
            pixels = pixels.to(self.spectrum.device, self.spectrum.dtype)
            if tuple(pixels.shape[-2:]) != self.resolution:
                pixels = F.interpolate(pixels, size=self.resolution, mode="area")
            image = torch.logit(pixels.clamp(1e-4, 1 - 1e-4)) if self.squash == "sigmoid" else pixels
            if self.color is not None:
                image = torch.einsum("nchw,dc->ndhw", image, torch.linalg.inv(self.color))
            spectrum = torch.fft.rfft2(image * 4, norm="ortho") / self.scale
            self.spectrum.copy_(torch.view_as_real(spectrum).expand_as(self.spectrum))


def make_image(parameterization: str, shape: Sequence[int], *, resolution: Optional[Size] = None,
               init: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
               device=None, dtype=torch.float32, init_std: float = 0.01,
               center: Union[float, Tensor] = 0.5) -> ImageParameterization:
    """Build ``"pixels"`` or ``"fourier"`` for a batch ``shape`` (N, C, H, W).

    Without ``init`` the images start at ``center`` plus Gaussian noise of ``init_std``
    (pixels), or as Lucid's near-grey random spectrum (fourier).
    """
    shape = check_shape(shape, "shape")
    n, c, height, width = shape
    h, w = check_pair(resolution, "resolution") if resolution is not None else (height, width)
    if parameterization == "pixels":
        if init is None:
            base = torch.as_tensor(center, dtype=dtype).reshape(1, -1, 1, 1).expand(n, c, h, w)
            init = base + init_std * torch.randn((n, c, h, w), generator=generator, dtype=dtype)
        elif tuple(init.shape[-2:]) != (h, w):
            init = F.interpolate(init, size=(h, w), mode="area")
        return PixelImage(init.to(device, dtype), size=(height, width))
    if parameterization == "fourier":
        return FourierImage(shape, (h, w), init=init, generator=generator, device=device, dtype=dtype,
                            std=init_std)
    raise ValueError(f"parameterization must be 'pixels' or 'fourier', got {parameterization!r}")
