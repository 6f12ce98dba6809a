"""The ``cnnviz`` command line.

    cnnviz demo [--out DIR] [--quick]          every method on the embedded default model
    cnnviz saliency --method M --data D --out DIR  dataset-scale saliency (resumable, torchrun-ready)
    cnnviz merge OUT DIR...                     join a multi-node run's folders
    cnnviz info                                 version, compiled kernels, devices
    cnnviz train-digits                         retrain the embedded digits model
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import zoo
from .core import Normalize

BUILTIN_MODELS = {
    "digits": (lambda: zoo.digits_cnn(), zoo.DIGITS_NORMALIZE, 32),
    "digits-functional": (lambda: zoo.digits_cnn(relu="functional"), zoo.DIGITS_NORMALIZE, 32),
    "resnet18": (lambda: zoo.resnet18(), zoo.IMAGENET_NORMALIZE, 224),
    "vgg11": (lambda: zoo.vgg11(), zoo.IMAGENET_NORMALIZE, 224),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def load_model(spec: str, weights: Optional[str] = None) -> Tuple[nn.Module, Normalize, int]:
    """A built-in name (digits, digits-functional, resnet18, vgg11: random weights) or
    ``package.module:factory`` (called without arguments; ImageNet normalisation, 224 px).
    ``weights``: a state dict file loaded with ``weights_only=True``."""
    if spec in BUILTIN_MODELS:
        factory, normalize, size = BUILTIN_MODELS[spec]
        model = factory()
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), attr)()
        except (ImportError, AttributeError) as error:
            raise SystemExit(f"--model {spec!r}: cannot load factory ({error})")
        normalize, size = zoo.IMAGENET_NORMALIZE, 224
    else:
        raise SystemExit(f"--model must be one of {sorted(BUILTIN_MODELS)} or package.module:factory, got {spec!r}")
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), normalize, size


def load_images(spec: str, size: int, channels: int) -> Tuple[torch.Tensor, List[str]]:
    """``digits`` / ``digits:train`` / ``digits:all`` (zoo digits), ``samples`` (scikit-learn's
    photos), an image file, or a folder of images; pixels in [0, 1], ``[M, C, size, size]``."""
    import torch.nn.functional as F

    if spec.split(":")[0] == "digits":
        split = spec.partition(":")[2] or "test"
        pixels, labels = zoo.digits(split, size=size)
        return pixels, [f"digit{index:04d}-label{int(label)}" for index, label in enumerate(labels)]
    if spec == "samples":
        photos = zoo.sample_images(size=size)
        pixels = torch.cat(list(photos.values()))
        names = list(photos)
    else:
        from PIL import Image

        root = Path(spec)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else [root]
        if not files or not files[0].exists():
            raise SystemExit(f"--data {spec!r}: no images found")
        tensors = []
        for file in files:
            image = Image.open(file).convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
            tensors.append(array.permute(2, 0, 1) if array.dim() == 3 else array[None])
        pixels, names = torch.stack(tensors), [f.stem for f in files]
    if pixels.shape[1] != channels:
        pixels = pixels.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else pixels
        pixels = pixels.contiguous()
    if pixels.shape[-1] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return pixels, names


def _cmd_info(args) -> int:
    from . import __version__, ops

    print(f"cnnviz_fast {__version__}; torch {torch.__version__}")
    print(f"compiled kernels: {'yes' if ops.has_extension() else 'no (pure-PyTorch reference path)'}")
    print(f"CUDA devices: {torch.cuda.device_count()}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(Path(args.out), quick=args.quick)
    print(f"report: {report}")
    return 0


def _cmd_train_digits(args) -> int:
    from .zoo import train_digits

    train_digits.main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .pipeline.cli import add_merge_parser, add_saliency_parser

    parser = argparse.ArgumentParser(prog="cnnviz", description="Visualize and understand CNNs.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run every method on the embedded digits model and write a report")
    demo.add_argument("--out", default="cnnviz-demo", help="output folder (default: cnnviz-demo)")
    demo.add_argument("--quick", action="store_true", help="fewer optimisation steps (smoke test)")
    demo.set_defaults(run=_cmd_demo)

    add_saliency_parser(commands)
    add_merge_parser(commands)

    info = commands.add_parser("info", help="version, compiled kernels, devices")
    info.set_defaults(run=_cmd_info)

    train = commands.add_parser("train-digits", help="retrain the embedded digits model", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(run=_cmd_train_digits)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
