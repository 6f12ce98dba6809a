"""The ``cnnviz`` command line: every method of the package on a model and images.

Each subcommand registers itself with an ``add_<name>_parser(commands)`` function
(the list ``PARSERS`` at the end); the tool subcommands live in
:mod:`cnnviz_fast.cli_tools`. Errors print one line (``--debug``: the traceback) and
exit with 2 for bad input (files, images, layers, models, weights) or 1 when the work
itself fails; outputs are written into a temporary folder next to ``--out`` and moved
there only when the command succeeds.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import zoo
from .core import Normalize


class CLIError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


# zoo:<name>: factory, preprocessing, input size, class names
ZOO_MODELS = {
    "digits": (lambda: zoo.digits_cnn(), zoo.DIGITS_NORMALIZE, 32, zoo.DIGITS_CLASSES),
    "digits-functional": (lambda: zoo.digits_cnn(relu="functional"), zoo.DIGITS_NORMALIZE, 32, zoo.DIGITS_CLASSES),
    "efficientnet-lite0": (lambda: zoo.efficientnet_lite0(), zoo.EFFICIENTNET_LITE0_NORMALIZE,
                           zoo.EFFICIENTNET_LITE0_SIZE, None),
    "resnet18": (lambda: zoo.resnet18(), zoo.IMAGENET_NORMALIZE, 224, None),  # random weights
    "vgg11": (lambda: zoo.vgg11(), zoo.IMAGENET_NORMALIZE, 224, None),        # random weights
}
MODEL_HELP = ("zoo:NAME (" + ", ".join(ZOO_MODELS) + "), torchvision:ARCH, timm:NAME, a TorchScript file "
              "or package.module:factory")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def _load_weights(model: nn.Module, weights: str, spec: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise CLIError(f"--weights {weights}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CLIError(f"--weights {weights}: not a state dict readable with weights_only=True "
                       f"({str(error).splitlines()[0]})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict):
        raise CLIError(f"--weights {weights}: expected a state dict, got {type(state).__name__}")
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    mismatched = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                 if keys]
        raise CLIError(f"--weights {weights} does not fit --model {spec}: {', '.join(parts)}")
    model.load_state_dict(state)


def load_model_info(spec: str, weights: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None,
                    size: Optional[int] = None) -> Tuple[nn.Module, Normalize, int, Optional[Sequence[str]]]:
    """:func:`load_model` plus the class names when known (else None)."""
    name = spec.partition(":")[2] if spec.startswith("zoo:") else spec
    classes = None
    normalize, default_size = zoo.IMAGENET_NORMALIZE, 224  # torchvision, timm, user models
    if name in ZOO_MODELS:
        factory, normalize, default_size, classes = ZOO_MODELS[name]
        try:
            model = factory()
        except ImportError as error:
            raise CLIError(f"--model {spec}: {error}") from error
    elif spec.startswith("zoo:"):
        raise CLIError(f"--model {spec}: unknown zoo model; choose from {', '.join(ZOO_MODELS)}")
    elif spec.startswith("torchvision:"):
        import torchvision

        try:
            model = torchvision.models.get_model(spec.partition(":")[2], weights=None)
        except ValueError as error:
            raise CLIError(f"--model {spec}: unknown torchvision architecture") from error
    elif spec.startswith("timm:"):
        try:
            import timm
        except ImportError as error:
            raise CLIError(f"--model {spec}: timm is not installed (pip install timm)") from error
        try:
            model = timm.create_model(spec.partition(":")[2], pretrained=False)
        except RuntimeError as error:
            raise CLIError(f"--model {spec}: {str(error).splitlines()[0]}") from error
        config = model.pretrained_cfg
        normalize = Normalize(config.get("mean", normalize.mean.flatten().tolist()),
                              config.get("std", normalize.std.flatten().tolist()))
        default_size = config.get("input_size", (3, 224, 224))[-1]
    elif Path(spec).suffix in (".pt", ".pth", ".ts", ".jit") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise CLIError(f"--model {spec}: no such file")
        try:
            model = torch.jit.load(spec, map_location="cpu")
        except Exception as error:
            raise CLIError(f"--model {spec}: not a TorchScript file (a state dict goes to --weights with "
                           f"--model ARCH)") from error
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), attr)()
        except (ImportError, AttributeError) as error:
            raise CLIError(f"--model {spec}: cannot load the factory ({error})") from error
    else:
        raise CLIError(f"--model must be one of {MODEL_HELP}, got {spec!r}")
    if weights:
        _load_weights(model, weights, spec)
    if mean is not None or std is not None:
        mean = list(mean) if mean is not None else normalize.mean.flatten().tolist()
        std = list(std) if std is not None else normalize.std.flatten().tolist()
        try:
            normalize = Normalize(mean, std)
        except ValueError as error:
            raise CLIError(f"--mean/--std: {error}") from error
    return model.eval(), normalize, size or default_size, classes


def load_model(spec: str, weights: Optional[str] = None, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, size: Optional[int] = None) -> Tuple[nn.Module, Normalize, int]:
    """``(model in eval mode, pixels → inputs Normalize, input size)`` for a model spec:
    ``zoo:NAME`` (or just NAME), ``torchvision:ARCH`` / ``timm:NAME`` (random weights unless
    ``weights``), a TorchScript file, or ``package.module:factory`` (called without
    arguments). ``weights``: a state dict file, loaded with ``weights_only=True``.
    Preprocessing comes with zoo / torchvision (ImageNet) / timm models; ``mean``, ``std``
    and ``size`` override it. Raises :class:`CLIError` with one clear line."""
    return load_model_info(spec, weights, mean, std, size)[:3]


def class_names(classes: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """The given names, ImageNet's for 1000 outputs, else ``class <i>``."""
    if classes is not None and len(classes) == num_classes:
        return list(classes)
    if num_classes == 1000:
        return list(zoo.imagenet_classes())
    return [f"class {i}" for i in range(num_classes)]


