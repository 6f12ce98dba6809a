"""Train the zoo's fast style-transfer network (two styles, one conditional network) on the
photos that ship with scikit-learn and scikit-image (CPU, about 25 minutes on 2 busy cores).

    python -m cnnviz_fast.zoo.train_fast_style [--out PATH] [--steps 1000] [--checkpoint PATH]

Styles: scikit-image's ``brick`` (grey) and ``immunohistochemistry`` ("stain"), each at
256×256. Loss network: EfficientNet-Lite0 (ImageNet), content layer ``_blocks.8._act0``,
style layers ``_blocks.1._act0``, ``_blocks.3._act0``, ``_blocks.5._act1``,
``_blocks.8._act0`` (what the report's style transfer picks for this model at 128 px),
style weight 10 (the report's and ``cnnviz style``'s). Training photos: :data:`TRAIN_PHOTOS`;
:data:`HELD_OUT_PHOTOS` are never seen in training (the benchmark evaluates on them).
Writes the network (loadable with ``torch.load(weights_only=True)``) and prints its SHA-256;
the shipped weights were made with the defaults. Killed, the same command resumes from
``--checkpoint``.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from ..core.images import fit_pixels
from .data import sample_images
from .efficientnet import EFFICIENTNET_LITE0_NORMALIZE, efficientnet_lite0

WEIGHTS_PATH = Path(__file__).parent / "weights" / "fast_style.pt"
CONTENT_LAYER = "_blocks.8._act0"
STYLE_LAYERS = ("_blocks.1._act0", "_blocks.3._act0", "_blocks.5._act1", "_blocks.8._act0")
STYLE_WEIGHT = 10.0
STYLE_SIZE = 256   # the style images' side: the pixel scale the network paints at
PHOTO_SIDE = 256   # photos' shorter side; training crops of 128..256 px resized to --size
TRAIN_STEPS = 1000  # batches of 4 at 128 px: 26 minutes on 2 shared cores
# {style name: scikit-image function}
STYLES = {"brick": "brick", "stain": "immunohistochemistry"}
# scikit-image photos by their function, scikit-learn's by name (grey ones as RGB)
TRAIN_PHOTOS = ("china", "flower", "astronaut", "stereo_motorcycle", "camera", "coins", "clock")
HELD_OUT_PHOTOS = ("chelsea", "coffee", "rocket")


def _skimage(name: str) -> torch.Tensor:
    import skimage.data

    array = getattr(skimage.data, name)()
    array = array[0] if isinstance(array, tuple) else array  # stereo pair: left image
    array = np.ascontiguousarray(array[..., :3] if array.ndim == 3 else np.repeat(array[..., None], 3, -1))
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)[None]


def _photo(name: str) -> torch.Tensor:
    sklearn = sample_images()
    return sklearn[name] if name in sklearn else _skimage(name)


def _shorter_side(image: torch.Tensor, side: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    return torch.nn.functional.interpolate(image, size=size, mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0, 1)


def style_images(size: int = STYLE_SIZE) -> Dict[str, torch.Tensor]:
    """The shipped network's styles, ``{name: Tensor[1, 3, size, size]}`` in [0, 1]."""
    return {name: fit_pixels(_skimage(function), size, "crop").clamp(0, 1) for name, function in STYLES.items()}


def training_photos(side: int = PHOTO_SIDE) -> List[torch.Tensor]:
    """:data:`TRAIN_PHOTOS`, each ``Tensor[1, 3, H, W]`` with shorter side ``side``."""
    return [_shorter_side(_photo(name), side) for name in TRAIN_PHOTOS]


def held_out_photos(size: int = PHOTO_SIDE) -> Dict[str, torch.Tensor]:
    """:data:`HELD_OUT_PHOTOS` (never trained on), ``{name: Tensor[1, 3, size, size]}`` (centre crop)."""
    return {name: fit_pixels(_photo(name), size, "crop").clamp(0, 1) for name in HELD_OUT_PHOTOS}


def train(steps: int = TRAIN_STEPS, size: int = 128, batch: int = 4, seed: int = 0, checkpoint=None,
          progress: bool = True):
    """The shipped recipe: :func:`~cnnviz_fast.synthesis.train_style_network` with the
    settings of this module."""
    from ..synthesis.fast_style import train_style_network

    return train_style_network(efficientnet_lite0(), style_images(), training_photos(), CONTENT_LAYER,
                               list(STYLE_LAYERS), normalize=EFFICIENTNET_LITE0_NORMALIZE, style_weight=STYLE_WEIGHT,
                               steps=steps, size=size, batch=batch, seed=seed, checkpoint=checkpoint,
                               progress=progress)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=Path("fast_style.ckpt"),
                        help="resumable training state (default: ./fast_style.ckpt)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = train(args.steps, args.size, args.batch, args.seed, args.checkpoint)
    history = result.history
    print(f"ran {time.perf_counter() - start:.0f} s (a resumed run counts only its own time); loss {float(history[:50].mean()):.3f} (first 50 steps) "
          f"-> {float(history[-50:].mean()):.3f} (last 50)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result.network.to_checkpoint(), args.out)
    print(f"wrote {args.out} sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
