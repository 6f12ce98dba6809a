"""The ``cnnviz`` command line: every method of the package on a model and images.

One module per concern: :mod:`.common` (shared options and checks), :mod:`.commands`
(info, demo, report, train-digits), :mod:`.saliency` (the dataset pipeline and merge),
:mod:`.evaluate` (faithfulness), :mod:`.tools` (synthesis and feature subcommands).
Bad input prints one line and exits with 2, checked before any model loads where it can
be; a failure of the work itself exits with 1 (``--debug`` shows the traceback). Outputs
are written into a temporary folder next to ``--out`` and moved there only on success.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from . import commands, evaluate, saliency, tools
from .common import CLIError, check_arguments

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnviz", description="Visualize and understand CNNs: attribution, synthesis, features.",
        epilog="examples:\n  cnnviz demo\n  cnnviz report --images cat.jpg\n"
               "  cnnviz saliency --method grad_cam --data photos/ --out maps\n"
               "  cnnviz visualize --class 963 --out pizza\n"
               "  cnnviz <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in [*commands.PARSERS[:2], *saliency.PARSERS, *tools.PARSERS, *evaluate.PARSERS, *commands.PARSERS[2:]]:
        add(subcommands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 done, 1 the work failed, 2 bad input (usage, files, models, layers)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "seed", None) is not None:
        torch.manual_seed(args.seed)
    try:
        check_arguments(args)
        if getattr(args, "check", None) is not None:
            args.check(args)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("cnnviz: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        bad_input = isinstance(error, (CLIError, ValueError, FileNotFoundError, NotADirectoryError,
                                       FileExistsError, IsADirectoryError, PermissionError))
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kind = "" if isinstance(error, (CLIError, ValueError)) else f"{type(error).__name__}: "
        print(f"cnnviz {args.command}: error: {kind}{message}" + ("" if bad_input else " (--debug shows where)"),
              file=sys.stderr)
        return 2 if bad_input else 1
