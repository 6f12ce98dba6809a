"""``cnnviz evaluate``: deletion / insertion AUCs of attribution methods over a dataset.

Wire it into the main parser with ``add_parser(subparsers)``; the command prints (and with
``--out`` writes) the Markdown summary table of :func:`cnnviz_fast.metrics.evaluate`. With
``--stream DIR`` the data is streamed through the saliency pipeline instead
(:func:`cnnviz_fast.metrics.evaluate_dataset`: maps and per-image curves on disk, resumable
by rerunning the same command), and DIR gets summary.md and report.html.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .dataset import evaluate_dataset, write_report
from .evaluate import evaluate, format_table

__all__ = ["METHODS", "add_parser", "run"]

METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "guided_backprop", "deconvnet", "grad_cam",
           "guided_grad_cam", "random")
DEFAULT_METHODS = "saliency,gradient_x_input,grad_cam,random"
DEFAULT_STREAM_METHODS = "saliency,grad_cam"
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
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate the first LIMIT images (default 64; with --stream: all)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {', '.join(METHODS)} (default {DEFAULT_METHODS}); with --stream from "
                        f"`cnnviz saliency`'s methods (default {DEFAULT_STREAM_METHODS})")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default: the model's last conv block when known)")
    p.add_argument("--steps", type=int, default=50, help="curve steps (default 50)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images-per-batch", type=int, default=16, help="images explained together")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--stream", metavar="DIR", default=None,
                   help="dataset scale: stream --data (a folder, a file of paths, digits, ...) through the saliency "
                        "pipeline into DIR (maps, per-image curves, summary.md, report.html); rerun to resume")
    p.add_argument("--shard-size", type=int, default=1024, help="with --stream: images per output shard")
    p.add_argument("--sanity", type=int, default=0, metavar="N",
                   help="with --stream: add a cascading model-randomization plot on the first N images")
    p.add_argument("--quiet", action="store_true", help="with --stream: no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.set_defaults(run=run)
    return p


def _names(methods: str, known) -> list:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names or any(m not in known for m in names):
        raise ValueError(f"--methods must name some of {', '.join(known)}, got {methods!r}")
    return names


def run(args) -> int:
    from ..cli import load_images, load_model

    for name in ("limit", "steps", "images_per_batch", "batch_size", "shard_size", "sanity"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "sanity" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'sanity' else 1}, got {value}")
    if args.stream:
        return _run_stream(args)
    if args.sanity:
        raise ValueError("--sanity needs --stream DIR (the report it is drawn in)")
    names = _names(args.methods or DEFAULT_METHODS, METHODS)
    model, normalize, size = load_model(args.model, args.weights)
    pixels, _ = load_images(args.data, size, normalize.channels)
    inputs = normalize(pixels[: args.limit or 64])
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


def _first_inputs(data, count: int, size: int, normalize) -> torch.Tensor:
    """The first ``count`` model inputs of ``--data`` (files that do not decode are passed over)."""
    from ..pipeline.sources import FileSource

    if isinstance(data, torch.Tensor):
        return data[:count]
    if not isinstance(data, str):
        raise ValueError("--sanity needs --data a folder, a file of paths, digits or samples")
    source = FileSource(data, size, normalize.channels)
    pixels = []
    for position in range(source.length):
        try:
            pixels.append(torch.from_numpy(source.read(position)).permute(2, 0, 1))
        except Exception:  # noqa: BLE001 - the run itself lists it in errors.jsonl
            continue
        if len(pixels) == count:
            break
    return normalize(torch.stack(pixels).float() / 255)


def _run_stream(args) -> int:
    """``--stream DIR``: :func:`evaluate_dataset` into DIR, then summary.md and report.html."""
    from ..cli import load_model
    from ..pipeline.cli import _load_data
    from ..pipeline.run import METHODS as PIPELINE_METHODS
    from .sanity import model_randomization

    names = _names(args.methods or DEFAULT_STREAM_METHODS, sorted(PIPELINE_METHODS))
    model, normalize, size = load_model(args.model, args.weights)
    data = _load_data(args.data, size, normalize.channels, normalize)
    if args.limit is not None:
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"--limit applies to digits or samples data; --data {args.data!r} is streamed whole")
        data = data[: args.limit]
    layer = args.layer or DEFAULT_LAYERS.get(args.model.removeprefix("zoo:"))
    methods = {}
    for name in names:
        if name in ("grad_cam", "guided_grad_cam") and not layer:
            raise ValueError(f"--layer is required for {name} with this model")
        methods[name] = {"layer": layer} if name in ("grad_cam", "guided_grad_cam") else {}
    out = Path(args.stream)
    summary = evaluate_dataset(model, data, out, methods, steps=args.steps, curve_batch_size=args.batch_size,
                               normalize=normalize, size=size, batch_size=args.images_per_batch,
                               shard_size=args.shard_size, progress=not args.quiet)
    table = format_table(summary)
    (out / "summary.md").write_text(table + "\n")
    if args.out:
        Path(args.out).write_text(table + "\n")
    sanity = None
    if args.sanity:
        inputs = _first_inputs(data, args.sanity, size, normalize)
        sanity = {name: model_randomization(
            model, inputs, "predicted",
            lambda m, x, target, f=PIPELINE_METHODS[name], kw=kwargs: f(m, x, target=target, **kw))
            for name, kwargs in methods.items()}
    report = write_report(out, names, sanity)
    print(f"{args.steps} steps, baseline 0 (model input space), target: predicted class")
    print(table)
    print(f"wrote {out / 'summary.md'} and {report}")
    return 0
