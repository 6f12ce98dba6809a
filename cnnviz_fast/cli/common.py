"""What every ``cnnviz`` subcommand shares: the model / preprocessing / device / run
options, the checks that run before a model loads, the model context and the staged
output folder."""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from ..core import get_layer
from ..core.images import RESIZE_POLICIES
from ..loading import DEFAULT_MODEL, MODEL_HELP, class_names, load_images, load_model

BUILT_IN_IMAGES = ("digits", "samples", "photos")


class CLIError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def add_parser(commands, name: str, help: str, examples: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand with a description and examples in its ``--help``."""
    if not examples:
        raise RuntimeError(f"cnnviz {name}: every subcommand shows an example in its --help")
    return commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                               epilog="examples:\n" + examples,
                               formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The same model and preprocessing options, with the same defaults, on every command
    that runs a model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    group.add_argument("--weights", help="state dict for --model (loaded with weights_only=True)")
    group.add_argument("--mean", type=float, nargs="+", help="per-channel mean of the preprocessing")
    group.add_argument("--std", type=float, nargs="+", help="per-channel std of the preprocessing")
    group.add_argument("--size", type=int, help="input size in pixels (default: the model's)")
    group.add_argument("--resize", choices=RESIZE_POLICIES, default="crop",
                       help="how images become size×size: crop (shorter side, centre crop; default), squash, pad")
    parser.set_defaults(runs_model=True)


def add_run_options(parser: argparse.ArgumentParser, out_default: Optional[str]) -> None:
    group = parser.add_argument_group("run")
    if out_default is not None:
        group.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    group.add_argument("--debug", action="store_true", help="show the traceback of an error")


# options that must be >= their minimum wherever a command has them
_MINIMUM = {"size": 1, "steps": 1, "batch_size": 1, "samples": 1, "limit": 1, "max_images": 1, "k": 1,
            "octaves": 1, "shard_size": 1, "images_per_batch": 1, "upscale": 1, "show": 1, "sanity": 0,
            "pictures": 0, "num_workers": 0, "masks": 1}


def check_arguments(args) -> None:
    """The checks that need no model: numbers in range, files that exist, a usable ``--out``
    and device. Run before anything loads, so that bad input costs nothing."""
    for name, minimum in _MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    weights = getattr(args, "weights", None)
    if weights and not Path(weights).is_file():
        raise CLIError(f"--weights {weights}: no such file")
    # with ``cnnviz style --fast``, --style names a shipped style, not a file
    for option in ("images", "content") + (() if getattr(args, "fast", False) else ("style",)):
        for item in _as_list(getattr(args, option, None)):
            if item.split(":")[0] not in BUILT_IN_IMAGES and not Path(item).exists():
                raise CLIError(f"--{option} {item}: no such file or folder")
    out = getattr(args, "out", None)
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise CLIError(f"--out {out}: exists and is not a folder")
        parent = next((p for p in [path, *path.parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise CLIError(f"--out {out}: {parent} is a file")
    device = getattr(args, "device", None)
    if device:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise CLIError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {device}: no CUDA device is available here")


def _as_list(value) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def warn(message: str) -> None:
    print(f"cnnviz: warning: {message}", file=sys.stderr)


def load_context_model(args):
    """:func:`cnnviz_fast.loading.load_model` from the model options; warnings on stderr."""
    try:
        loaded = load_model(args.model, args.weights, args.mean, args.std, args.size)
    except ValueError as error:  # name the command-line option: "--model x: ..."
        message = str(error)
        option = message.split(" ")[0]
        raise CLIError(f"--{message}" if option in ("model", "weights", "mean/std", "size") else message) from None
    for message in loaded.warnings:
        warn(message)
    return loaded


class Context:
    """The model, its preprocessing and class names, on ``--device``."""

    def __init__(self, args):
        self.args = args
        self.loaded = load_context_model(args)
        self.model, self.normalize, self.size = self.loaded.model, self.loaded.normalize, self.loaded.size
        self.device = torch.device(args.device)
        self.model.to(self.device)
        self.normalize.to(self.device)
        self.channels = self.normalize.channels
        self.progress = not args.quiet

    def images(self, spec, size=None):
        pixels, names = load_images(spec, size or self.size, self.channels, self.args.resize)
        return pixels.to(self.device), names

    def layer(self, name: str, option: str = "--layer") -> str:
        get_layer(self.model, name, option)  # one ValueError line naming the closest layers
        return name

    def labels(self, logits: torch.Tensor) -> List[str]:
        return class_names(self.loaded.classes, logits.shape[-1])

    def say(self, message: str) -> None:
        if self.progress:
            print(message)


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


# --- method options, generated from the registry ----------------------------------------------

def _option_dest(name: str, taken) -> str:
    return f"method_{name}" if name in taken else name


def add_method_options(parser: argparse.ArgumentParser, methods) -> None:
    """One flag per option of the declared ``methods`` (``--samples``, ``--window``, ...;
    ``--method-batch-size`` where the command has its own ``--batch-size``), default None:
    only what the user gives is passed, so each method keeps its own defaults. The
    command's ``--seed`` goes to methods with a seed option."""
    taken = {action.dest for action in parser._actions}
    group = parser.add_argument_group("method options (each applies to the methods named)")
    seen = {}
    for method in methods:
        for option in method.options:
            if option.name == "seed" and "seed" in taken:
                continue
            seen.setdefault(option.name, (option, []))[1].append(method.name)
    for name, (option, users) in seen.items():
        dest = _option_dest(name, taken)
        group.add_argument("--" + dest.replace("_", "-"), dest=dest, type=option.type, default=None,
                           choices=option.choices, metavar=None if option.choices else name.upper(),
                           help=f"{option.help} ({', '.join(users)}; default {option.default})")
    parser.set_defaults(method_option_dests={name: _option_dest(name, taken) for name in seen})


def method_options(args, method, strict: bool = True) -> dict:
    """The options given on the command line for ``method`` (plus ``--seed`` where it has
    one). ``strict``: an option given that ``method`` does not have is a CLIError."""
    dests = getattr(args, "method_option_dests", {})
    own = {option.name for option in method.options}
    chosen = {}
    for name, dest in dests.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if name in own:
            chosen[name] = value
        elif strict:
            raise CLIError(f"--{dest.replace('_', '-')} does not apply to {method.name}; its options: "
                           f"{', '.join('--' + dests.get(o, o).replace('_', '-') for o in sorted(own)) or 'none'}")
    if "seed" in own and "seed" not in dests and getattr(args, "seed", None) is not None:
        chosen["seed"] = args.seed
    return chosen
