"""Data that ships with scikit-learn, as tensors: the digits (upsampled) and the sample photos."""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Tuple

import numpy as np
import torch

import torch.nn.functional as F

from ..core.images import fit_pixels
from ..core.preprocess import Normalize
from ..core.validation import check_choice, check_int

DIGITS_SIZE = 32
# Mean/std of the upsampled digits' pixels (train split), rounded; models of the zoo
# expect inputs normalised with these.
DIGITS_NORMALIZE = Normalize(mean=(0.3052,), std=(0.3235,))
# The usual ImageNet statistics, for the torchvision-style architectures and photos.
IMAGENET_NORMALIZE = Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@lru_cache(maxsize=None)
def _digits_arrays():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    indices = np.arange(len(images))
    train_idx, test_idx = train_test_split(indices, test_size=0.25, random_state=0, stratify=bunch.target)
    return images, bunch.target.astype(np.int64), {"train": np.sort(train_idx), "test": np.sort(test_idx),
                                                    "all": indices}


def digits(split: str = "test", size: int = DIGITS_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits, upsampled bilinearly to ``size``×``size``.

    Returns ``(pixels Tensor[M, 1, size, size] in [0, 1], labels Tensor[M])`` for
    ``split`` in {"train", "test", "all"} (a fixed stratified 75/25 split).
    Normalise with ``DIGITS_NORMALIZE`` before feeding a zoo digits model.
    """
    images, labels, splits = _digits_arrays()
    check_choice(split, splits, "split")
    check_int(size, "size", minimum=8)
    idx = splits[split]
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0, 1), torch.from_numpy(labels[idx])


def sample_images(size: int | None = None) -> Dict[str, torch.Tensor]:
    """scikit-learn's sample photos ("china", "flower") as ``Tensor[1, 3, H, W]`` in [0, 1].

    With ``size``, the shorter side is resized to ``size`` and the centre cropped square.
    """
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    out = {}
    for name, array in zip(bunch.filenames, bunch.images):
        key = name.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        image = torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div_(255).unsqueeze(0)
        out[key] = image if size is None else _center_square(image, size)
    return out


def _center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``Tensor[1, C, H, W]`` fitted to ``size`` by the package's default policy (crop)."""
    return fit_pixels(image, size, "crop").clamp(0, 1)


# scikit-image photos that ship inside its wheel (no download), by the name used here
_SKIMAGE_PHOTOS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket", "astronaut": "astronaut",
                   "motorcycle": "stereo_motorcycle"}


def photos(size: int | None = 224) -> Dict[str, torch.Tensor]:
    """Real RGB photos for the ImageNet model: scikit-learn's "china" and "flower" and, when
    scikit-image is installed, its "cat" (chelsea), "coffee", "rocket", "astronaut" and
    "motorcycle"; each ``Tensor[1, 3, size, size]`` in [0, 1] (centre crop), or the
    full photo with ``size=None``."""
    out = sample_images()
    try:
        import skimage.data
    except ImportError:
        skimage = None
    if skimage is not None:
        for name, function in _SKIMAGE_PHOTOS.items():
            array = getattr(skimage.data, function)()
            array = array[0] if isinstance(array, tuple) else array  # stereo pair: left image
            out[name] = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float().div_(255)[None]
    return {name: _center_square(image, size) if size else image for name, image in out.items()}
