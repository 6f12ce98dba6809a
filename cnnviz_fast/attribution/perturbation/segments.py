"""Segments: the features the segment-based perturbation methods switch on and off.

A segmentation is a label map ``LongTensor[N, H, W]`` (or ``[H, W]`` shared by every
image): pixel ``(n, y, x)`` belongs to segment ``segments[n, y, x]``; each image's ids are
``0 .. K_n - 1`` with every id present (the methods then treat segment ``k`` as feature
``k``, as Captum's ``feature_mask`` does). Sources: a user's map, a grid
(:func:`grid_segments`, ``"grid:8"``) or SLIC superpixels (:func:`slic_segments`,
``"slic:100"``, scikit-image). :func:`parse_segments` reads the strings the CLI passes.

Baselines: a number, a tensor broadcastable to the inputs, or ``"blur"`` (a Gaussian-blurred
copy, :func:`gaussian_blur`).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.validation import check_baseline, check_images, is_int

__all__ = ["BLUR_SIGMA", "gaussian_blur", "grid_segments", "parse_baseline", "parse_segments", "resolve_baseline",
           "resolve_segments", "segment_counts", "slic_segments"]

Segments = Union[Tensor, str]

# "blur" = a Gaussian blur of this standard deviation (pixels); RISE's blurred insertion
# baseline is of this order (an 11-px kernel, sigma 5)
BLUR_SIGMA = 5.0
SLIC_DEFAULT = 100
GRID_DEFAULT = 8


def grid_segments(H: int, W: int, cells: Union[int, Tuple[int, int]] = GRID_DEFAULT,
                  device=None) -> Tensor:
    """A ``rows x cols`` grid of rectangles as a label map ``LongTensor[H, W]`` (row-major ids;
    cell boundaries at ``floor(i * H / rows)``, so cells differ by at most one pixel)."""
    rows, cols = (cells, cells) if is_int(cells) else tuple(cells)
    if not (is_int(rows) and is_int(cols) and 1 <= rows <= H and 1 <= cols <= W):
        raise ValueError(f"segments: a grid needs 1 <= cells <= the image size ({H}, {W}), got {cells!r}")
    r = torch.arange(H, device=device) * rows // H
    c = torch.arange(W, device=device) * cols // W
    return r[:, None] * cols + c[None, :]


def slic_segments(pixels: Tensor, n_segments: int = SLIC_DEFAULT, compactness: float = 10.0,
                  sigma: float = 0.0) -> Tensor:
    """SLIC superpixels (scikit-image ``slic``, ``start_label=0``) of each image of ``pixels``
    ``Tensor[N, C, H, W]`` (channels last to scikit-image, in float64; 3 channels are taken as
    RGB and converted to Lab, as scikit-image does): ``LongTensor[N, H, W]`` on the pixels'
    device, ids renumbered ``0 .. K_n - 1`` in order of first appearance if scikit-image left
    gaps. The same call as Quantus' IROF segmentation when ``pixels`` are its inputs."""
    from skimage.segmentation import slic  # optional dependency: only SLIC needs it

    check_images(pixels, "pixels")
    if not is_int(n_segments) or n_segments < 1:
        raise ValueError(f"n_segments must be an integer >= 1, got {n_segments!r}")
    maps = []
    for image in pixels.detach().cpu().double().permute(0, 2, 3, 1).numpy():
        labels = slic(image, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0)
        maps.append(_consecutive(torch.from_numpy(labels).long()))
    return torch.stack(maps).to(pixels.device)


def _consecutive(labels: Tensor) -> Tensor:
    """Ids renumbered ``0 .. K - 1`` (order of the sorted ids), unchanged when already so."""
    ids, inverse = torch.unique(labels, return_inverse=True)
    if ids.numel() == int(ids[-1]) + 1 and int(ids[0]) == 0:
        return labels
    return inverse.reshape(labels.shape)


def parse_segments(text: str) -> Tuple[str, int]:
    """``"slic:100"`` -> ``("slic", 100)``, ``"grid:8"`` -> ``("grid", 8)``; ``"slic"`` / ``"grid"``
    take the defaults (100 superpixels, an 8 x 8 grid). The CLI's ``--segments``."""
    if not isinstance(text, str):
        raise ValueError(f"segments must be a LongTensor[N, H, W] / [H, W] or 'slic:K' / 'grid:K', got "
                         f"{type(text).__name__}")
    kind, _, count = text.strip().partition(":")
    kind = kind.lower()
    if kind not in ("slic", "grid"):
        raise ValueError(f"segments must be 'slic:K' or 'grid:K' (or a label map), got {text!r}")
    try:
        value = int(count) if count else (SLIC_DEFAULT if kind == "slic" else GRID_DEFAULT)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"segments: the count after {kind}: must be a positive integer, got {text!r}")
    return kind, value


