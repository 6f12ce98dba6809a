"""Models and images from outside, loaded one way for every consumer (CLI, report,
pipeline, ``evaluate``, the service).

    loaded = load_model("zoo:efficientnet-lite0")          # LoadedModel: model, normalize, size, classes
    pixels, names = load_images(["cat.jpg", "photos/"], loaded.size, loaded.channels)

Images follow :mod:`cnnviz_fast.core.images`'s policy (default ``"crop"``: shorter side to
``size``, centre crop); errors are ValueErrors that name the argument.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import zoo
from .core import Normalize
from .core.images import check_resize, fit_image, fit_pixels

__all__ = ["IMAGE_SUFFIXES", "LoadedModel", "MODEL_HELP", "ZOO_MODELS", "class_names", "decode_file",
           "load_images", "load_model", "read_image"]

# zoo:<name>: factory, preprocessing, input size, class names, trained
ZOO_MODELS = {
    "digits": (lambda: zoo.digits_cnn(), zoo.DIGITS_NORMALIZE, 32, zoo.DIGITS_CLASSES, True),
    "digits-functional": (lambda: zoo.digits_cnn(relu="functional"), zoo.DIGITS_NORMALIZE, 32, zoo.DIGITS_CLASSES,
                          True),
    "efficientnet-lite0": (lambda: zoo.efficientnet_lite0(), zoo.EFFICIENTNET_LITE0_NORMALIZE,
                           zoo.EFFICIENTNET_LITE0_SIZE, None, True),
    "resnet18": (lambda: zoo.resnet18(), zoo.IMAGENET_NORMALIZE, 224, None, False),
    "vgg11": (lambda: zoo.vgg11(), zoo.IMAGENET_NORMALIZE, 224, None, False),
}
DEFAULT_MODEL = "zoo:efficientnet-lite0"
MODEL_HELP = ("zoo:NAME (" + ", ".join(ZOO_MODELS) + "), torchvision:ARCH, timm:NAME (with --weights), a "
              "TorchScript file or package.module:factory")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class LoadedModel:
    """A model in eval mode with what it needs: ``normalize`` (pixels → inputs), input
    ``size``, class names (None: unknown), and ``warnings`` worth telling the user
    (an architecture running with random weights)."""

    model: nn.Module
    normalize: Normalize
    size: int
    classes: Optional[Sequence[str]]
    spec: str
    warnings: List[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.normalize.channels

    def labels(self, num_classes: int) -> List[str]:
        return class_names(self.classes, num_classes)


def _load_weights(model: nn.Module, weights: str, spec: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"weights {weights}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"weights {weights}: not a state dict readable with weights_only=True "
                         f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"weights {weights}: expected a state dict, got {type(state).__name__}")
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    mismatched = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                 if keys]
        raise ValueError(f"weights {weights} do not fit model {spec}: {', '.join(parts)}")
    model.load_state_dict(state)


def _architecture(spec: str):
    """``(model, normalize, size, classes, trained)`` for a spec without weights."""
    name = spec.partition(":")[2] if spec.startswith("zoo:") else spec
    if name in ZOO_MODELS:
        factory, normalize, size, classes, trained = ZOO_MODELS[name]
        try:
            return factory(), normalize, size, classes, trained
        except ImportError as error:
            raise ValueError(f"model {spec}: {error}") from None
    if spec.startswith("zoo:"):
        raise ValueError(f"model {spec}: unknown zoo model; choose from {', '.join(ZOO_MODELS)}")
    if spec.startswith("torchvision:"):
        import torchvision

        try:
            model = torchvision.models.get_model(spec.partition(":")[2], weights=None)
        except ValueError:
            raise ValueError(f"model {spec}: unknown torchvision architecture") from None
        return model, zoo.IMAGENET_NORMALIZE, 224, None, False
    if spec.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ValueError(f"model {spec}: timm is not installed (pip install timm)") from None
        try:
            model = timm.create_model(spec.partition(":")[2], pretrained=False)
        except RuntimeError as error:
            raise ValueError(f"model {spec}: {str(error).splitlines()[0]}") from None
        config = model.pretrained_cfg
        normalize = Normalize(config.get("mean", (0.485, 0.456, 0.406)), config.get("std", (0.229, 0.224, 0.225)))
        return model, normalize, config.get("input_size", (3, 224, 224))[-1], None, False
    if Path(spec).suffix in (".pt", ".pth", ".ts", ".jit") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise ValueError(f"model {spec}: no such file")
        try:
            model = torch.jit.load(spec, map_location="cpu")
        except Exception:
            raise ValueError(f"model {spec}: not a TorchScript file (a state dict goes to weights, with the "
                             f"architecture as model)") from None
        return model, zoo.IMAGENET_NORMALIZE, 224, None, True
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), attr)()
        except (ImportError, AttributeError) as error:
            raise ValueError(f"model {spec}: cannot load the factory ({error})") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {spec}: the factory returned {type(model).__name__}, not an nn.Module")
        return model, zoo.IMAGENET_NORMALIZE, 224, None, True
    raise ValueError(f"model must be one of {MODEL_HELP}, got {spec!r}")


def load_model(spec: str = DEFAULT_MODEL, weights: Optional[str] = None, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, size: Optional[int] = None) -> LoadedModel:
    """A :class:`LoadedModel` for ``spec``: ``zoo:NAME`` (or NAME), ``torchvision:ARCH`` /
    ``timm:NAME`` (random weights unless ``weights``: a warning says so), a TorchScript
    file, or ``package.module:factory`` (called without arguments). ``weights``: a state
    dict file, loaded with ``weights_only=True``. Preprocessing comes with zoo / torchvision
    (ImageNet) / timm models; ``mean``, ``std`` and ``size`` override it."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be a non-empty string ({MODEL_HELP}), got {spec!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int, got {size!r}")
    model, normalize, default_size, classes, trained = _architecture(spec)
    warnings = []
    if weights:
        _load_weights(model, weights, spec)
    elif not trained:
        warnings.append(f"model {spec} runs with random weights (give trained ones with --weights FILE)")
    if mean is not None or std is not None:
        mean = list(mean) if mean is not None else normalize.mean.flatten().tolist()
        std = list(std) if std is not None else normalize.std.flatten().tolist()
        try:
            normalize = Normalize(mean, std)
        except ValueError as error:
            raise ValueError(f"mean/std: {error}") from None
    return LoadedModel(model.eval(), normalize, size or default_size, classes, spec, warnings)


