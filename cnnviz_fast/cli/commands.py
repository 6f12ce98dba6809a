"""``cnnviz info``, ``demo``, ``report`` and ``train-digits``."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .. import ops, registry
from ..version import __version__
from ..demo import demo_report
from ..loading import load_images
from ..report import SECTIONS, Report, model_sections
from ..zoo import train_digits
from .common import (add_model_options, add_parser, add_run_options, load_context_model, staged_output)


def _cmd_info(args) -> int:
    print(f"cnnviz_fast {__version__}; torch {torch.__version__}")
    print(f"compiled kernels: {'yes' if ops.has_extension() else 'no (pure-PyTorch reference path)'}")
    print(f"CUDA devices: {torch.cuda.device_count()}")
    for family in registry.FAMILIES:
        names = registry.method_names(family)
        if names:
            print(f"{family} methods: {', '.join(names)}")
    return 0


def add_info_parser(commands) -> None:
    add_parser(commands, "info", "version, compiled kernels, devices and the registered methods",
               "  cnnviz info").set_defaults(run=_cmd_info)


def _finish_report(report, out: str, quiet: bool) -> int:
    """Exit status 1 when a section failed (the report, complete, says why)."""
    if report.failed:
        print(f"cnnviz: sections failed: {', '.join(report.failed)}; see {Path(out) / 'report.html'}",
              file=sys.stderr)
    elif not quiet:
        print(f"report: {Path(out) / 'report.html'}")
    return 1 if report.failed else 0


def _cmd_demo(args) -> int:
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


def _check_report(args) -> None:
    unknown = [name for name in args.sections or () if name not in SECTIONS]
    if unknown:
        raise ValueError(f"--sections must be some of {', '.join(SECTIONS)}, got {', '.join(unknown)}")
    for name in args.methods or ():
        registry.get_method(name, "--methods")


def _cmd_report(args) -> int:
    loaded = load_context_model(args)
    pixels, names = load_images(args.images, loaded.size, loaded.channels, args.resize)
    shown = len(names) if args.max_images is None else min(len(names), args.max_images)
    with staged_output(Path(args.out)) as stage:
        report = Report(stage, quick=args.quick, progress=not args.quiet)
        model_sections(report, loaded.model.to(args.device), loaded.normalize.to(args.device),
                       pixels.to(args.device), names, classes=loaded.classes, title=args.model, layers=args.layers,
                       seed=args.seed, max_images=args.max_images, sections=args.sections, methods=args.methods)
        report.write(f"cnnviz report: {args.model}",
                     f"Model {args.model}; {shown} of {len(names)} image(s) explained at {loaded.size} px "
                     f"({args.resize});")
    return _finish_report(report, args.out, args.quiet)


def add_report_parser(commands) -> None:
    report = add_parser(commands, "report", "a static HTML report of every method for your model and images",
                        "  cnnviz report --images photos --out my-report\n"
                        "  cnnviz report --model torchvision:resnet18 --weights r18.pth --images cat.jpg dog.jpg\n"
                        "  cnnviz report --model mypkg.nets:build --mean 0.5 --std 0.5 --size 64 --images data/\n"
                        "  cnnviz report --images photos --sections predictions attribution --max-images 2")
    add_model_options(report)
    report.add_argument("--images", nargs="+", required=True, help="image files or folders (or 'photos', 'digits')")
    report.add_argument("--max-images", type=int, help="explain the first N images (default: all)")
    report.add_argument("--sections", nargs="+", metavar="SECTION",
                        help=f"sections to include, from {', '.join(SECTIONS)} (default: all)")
    report.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="attribution methods to show (default: every registered one)")
    report.add_argument("--layers", nargs="+", help="layers for inversion/dream/texture/style (default: chosen "
                        "along the depth of the network)")
    report.add_argument("--quick", action="store_true", help="few optimisation steps (a smoke test)")
    add_run_options(report, "cnnviz-report")
    report.set_defaults(run=_cmd_report, check=_check_report)


def _cmd_train_digits(args) -> int:
    argv = ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    if args.out:
        argv += ["--out", args.out]
    train_digits.main(argv)
    return 0


def add_train_digits_parser(commands) -> None:
    train = add_parser(commands, "train-digits", "retrain the embedded digits CNN on scikit-learn's digits",
                       "  cnnviz train-digits --out digits.pt\n  cnnviz train-digits --epochs 5 --out /tmp/d.pt")
    train.add_argument("--out", help="weights file to write (default: the package's own weights)")
    train.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--debug", action="store_true", help="show the traceback of an error")
    train.set_defaults(run=_cmd_train_digits)


PARSERS = [add_demo_parser, add_report_parser, add_info_parser, add_train_digits_parser]
