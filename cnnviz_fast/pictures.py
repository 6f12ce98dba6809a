"""Turning tensors into pictures: grids, heatmap overlays, PIL images and PNG files.

Images are ``Tensor[C, H, W]`` or ``Tensor[N, C, H, W]`` with C in {1, 3}; values are
shown as they are when they lie in [0, 1] and min-max scaled otherwise (or always,
with ``scale=True``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import PIL.Image

# Anchor colours of matplotlib's "inferno" and "jet" maps (interpolated linearly), so
# heatmaps need no matplotlib.
_COLORMAPS = {
    "inferno": [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                (245, 125, 21), (250, 193, 39), (252, 255, 164)],
    "jet": [(0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128),
            (255, 255, 0), (255, 128, 0), (255, 0, 0), (128, 0, 0)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}


def scale_to_unit(t: torch.Tensor, per_image: bool = True, eps: float = 1e-12) -> torch.Tensor:
    """Min-max scale to [0, 1] (per image of a batch when ``per_image``)."""
    t = t.detach().float()
    if per_image and t.dim() == 4:
        flat = t.reshape(t.shape[0], -1)
        low, high = flat.min(1)[0].view(-1, 1, 1, 1), flat.max(1)[0].view(-1, 1, 1, 1)
    else:
        low, high = t.min(), t.max()
    return (t - low) / (high - low).clamp_min(eps)


def _as_display(images: torch.Tensor, scale: Optional[bool]) -> torch.Tensor:
    images = images.detach().float().cpu()
    if scale is None:
        scale = images.numel() > 0 and (images.min() < 0 or images.max() > 1)
    return scale_to_unit(images) if scale else images.clamp(0, 1)


def colorize(heatmap: torch.Tensor, colormap: str = "inferno") -> torch.Tensor:
    """Map a ``Tensor[H, W]`` (min-max scaled) to an RGB ``Tensor[3, H, W]`` in [0, 1]."""
    if colormap not in _COLORMAPS:
        raise ValueError(f"colormap must be one of {sorted(_COLORMAPS)}, got {colormap!r}")
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be a 2-D tensor [H, W], got shape {tuple(heatmap.shape)}")
    anchors = torch.tensor(_COLORMAPS[colormap], dtype=torch.float32) / 255
    value = scale_to_unit(heatmap, per_image=False).cpu() * (len(anchors) - 1)
    low = value.floor().long().clamp(max=len(anchors) - 2)
    frac = (value - low).unsqueeze(-1)
    rgb = anchors[low] * (1 - frac) + anchors[low + 1] * frac
    return rgb.permute(2, 0, 1)


def heatmap_overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5,
                    colormap: str = "inferno") -> torch.Tensor:
    """Blend a coloured heatmap over an image: ``Tensor[3, H, W]`` in [0, 1].

    ``image`` is ``[C, H, W]`` or ``[1, C, H, W]`` (C = 1 or 3); ``heatmap`` is
    ``[H', W']`` (or with leading singleton dims), resized bilinearly to the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    image = image.detach()
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C in (1, 3), got shape {tuple(image.shape)}")
    heatmap = heatmap.detach().float()
    while heatmap.dim() > 2 and heatmap.shape[0] == 1:
        heatmap = heatmap[0]
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be [H, W], got shape {tuple(heatmap.shape)}")
    if heatmap.shape != image.shape[1:]:
        heatmap = F.interpolate(heatmap[None, None], size=image.shape[1:], mode="bilinear",
                                align_corners=False)[0, 0]
    rgb = _as_display(image, None).expand(3, -1, -1)
    return (1 - alpha) * rgb + alpha * colorize(heatmap, colormap)


def image_grid(images: Union[torch.Tensor, Sequence[torch.Tensor]], nrow: Optional[int] = None,
               padding: int = 2, pad_value: float = 1.0, scale: Optional[bool] = None,
               per_image: bool = True) -> torch.Tensor:
    """Tile ``Tensor[N, C, H, W]`` (or a list of same-size images) into ``Tensor[C, H', W']``.

    ``nrow`` images per row (default ≈ √N); each tile min-max scaled when ``per_image``
    and values leave [0, 1] (``scale=None``), always when ``scale=True``.
    """
    if not isinstance(images, torch.Tensor):
        images = torch.stack([im[0] if im.dim() == 4 else im for im in images])
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty Tensor[N, C, H, W], got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if scale or (scale is None and (images.min() < 0 or images.max() > 1)):
        images = scale_to_unit(images, per_image=per_image)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for index in range(n):
        top, left = padding + (index // nrow) * (h + padding), padding + (index % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[index]
    return grid


def to_pil(image: torch.Tensor, scale: Optional[bool] = None):
    """A ``PIL.Image`` from ``Tensor[C, H, W]``/``[1, C, H, W]``/``[H, W]`` (C = 1 or 3)."""
    from PIL import Image

    image = image.detach()
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C in (1, 3), got shape {tuple(image.shape)}")
    array = (_as_display(image, scale) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else np.ascontiguousarray(array))


def save_png(image: torch.Tensor, path: Union[str, Path], scale: Optional[bool] = None,
             upscale: int = 1) -> Path:
    """Save an image tensor as PNG (nearest-neighbour ``upscale`` for tiny images)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = to_pil(image, scale)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    picture.save(path)
    return path


def render_figure(draw: Callable, size: Tuple[float, float], dpi: int = 100) -> "PIL.Image.Image":
    """``draw(figure)`` on a matplotlib Figure of ``size`` inches, rendered off-screen (a bare
    Figure on an Agg canvas: no pyplot, so the user's matplotlib backend is untouched) and
    returned as an RGB ``PIL.Image``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    figure = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    draw(figure)
    figure.tight_layout()
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
