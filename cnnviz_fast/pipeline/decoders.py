"""How image files become pixels in the pipeline: which decoder, and what happens to the
files it cannot read.

``decode``:

- ``"pil"``: Pillow in the DataLoader workers (JPEGs at the smallest DCT scale that still
  covers the result, :func:`cnnviz_fast.loading.decode_file`);
- ``"gpu"``: the workers read bytes; the main process decodes each batch with
  ``torchvision.io`` (nvJPEG for JPEGs on a GPU; its image decoders are deprecated since
  torchvision 0.29 in favour of TorchCodec);
- ``"torchcodec"``: TorchCodec's decoders. On a GPU the workers read bytes and the main
  process decodes each batch's JPEGs in one nvJPEG call; on a CPU each worker decodes its
  files with TorchCodec (libjpeg-turbo, libpng, ...);
- ``"auto"`` (default): the fastest decoder that works on the device. On a CPU Pillow (its
  draft mode decodes a 256-px JPEG for a 224-px crop at full scale only when it must; the
  others always do). On a GPU TorchCodec when it is installed, else Pillow: on the H200
  torchvision's nvJPEG path ran slower than Pillow in 8 workers (1,026 against 1,167
  images/s, results/pipeline*-nvidia-h200.md); TorchCodec's batched path is to be measured
  there (``scripts/device_check.sh``, step ``decode``).

Every path resizes by the package's one ``resize`` policy (GPU batches with
:func:`cnnviz_fast.core.images.fit_pixels`, on the device). A file a decoder refuses (CMYK
JPEGs and 16-bit PNGs on some, anything torchvision or TorchCodec cannot parse) is decoded
by Pillow instead, and skipped (a line in errors.jsonl) only when Pillow fails too.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.images import fit_pixels
from ..core.validation import check_choice
from ..loading import decode_file

__all__ = ["DECODE_CHOICES", "DEVICE_DECODERS", "choose_decoder", "decode_on_device", "decode_in_worker"]

DECODE_CHOICES = ("auto", "pil", "gpu", "torchcodec")
# decoders that run in the main process on the device (the workers only read bytes)
DEVICE_DECODERS = ("gpu", "torchcodec")
# "auto": the first that works, per device type (order from the measurements above)
AUTO_ORDER = {"cuda": ("torchcodec", "pil"), "cpu": ("pil",)}


@functools.lru_cache(maxsize=None)
def torchcodec_available() -> bool:
    """Whether TorchCodec's image decoders import (the package and its native library)."""
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or its native library failing to load
        return False
    return True


def choose_decoder(decode: str, device: torch.device) -> str:
    """The decoder ``decode`` means on ``device``: ``"auto"`` resolved (see the module
    docstring); ``"gpu"`` needs a CUDA device, ``"torchcodec"`` the package."""
    check_choice(decode, DECODE_CHOICES, "decode")
    device = torch.device(device)
    if decode == "auto":
        for name in AUTO_ORDER.get(device.type, ("pil",)):
            if name != "torchcodec" or torchcodec_available():
                return name
        return "pil"
    if decode == "gpu" and device.type != "cuda":
        raise ValueError(f"decode='gpu' needs a CUDA device, got device={str(device)!r}"
                         + ("" if torch.cuda.is_available() else " (no GPU is present)"))
    if decode == "torchcodec" and not torchcodec_available():
        raise ValueError("decode='torchcodec' needs the torchcodec package (pip install torchcodec); "
                         "or use decode='pil'")
    return decode


def runs_on_device(decode: str, device: torch.device) -> bool:
    """Whether the main process decodes ``decode``'s batches on ``device`` (the workers read bytes)."""
    return decode == "gpu" or (decode == "torchcodec" and torch.device(device).type == "cuda")


# ---------------------------------------------------------------------------- in a worker