def _read_image(path: Path, size: int, channels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    from .zoo.data import _center_square

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255
    except (UnidentifiedImageError, OSError) as error:
        raise CLIError(f"{path}: not a readable image ({type(error).__name__})") from error
    tensor = torch.from_numpy(array)
    tensor = tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor[None]
    return _center_square(tensor[None], size)[0]


def load_images(spec, size: int, channels: int) -> Tuple[torch.Tensor, List[str]]:
    """Pixels in [0, 1], ``[M, C, size, size]`` (shorter side resized, centre crop), and names.
    ``spec``: one string or a list of them, each ``digits`` / ``digits:train`` /
    ``digits:all`` (zoo digits), ``samples`` (scikit-learn's photos), ``photos`` (every
    bundled photo), an image file, or a folder of images."""
    import torch.nn.functional as F

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
            photos = zoo.sample_images(size=size) if item == "samples" else zoo.photos(size)
            tensors.append(torch.cat(list(photos.values())))
            names += list(photos)
            continue
        root = Path(item)
        if not root.exists():
            raise CLIError(f"{item}: no such file or folder")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else [root]
        if not files:
            raise CLIError(f"{item}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        tensors.append(torch.stack([_read_image(f, size, channels) for f in files]))
        names += [f.stem for f in files]
    if not tensors:
        raise CLIError("no images given")
    converted = []
    for pixels in tensors:
        if pixels.shape[1] != channels:
            pixels = pixels.mean(1, keepdim=True).expand(-1, channels, -1, -1).contiguous()
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        converted.append(pixels.clamp(0, 1))
    return torch.cat(converted), names


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out``; its files are moved into ``out`` when the block
    succeeds (same-named files replaced) and it is deleted either way, so a failed or
    interrupted command leaves nothing half-written in ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for item in stage.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --- shared options ----------------------------------------------------------------------

def add_model_options(parser: argparse.ArgumentParser, default: str = "zoo:digits") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default, help=f"{MODEL_HELP} (default: {default})")
    group.add_argument("--weights", help="state dict for --model (loaded with weights_only=True)")
    group.add_argument("--mean", type=float, nargs="+", help="per-channel mean of the preprocessing")
    group.add_argument("--std", type=float, nargs="+", help="per-channel std of the preprocessing")
    group.add_argument("--size", type=int, help="input size in pixels (default: the model's)")


def add_run_options(parser: argparse.ArgumentParser, out_default: Optional[str]) -> None:
    group = parser.add_argument_group("run")
    if out_default is not None:
        group.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    group.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_parser(commands, name: str, help: str, examples: str = "", **kwargs) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=help + ".",
                               epilog=("examples:\n" + examples) if examples else None,
                               formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


# --- info, demo, report, train-digits, saliency --------------------------------------------------

def _cmd_info(args) -> int:
    from . import __version__, ops

    print(f"cnnviz_fast {__version__}; torch {torch.__version__}")
    print(f"compiled kernels: {'yes' if ops.has_extension() else 'no (pure-PyTorch reference path)'}")
    print(f"CUDA devices: {torch.cuda.device_count()}")
    return 0


def add_info_parser(commands) -> None:
    add_parser(commands, "info", "version, compiled kernels, devices").set_defaults(run=_cmd_info)


def _finish_report(report, out: str, quiet: bool) -> int:
    """Exit status 1 when a section failed (the report, complete, says why)."""
    if report.failed:
        print(f"cnnviz: sections failed: {', '.join(report.failed)}; see {Path(out) / 'report.html'}",
              file=sys.stderr)
    elif not quiet:
        print(f"report: {Path(out) / 'report.html'}")
    return 1 if report.failed else 0


def _cmd_demo(args) -> int:
    from .demo import demo_report

    with staged_output(Path(args.out)) as stage:
        report = demo_report(stage, quick=args.quick, progress=not args.quiet, device=args.device)
    return _finish_report(report, args.out, args.quiet)


def add_demo_parser(commands) -> None:
    demo = add_parser(commands, "demo", "every method on the embedded default models (digits CNN, and "
                      "EfficientNet-Lite0 on real photos when cnnviz_fast[imagenet] is installed) → report.html",
                      "  cnnviz demo --out cnnviz-demo\n  cnnviz demo --quick --out /tmp/smoke")
    demo.add_argument("--quick", action="store_true", help="few optimisation steps (a smoke test, ~1 min)")
    add_run_options(demo, "cnnviz-demo")
    demo.set_defaults(run=_cmd_demo)


def _cmd_report(args) -> int:
    from .report import Report, model_sections

    model, normalize, size, classes = load_model_info(args.model, args.weights, args.mean, args.std, args.size)
    pixels, names = load_images(args.images, size, normalize.channels)
    with staged_output(Path(args.out)) as stage:
        report = Report(stage, quick=args.quick, progress=not args.quiet)
        model_sections(report, model.to(args.device), normalize, pixels.to(args.device), names,
                       classes=classes, title=args.model, layers=args.layers, seed=args.seed)
        report.write(f"cnnviz report: {args.model}", f"Model {args.model}; {len(names)} image(s) at {size} px;")
    return _finish_report(report, args.out, args.quiet)


def add_report_parser(commands) -> None:
    report = add_parser(commands, "report", "a static HTML report of every method for your model and images",
                        "  cnnviz report --model zoo:efficientnet-lite0 --images photos/ --out my-report\n"
                        "  cnnviz report --model torchvision:resnet18 --weights r18.pth --images cat.jpg dog.jpg\n"
                        "  cnnviz report --model mypkg.nets:build --mean 0.5 --std 0.5 --size 64 --images data/")
    add_model_options(report, "zoo:efficientnet-lite0")
    report.add_argument("--images", nargs="+", required=True, help="image files or folders (or 'photos', 'digits')")
    report.add_argument("--layers", nargs="+", help="layers for inversion/dream/texture/style (default: chosen "
                        "along the depth of the network)")
    report.add_argument("--quick", action="store_true", help="few optimisation steps (a smoke test)")
    add_run_options(report, "cnnviz-report")
    report.set_defaults(run=_cmd_report)


def _cmd_train_digits(args) -> int:
    from .zoo import train_digits

    train_digits.main(args.rest)
    return 0


def add_train_digits_parser(commands) -> None:
    train = commands.add_parser("train-digits", help="retrain the embedded digits model", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(run=_cmd_train_digits)


def _parsers():
    from . import cli_tools
    from .metrics.cli import add_parser as add_evaluate_parser
    from .pipeline.cli import add_merge_parser, add_saliency_parser

    return [add_demo_parser, add_report_parser, add_saliency_parser, add_merge_parser, *cli_tools.PARSERS,
            add_evaluate_parser, add_info_parser, add_train_digits_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnviz", description="Visualize and understand CNNs: attribution, synthesis, features.",
        epilog="examples:\n  cnnviz demo\n  cnnviz report --model zoo:efficientnet-lite0 --images cat.jpg\n"
               "  cnnviz visualize --model zoo:efficientnet-lite0 --class 963 --out pizza\n"
               "  cnnviz <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in _parsers():
        add(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 done, 1 the work failed, 2 bad input (usage, files, models, layers)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "seed", None) is not None:
        torch.manual_seed(args.seed)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("cnnviz: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        bad_input = isinstance(error, (CLIError, ValueError, FileNotFoundError))
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kind = "" if isinstance(error, CLIError) else f"{type(error).__name__}: "
        print(f"cnnviz {args.command}: error: {kind}{message}" + ("" if bad_input else " (--debug shows where)"),
              file=sys.stderr)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
