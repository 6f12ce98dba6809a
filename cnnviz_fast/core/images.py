"""One preprocessing policy for every image that enters a model from outside: how a photo
of any shape becomes ``size × size`` pixels.

- ``"crop"`` (default): shorter side resized to ``size``, centre square cropped (torchvision's
  ``Resize(size) + CenterCrop(size)``, what ImageNet models are evaluated with);
- ``"squash"``: resized to ``size × size``, aspect ratio not kept;
- ``"pad"``: longer side resized to ``size``, centred on a black square.

:func:`fit_image` applies it to a Pillow image (files: CLI, report, pipeline, service),
:func:`fit_pixels` to a float tensor (bundled photos, JSON pixels, GPU-decoded batches);
both resize bilinearly with antialiasing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RESIZE_POLICIES = ("crop", "squash", "pad")


def check_resize(resize: str, argument: str = "resize") -> str:
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"{argument} must be one of {', '.join(RESIZE_POLICIES)}, got {resize!r}")
    return resize


def _fitted_size(h: int, w: int, size: int, resize: str):
    """``(h, w)`` after resizing, before the crop or pad."""
    if resize == "squash":
        return size, size
    scale = size / (min(h, w) if resize == "crop" else max(h, w))
    clip = (lambda v: max(size, v)) if resize == "crop" else (lambda v: min(size, max(1, v)))
    return clip(round(h * scale)), clip(round(w * scale))


def fit_image(image, size: int, resize: str = "crop"):
    """A Pillow image fitted to ``size × size`` by the ``resize`` policy (mode kept)."""
    from PIL import Image

    check_resize(resize)
    w, h = image.size
    new_h, new_w = _fitted_size(h, w, size, resize)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if resize == "crop" and (new_w, new_h) != (size, size):
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif resize == "pad" and (new_w, new_h) != (size, size):
        canvas = Image.new(image.mode, (size, size))
        canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
        image = canvas
    return image


def fit_pixels(pixels: torch.Tensor, size: int, resize: str = "crop") -> torch.Tensor:
    """``Tensor[N, C, H, W]`` (float) fitted to ``[N, C, size, size]`` by the ``resize`` policy."""
    check_resize(resize)
    h, w = pixels.shape[-2:]
    new_h, new_w = _fitted_size(h, w, size, resize)
    if (new_h, new_w) != (h, w):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    if resize == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        pixels = pixels[..., top:top + size, left:left + size]
    elif resize == "pad" and (new_h, new_w) != (size, size):
        top, left = (size - new_h) // 2, (size - new_w) // 2
        pixels = F.pad(pixels, (left, size - new_w - left, top, size - new_h - top))
    return pixels.contiguous()
