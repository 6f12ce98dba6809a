"""``cnnviz evaluate``: deletion / insertion AUCs of attribution methods over a dataset.

Wire it into the main parser with ``add_parser(subparsers)``; the command prints (and with
``--out`` writes) the Markdown summary table of :func:`cnnviz_fast.metrics.evaluate`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .evaluate import evaluate, format_table

__all__ = ["METHODS", "add_parser", "run"]

METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "guided_backprop", "deconvnet", "grad_cam",
           "guided_grad_cam", "random")
DEFAULT_LAYERS = {"digits": "features.conv5", "digits-functional": "features.conv5", "resnet18": "layer4",
                  "vgg11": "features"}


def _method(name: str, layer):
    from .. import attribution as A

    if name == "gradient_x_input":
        return lambda model, x, target: A.saliency(model, x, target, abs=False) * x
    if name == "random":  # the floor every method should beat
        return lambda model, x, target: torch.rand(x.shape[0], *x.shape[2:], device=x.device)
    if name in ("grad_cam", "guided_grad_cam"):
        if not layer:
            raise ValueError(f"--layer is required for {name} with this model")
        method = getattr(A, name)
        return lambda model, x, target: method(model, x, layer, target)
    return getattr(A, name)


def add_parser(subparsers):
    """Adds the ``evaluate`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("evaluate", help="faithfulness (deletion / insertion AUC) of attribution methods")
    p.add_argument("--model", default="digits", help="as for `cnnviz saliency` (default: the embedded digits CNN)")
    p.add_argument("--weights", default=None, help="state dict file for --model")
    p.add_argument("--data", default="digits", help="as for `cnnviz saliency` (default: the held-out digits)")
    p.add_argument("--limit", type=int, default=64, help="evaluate the first LIMIT images (default 64)")
    p.add_argument("--methods", default="saliency,gradient_x_input,grad_cam,random",
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default: the model's last conv block when known)")
    p.add_argument("--steps", type=int, default=50, help="curve steps (default 50)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images-per-batch", type=int, default=16, help="images explained together")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..cli import load_images, load_model

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods must name some of {', '.join(METHODS)}, got {args.methods!r}")
    if args.limit < 1 or args.steps < 1 or args.images_per_batch < 1:
        raise ValueError("--limit, --steps and --images-per-batch must be >= 1")
    model, normalize, size = load_model(args.model, args.weights)
    pixels, _ = load_images(args.data, size, normalize.channels)
    inputs = normalize(pixels[: args.limit])
    layer = args.layer or DEFAULT_LAYERS.get(args.model.removeprefix("zoo:"))
    methods = {name: _method(name, layer) for name in names}
    summary = evaluate(model, inputs, methods, target="predicted", steps=args.steps, batch_size=args.batch_size,
                       images_per_batch=args.images_per_batch)
    table = format_table(summary)
    print(f"{len(inputs)} images, {args.steps} steps, baseline 0 (model input space), target: predicted class")
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        print(f"wrote {args.out}")
    return 0
