"""Saliency → object mask: seed OpenCV's GrabCut with the most and least salient pixels
(Simonyan et al. 2014, "Deep inside convolutional networks", section 3.1).

OpenCV is an optional dependency: ``pip install cnnviz_fast[segment]``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..core.validation import check_finite, check_positive_int

__all__ = ["saliency_to_mask"]


def saliency_to_mask(
    image: Tensor,
    saliency: Tensor,
    fg_quantile: float = 0.95,
    bg_quantile: float = 0.3,
    iterations: int = 5,
) -> Tensor:
    """Foreground mask of the object a saliency map points at, by GrabCut.

    Pixels whose saliency is at or above its ``fg_quantile`` quantile seed GrabCut as
    sure foreground, those at or below the ``bg_quantile`` quantile as sure background,
    and the rest as probable background, so the foreground colour model starts from the
    most salient pixels only. GrabCut (``cv2.grabCut`` with ``GC_INIT_WITH_MASK``) then
    alternates colour-model fitting and graph cuts for ``iterations`` rounds; its random
    initialisation is seeded (``cv2.setRNGSeed(0)``) so results are reproducible.

    Args:
        image: pixels in [0, 1]: ``Tensor[C, H, W]`` or a batch ``Tensor[N, C, H, W]``,
            ``C`` = 3 (RGB) or 1 (grayscale, replicated to 3 channels). Model inputs that
            are normalised must be mapped back first (``Normalize.inverse``).
        saliency: for ``[C, H, W]`` images ``Tensor[H, W]`` (used as given: higher = more
            foreground; e.g. an occlusion map) or ``Tensor[C', H, W]`` (reduced by the
            max of absolute values over channels, as for gradients); for a batch
            ``Tensor[N, H, W]`` or ``Tensor[N, C', H, W]``.
        fg_quantile: in (0, 1]; bg_quantile: in [0, fg_quantile).
        iterations: GrabCut rounds, >= 1.

    Returns:
        ``Tensor[H, W]`` (``Tensor[N, H, W]`` for a batch), ``torch.bool``, True on the
        foreground, on the image's device.

    Raises:
        ImportError: OpenCV is not installed (``pip install cnnviz_fast[segment]``).
        ValueError: bad shapes or ranges, or a saliency map whose two quantiles coincide
            (e.g. a constant map), which gives GrabCut no seeds to tell apart.
    """
    try:
        import cv2
    except ImportError:
        raise ImportError("saliency_to_mask needs OpenCV (cv2): install it with "
                          "`pip install cnnviz_fast[segment]`") from None
    images, maps, batched = _check_shapes(image, saliency)
    if not (isinstance(fg_quantile, (int, float)) and 0 < fg_quantile <= 1):
        raise ValueError(f"fg_quantile must be a number in (0, 1], got {fg_quantile!r}")
    if not (isinstance(bg_quantile, (int, float)) and 0 <= bg_quantile < fg_quantile):
        raise ValueError(f"bg_quantile must be a number in [0, fg_quantile={fg_quantile}), got {bg_quantile!r}")
    check_positive_int(iterations, "iterations")

    masks = []
    for n, (pixels, sal) in enumerate(zip(images, maps)):
        seeds = _seeds(sal, fg_quantile, bg_quantile, cv2, n if batched else None)
        rgb = np.ascontiguousarray((pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
        background_model = np.zeros((1, 65), np.float64)
        foreground_model = np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)
        cv2.grabCut(rgb, seeds, None, background_model, foreground_model, iterations, cv2.GC_INIT_WITH_MASK)
        masks.append(torch.from_numpy((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)))
    result = torch.stack(masks).to(image.device)
    return result if batched else result[0]


def _check_shapes(image, saliency):
    """Images as CPU float ``[N, 3, H, W]`` in [0, 1], saliency as CPU float64 ``[N, H, W]``."""
    if not isinstance(image, Tensor) or image.dim() not in (3, 4) or not image.is_floating_point():
        raise ValueError(f"image must be a floating Tensor[C, H, W] or Tensor[N, C, H, W] in [0, 1], got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    check_finite(image, "image")  # also refuses a meta tensor before the copy to the CPU
    batched = image.dim() == 4
    images = image.detach().cpu() if batched else image.detach().cpu()[None]
    N, C, H, W = images.shape
    if N == 0 or C not in (1, 3) or H == 0 or W == 0:
        raise ValueError(f"image must have 1 or 3 channels and a non-empty batch and plane, "
                         f"got shape {tuple(image.shape)}")
    low, high = float(images.min()), float(images.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"image must hold pixels in [0, 1], got values in [{low:.3g}, {high:.3g}] "
                         "(map normalised model inputs back with Normalize.inverse)")
    images = images.clamp(0, 1).expand(N, 3, H, W)

    expected = "[N, H, W] or [N, C, H, W]" if batched else "[H, W] or [C, H, W]"
    if not isinstance(saliency, Tensor) or saliency.dim() - batched not in (2, 3):
        raise ValueError(f"saliency must be a Tensor{expected} for image {tuple(image.shape)}, "
                         f"got {getattr(saliency, 'shape', type(saliency).__name__)}")
    check_finite(saliency, "saliency")
    maps = saliency.detach().cpu().double()
    if not batched:
        maps = maps[None]
    if maps.dim() == 4:
        maps = maps.abs().amax(1)
    if tuple(maps.shape) != (N, H, W):
        raise ValueError(f"saliency must be a Tensor{expected} matching image {tuple(image.shape)}, "
                         f"got {tuple(saliency.shape)}")
    return images, maps, batched


def _seeds(saliency: Tensor, fg_quantile: float, bg_quantile: float, cv2, index) -> np.ndarray:
    """GrabCut's initial label mask ``uint8[H, W]`` from one saliency map."""
    values = saliency.numpy()
    high, low = np.quantile(values, [fg_quantile, bg_quantile])
    if high <= low:
        which = "" if index is None else f" (image {index})"
        raise ValueError(f"saliency{which} has no spread to seed GrabCut: its {fg_quantile} and "
                         f"{bg_quantile} quantiles are both {high:.6g} (a constant or nearly constant "
                         "map, or one that is mostly ties); use a map with distinct high and low values "
                         "or move fg_quantile / bg_quantile")
    seeds = np.full(values.shape, cv2.GC_PR_BGD, np.uint8)
    seeds[values >= high] = cv2.GC_FGD
    seeds[values <= low] = cv2.GC_BGD
    return seeds