def class_names(classes: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """The given names, ImageNet's for 1000 outputs, else ``class <i>``."""
    if classes is not None and len(classes) == num_classes:
        return list(classes)
    if num_classes == 1000:
        return list(zoo.imagenet_classes())
    return [f"class {i}" for i in range(num_classes)]


def decode_file(data, size: int, channels: int, resize: str = "crop") -> np.ndarray:
    """A file (path, file object or bytes) decoded with Pillow as ``uint8[size, size, channels]``
    by the ``resize`` policy. CMYK, palette, grayscale, RGBA (alpha dropped) and 16-bit images
    are converted; JPEGs are decoded at the smallest DCT scale still covering the result
    (Pillow's draft mode). Raises on an unreadable, truncated or empty file."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as image:
        if image.format == "JPEG":
            w, h = image.size
            scale = size / (min(w, h) if resize == "crop" else max(w, h))
            image.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))) if resize != "squash" else (size, size))
        image = _to_8bit(image)
        image = fit_image(image.convert("RGB" if channels == 3 else "L"), size, resize)
        array = np.array(image, dtype=np.uint8)  # a writable copy, as torch wants
    return array if array.ndim == 3 else array[:, :, None]


def _to_8bit(image):
    """16-bit and float grayscale (modes I;16*, I, F) to 8-bit L; other modes unchanged."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float32) / 257.0
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        array = array * 255.0 if array.size and array.max() <= 1.0 else array
    else:
        return image
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L")


def read_image(path, size: int, channels: int, resize: str = "crop") -> torch.Tensor:
    """One image file as pixels ``Tensor[C, size, size]`` in [0, 1] (:func:`decode_file`)."""
    try:
        array = decode_file(path, size, channels, resize)
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's kinds for undecodable files
        raise ValueError(f"{path}: not a readable image ({type(error).__name__})") from None
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


def load_images(spec, size: int, channels: int, resize: str = "crop") -> Tuple[torch.Tensor, List[str]]:
    """Pixels in [0, 1], ``[M, C, size, size]``, and names. ``spec``: one string or a list of
    them, each ``digits`` / ``digits:train`` / ``digits:all`` (zoo digits), ``samples``
    (scikit-learn's photos), ``photos`` (every bundled photo), an image file, or a folder of
    images (recursive, sorted). Every image follows the ``resize`` policy
    (:mod:`cnnviz_fast.core.images`)."""
    check_resize(resize)
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    tensors, names = [], []
    for item in map(str, specs):
        if item.split(":")[0] == "digits":
            split = item.partition(":")[2] or "test"
            pixels, labels = zoo.digits(split, size=size)
            tensors.append(pixels)
            names += [f"digit{index:04d}-label{int(label)}" for index, label in enumerate(labels)]
            continue
        if item in ("samples", "photos"):
            photos = zoo.sample_images() if item == "samples" else zoo.photos(None)
            tensors += [fit_pixels(photo, size, resize).clamp(0, 1) for photo in photos.values()]
            names += list(photos)
            continue
        root = Path(item)
        if not root.exists():
            raise ValueError(f"images {item}: no such file or folder")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else [root]
        if not files:
            raise ValueError(f"images {item}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        tensors.append(torch.stack([read_image(f, size, channels, resize) for f in files]))
        names += [f.stem for f in files]
    if not tensors:
        raise ValueError("images: none given")
    converted = []
    for pixels in tensors:
        if pixels.shape[1] != channels:
            pixels = pixels.mean(1, keepdim=True).expand(-1, channels, -1, -1).contiguous()
        if pixels.shape[-2:] != (size, size):  # the digits at another size
            pixels = fit_pixels(pixels, size, resize)
        converted.append(pixels.clamp(0, 1))
    return torch.cat(converted), names
