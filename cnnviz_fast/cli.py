"""The ``cnnviz`` command line.

    cnnviz demo [--out DIR] [--quick]          every method on the embedded default model
    cnnviz saliency --method M --data D --out F   dataset-scale saliency (torchrun-ready)
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


def _cmd_saliency(args) -> int:
    from .pictures import colorize, heatmap_overlay, image_grid, save_png
    from .pipeline import init_distributed, saliency_maps

    rank, world, device = init_distributed()
    model, normalize, size = load_model(args.model, args.weights)
    size = args.size or size
    channels = normalize.channels
    pixels, names = load_images(args.data, size, channels)
    kwargs = {}
    if args.layer:
        kwargs["layer"] = args.layer
    if args.method == "occlusion":
        kwargs.update(window=args.window, stride=args.stride)
    if args.method in ("integrated_gradients",) and args.steps:
        kwargs["steps"] = args.steps
    if args.method == "smoothgrad" and args.samples:
        kwargs["samples"] = args.samples
    target = "predicted" if args.target == "predicted" else int(args.target)
    result = saliency_maps(model, normalize(pixels), args.method, target=target, out=args.out,
                           batch_size=args.batch_size, device=args.device or device,
                           progress=not args.quiet, **kwargs)
    if rank == 0:
        print(f"wrote {result.path} [{len(pixels)}, {size}, {size}] ({args.method}, {world} rank(s))")
        if args.pictures:
            folder = Path(args.out).with_suffix("")
            for index in range(min(args.pictures, len(pixels))):
                image, heat = pixels[index].expand(3, -1, -1), result.maps[index]
                panel = image_grid([image, colorize(heat), heatmap_overlay(image, heat)], nrow=3, scale=False)
                save_png(panel, folder / f"{names[index]}-pred{int(result.predictions[index])}.png",
                         upscale=max(1, 128 // size))
            print(f"wrote {min(args.pictures, len(pixels))} overlays to {folder}/")
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
    from .pipeline import METHODS

    parser = argparse.ArgumentParser(prog="cnnviz", description="Visualize and understand CNNs.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run every method on the embedded digits model and write a report")
    demo.add_argument("--out", default="cnnviz-demo", help="output folder (default: cnnviz-demo)")
    demo.add_argument("--quick", action="store_true", help="fewer optimisation steps (smoke test)")
    demo.set_defaults(run=_cmd_demo)

    sal = commands.add_parser("saliency", help="attribution maps for a whole dataset (use torchrun for many GPUs)")
    sal.add_argument("--model", default="digits", help=f"{', '.join(BUILTIN_MODELS)} or package.module:factory")
    sal.add_argument("--weights", help="state dict for --model")
    sal.add_argument("--data", default="digits", help="digits[:split], samples, an image file or a folder")
    sal.add_argument("--method", default="saliency", choices=sorted(METHODS))
    sal.add_argument("--out", required=True, help="output .npy file [M, H, W]")
    sal.add_argument("--target", default="predicted", help="'predicted' or a class index")
    sal.add_argument("--layer", help="layer for grad_cam / guided_grad_cam")
    sal.add_argument("--window", type=int, nargs=2, default=(16, 16), help="occlusion window")
    sal.add_argument("--stride", type=int, nargs=2, default=(8, 8), help="occlusion stride")
    sal.add_argument("--steps", type=int, help="integrated_gradients steps")
    sal.add_argument("--samples", type=int, help="smoothgrad samples")
    sal.add_argument("--size", type=int, help="input size (default: the model's)")
    sal.add_argument("--batch-size", type=int, default=64)
    sal.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when present)")
    sal.add_argument("--pictures", type=int, default=0, help="also save this many overlays as PNG")
    sal.add_argument("--quiet", action="store_true")
    sal.set_defaults(run=_cmd_saliency)

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