def _as_hwc(pixels: torch.Tensor, size: int, resize: str) -> np.ndarray:
    fitted = fit_pixels(pixels[None].float(), size, resize)[0]
    return fitted.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def decode_in_worker(path: str, size: int, channels: int, resize: str, decode: str) -> np.ndarray:
    """One file as ``uint8[size, size, channels]``: Pillow, or TorchCodec on the CPU with
    Pillow for what it refuses (or 16-bit images, which Pillow converts as everywhere else)."""
    if decode == "torchcodec":
        from torchcodec.decoders import decode_image

        try:
            image = decode_image(path, mode="RGB" if channels == 3 else "GRAY")
        except (RuntimeError, ValueError):  # the decoders' ways of refusing a file
            image = None
        if image is not None and image.dim() == 3 and image.dtype == torch.uint8:
            return _as_hwc(image, size, resize)
    return decode_file(path, size, channels, resize)


# ---------------------------------------------------------------------------- on the device

def _jpeg_batch_decoder(decode: str, channels: int) -> Tuple[Callable, Callable]:
    """``(batch(list of byte tensors, device) -> list, other(bytes tensor) -> CPU tensor)``."""
    if decode == "torchcodec":
        from torchcodec.decoders import decode_image, decode_jpeg

        mode = "RGB" if channels == 3 else "GRAY"
        return (lambda raw, device: decode_jpeg(list(raw), mode=mode, device=device),
                lambda data: decode_image(data, mode=mode))
    import torchvision.io as tio

    mode = tio.ImageReadMode.RGB if channels == 3 else tio.ImageReadMode.GRAY
    return (lambda raw, device: tio.decode_jpeg(list(raw), mode=mode, device=device),
            lambda data: tio.decode_image(data, mode=mode))


def decode_on_device(raw: Sequence[torch.Tensor], size: int, channels: int, device: torch.device,
                     resize: str = "crop", decode: str = "gpu") -> Tuple[List[int], torch.Tensor, List[Tuple[int, str]]]:
    """Decode file bytes on ``device`` (nvJPEG on a GPU: ``torchvision.io`` for ``"gpu"``,
    TorchCodec for ``"torchcodec"``), resize there.

    Returns ``(kept, pixels uint8[K, C, size, size], failed [(index, reason)])``. A batch whose
    joint JPEG decode fails is retried one file at a time, so one bad file skips only itself;
    a file the decoder refuses (CMYK JPEG, 16-bit PNG, ...) is decoded by Pillow, as in the
    CPU path, and skipped only when Pillow fails too.
    """
    batch, other = _jpeg_batch_decoder(decode, channels)
    decoded: List[Optional[torch.Tensor]] = [None] * len(raw)
    failed: List[Tuple[int, str]] = []

    def usable(image) -> bool:  # 8-bit [C, H, W]; anything else goes to Pillow
        return isinstance(image, torch.Tensor) and image.dim() == 3 and image.dtype == torch.uint8

    def with_pillow(i: int) -> None:
        try:
            array = decode_file(raw[i].numpy().tobytes(), size, channels, resize)
            decoded[i] = torch.from_numpy(array).permute(2, 0, 1).to(device)
        except Exception as error:  # noqa: BLE001 - a bad file is a skip, whatever it raised
            failed.append((i, f"decode: {error}".splitlines()[0]))

    jpegs = [i for i, data in enumerate(raw) if data.numel() > 2 and data[0] == 0xFF and data[1] == 0xD8]
    try:
        for i, image in zip(jpegs, batch([raw[i] for i in jpegs], device) if jpegs else []):
            decoded[i] = image
    except (RuntimeError, ValueError):  # the decoders' ways of refusing a file
        for i in jpegs:
            try:
                decoded[i] = batch([raw[i]], device)[0]
            except (RuntimeError, ValueError):  # the decoders' ways of refusing a file
                pass
    for i, data in enumerate(raw):
        if decoded[i] is None and i not in jpegs:
            try:  # PNG and others: the library's CPU decoders, then on to the device
                decoded[i] = other(data).to(device)
            except (RuntimeError, ValueError):  # the decoders' ways of refusing a file
                pass
        if not usable(decoded[i]):
            decoded[i] = None
            with_pillow(i)
    kept = [i for i, image in enumerate(decoded) if image is not None]
    pixels = [fit_pixels(decoded[i][None].float(), size, resize)[0] for i in kept]
    stacked = (torch.stack(pixels).round_().clamp_(0, 255).to(torch.uint8) if pixels
               else torch.empty(0, channels, size, size, dtype=torch.uint8, device=device))
    return kept, stacked, sorted(failed)