def resolve_segments(segments: Segments, inputs: Tensor, argument: str = "segments") -> Tensor:
    """The label map ``LongTensor[N, H, W]`` on the inputs' device for ``inputs``
    ``[N, C, H, W]``: a given map checked (shape ``[N, H, W]``, ``[N, 1, H, W]`` or ``[H, W]``;
    integer ids, none negative, each image's ids ``0 .. K_n - 1`` all present), or one made
    from ``"grid:K"`` / ``"slic:K"``. SLIC runs on each image rescaled to [0, 1] (its min and
    max over all channels), since the inputs are model inputs, not pixels."""
    N, _, H, W = inputs.shape
    if isinstance(segments, str):
        kind, count = parse_segments(segments)
        if kind == "grid":
            return grid_segments(H, W, min(count, H, W), inputs.device).expand(N, H, W).contiguous()
        flat = inputs.detach().flatten(1)
        low, high = flat.amin(1)[:, None, None, None], flat.amax(1)[:, None, None, None]
        return slic_segments((inputs.detach() - low) / (high - low).clamp_min(1e-12), count)
    if not isinstance(segments, Tensor):
        raise ValueError(f"{argument} must be a LongTensor[N, H, W] / [H, W] or 'slic:K' / 'grid:K', got "
                         f"{type(segments).__name__}")
    labels = segments
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() == 2:
        labels = labels.unsqueeze(0).expand(N, *labels.shape)
    if labels.dim() != 3 or tuple(labels.shape) != (N, H, W):
        raise ValueError(f"{argument} must have shape [N, H, W] = {(N, H, W)} or [H, W] = {(H, W)}, got "
                         f"{tuple(segments.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{argument} must hold integer segment ids, got {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError(f"{argument} is empty (shape {tuple(segments.shape)})")
    labels = labels.to(device=inputs.device, dtype=torch.long)
    low = int(labels.min())
    if low < 0:
        raise ValueError(f"{argument} must hold ids >= 0, got {low}")
    counts = segment_counts(labels)
    for n, count in enumerate(counts):
        if bool((count == 0).any()):
            missing = int((count == 0).nonzero()[0])
            raise ValueError(f"{argument}: image {n} has ids up to {count.numel() - 1} but segment {missing} is "
                             f"empty (no pixel); number the segments of each image 0 .. K-1")
    return labels.contiguous()


def segment_counts(segments: Tensor) -> List[Tensor]:
    """Pixels per segment of each image: ``[LongTensor[K_n]]`` (``K_n`` = its largest id + 1)."""
    return [torch.bincount(s.flatten()) for s in segments]


def parse_baseline(text):
    """A CLI ``--baseline``: a number, or ``"blur"`` / ``"blur:SIGMA"``."""
    if not isinstance(text, str):
        return text
    if text.strip().lower().startswith("blur"):
        return text.strip().lower()
    return float(text)


def gaussian_blur(inputs: Tensor, sigma: float = BLUR_SIGMA) -> Tensor:
    """A Gaussian-blurred copy of ``inputs`` ``[N, C, H, W]`` (each channel separately; a
    separable kernel of ``2 * ceil(3 * sigma) + 1`` taps, reflected at the borders)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"baseline: the blur's sigma must be a number > 0, got {sigma!r}")
    N, C, H, W = inputs.shape
    radius = int(math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=inputs.device, dtype=inputs.dtype)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = inputs.reshape(N * C, 1, H, W)
    # reflection needs the pad smaller than the side: fall back to edge replication
    mode_h = "reflect" if radius < H else "replicate"
    mode_w = "reflect" if radius < W else "replicate"
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode_h), kernel.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode_w), kernel.view(1, 1, 1, -1))
    return x.reshape(N, C, H, W)


def resolve_baseline(baseline, inputs: Tensor) -> Tensor:
    """The baseline as a tensor broadcastable to ``inputs``: a number or a tensor (checked by
    :func:`~cnnviz_fast.core.validation.check_baseline`), or ``"blur"`` / ``"blur:SIGMA"``."""
    if isinstance(baseline, str):
        kind, _, sigma = baseline.strip().lower().partition(":")
        if kind != "blur":
            raise ValueError(f"baseline must be a number, a tensor or 'blur' / 'blur:SIGMA', got {baseline!r}")
        try:
            value = float(sigma) if sigma else BLUR_SIGMA
        except ValueError:
            raise ValueError(f"baseline: 'blur:SIGMA' needs a number, got {baseline!r}") from None
        with torch.no_grad():
            return gaussian_blur(inputs.detach(), value)
    return check_baseline(baseline, inputs)
