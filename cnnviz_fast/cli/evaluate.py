"""``cnnviz evaluate``: deletion / insertion AUCs of registered attribution methods.

Without ``--stream`` the first ``--limit`` images are explained in memory
(:func:`cnnviz_fast.metrics.evaluate`); with ``--stream DIR`` every image of ``--data`` goes
through the saliency pipeline (:func:`cnnviz_fast.metrics.evaluate_dataset`: maps and
per-image curves on disk, resumable), and DIR gets summary.md and report.html. Both accept
the same methods, ranked by the same map rule (the registry's).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .. import registry
from ..metrics import BETTER, evaluate, evaluate_dataset, format_table, model_randomization, write_report
from ..pipeline.sources import FileSource
from .common import (CLIError, add_method_options, add_model_options, add_parser, load_context_model,
                     method_options)
from .saliency import DATA_HELP, load_data

DEFAULT_METHODS = "saliency,gradient_x_input,grad_cam,random"


def _names(args) -> list:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = registry.attribution_methods()
    if not names or any(m not in known for m in names):
        raise CLIError(f"--methods must name some of {', '.join(known)}, got {args.methods!r}")
    return names


def _check_evaluate(args) -> None:
    names = _names(args)
    methods = [registry.get_method(name) for name in names]
    if args.layer is not None and not any(m.needs_layer for m in methods):
        raise CLIError(f"--layer applies to methods that need a layer; none of {', '.join(names)} does")
    for method in methods:
        method_options(args, method, strict=False)
    given = {name for name, dest in args.method_option_dests.items() if getattr(args, dest) is not None}
    unused = sorted(given - {o.name for m in methods for o in m.options})
    if unused:
        raise CLIError(f"--{unused[0].replace('_', '-')} applies to none of {', '.join(names)}")
    if args.sanity and not args.stream:
        raise CLIError("--sanity needs --stream DIR (the report it is drawn in)")


def _method_settings(args, loaded, probe):
    """name -> (Method, layer or None, options): what each method runs with (layers said)."""
    settings = {}
    for name in _names(args):
        method = registry.get_method(name)
        layer, note = registry.resolve_layer(method, loaded.model, probe, args.layer if method.needs_layer else None,
                                             "--layer")
        if note:
            print(note, file=sys.stderr)
        settings[name] = (method, layer, method_options(args, method, strict=False))
    return settings


def _settings_text(args, loaded, settings, images) -> str:
    described = {name: {"layer": layer, **options} for name, (_, layer, options) in settings.items()}
    return "\n".join([
        f"- model: {args.model}" + (f" (weights {args.weights})" if args.weights else ""),
        f"- data: {args.data} ({images} images, {loaded.size} px, resize {args.resize})",
        f"- target: predicted class; {args.steps} steps; baseline 0 (model input space)",
        f"- methods: {json.dumps(described)}",
        "- " + "; ".join(f"{metric} AUC: {better} is better" for metric, better in BETTER.items()),
        "- intervals: 95% percentile bootstrap over images (2,000 resamples)",
    ])


def _run(args) -> int:
    loaded = load_context_model(args)
    device = torch.device(args.device)
    model, normalize = loaded.model.to(device), loaded.normalize.to(device)
    data = load_data(args.data, loaded.size, loaded.channels, normalize, args.resize)
    if isinstance(data, torch.Tensor):
        data = data[: args.limit or (None if args.stream else 64)].to(device)
        probe = data[:1]
    elif isinstance(data, str):
        if not args.stream:
            source = FileSource(data, loaded.size, loaded.channels, resize=args.resize)
            count = min(source.length, args.limit or 64)
            pixels = torch.stack([torch.from_numpy(source.read(p)).permute(2, 0, 1) for p in range(count)])
            data = normalize(pixels.float().div(255).to(device))
            probe = data[:1]
        else:
            if args.limit is not None:
                raise CLIError(f"--limit applies to built-in data or without --stream; --data {args.data!r} is "
                               f"streamed whole")
            probe = normalize(torch.zeros(1, loaded.channels, loaded.size, loaded.size, device=device))
    else:
        raise CLIError("--data: evaluate takes a folder, a file of paths, digits, samples or photos")
    settings = _method_settings(args, loaded, probe)
    if args.stream:
        return _run_stream(args, loaded, model, normalize, data, settings)
    methods = {name: (lambda m, x, t, method=method, layer=layer, options=options:
                      method.maps(m, x, t, layer, **options)[0]) for name, (method, layer, options) in settings.items()}
    summary = evaluate(model, data, methods, target="predicted", steps=args.steps, batch_size=args.batch_size,
                       images_per_batch=args.images_per_batch, progress=not args.quiet)
    text = f"{_settings_text(args, loaded, settings, len(data))}\n\n{format_table(summary)}"
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    return 0


def _run_stream(args, loaded, model, normalize, data, settings) -> int:
    out = Path(args.stream)
    kwargs = {name: {**options, **({"layer": layer} if layer else {})} for name, (_, layer, options) in settings.items()}
    summary = evaluate_dataset(model, data, out, kwargs, steps=args.steps, curve_batch_size=args.batch_size,
                               normalize=normalize, size=loaded.size, batch_size=args.images_per_batch,
                               shard_size=args.shard_size, progress=not args.quiet, device=args.device,
                               resize=args.resize)
    images = next(iter(summary.values()))["deletion"]["n"] if summary else 0
    text = f"{_settings_text(args, loaded, settings, images)}\n\n{format_table(summary)}"
    (out / "summary.md").write_text(text + "\n")
    if args.out:
        Path(args.out).write_text(text + "\n")
    sanity = None
    if args.sanity:
        inputs = _first_inputs(data, args.sanity, loaded, normalize, args.resize)
        sanity = {name: model_randomization(
            model, inputs, "predicted",
            lambda m, x, target, method=method, layer=layer, options=options: method(m, x, target, layer, **options))
            for name, (method, layer, options) in settings.items()}
    report = write_report(out, list(settings), sanity)
    print(text)
    print(f"wrote {out / 'summary.md'} and {report}")
    return 0


def _first_inputs(data, count: int, loaded, normalize, resize) -> torch.Tensor:
    """The first ``count`` model inputs of ``--data`` (files that do not decode are passed over)."""
    if isinstance(data, torch.Tensor):
        return data[:count]
    source = FileSource(data, loaded.size, loaded.channels, resize=resize)
    pixels = []
    for position in range(source.length):
        try:
            pixels.append(torch.from_numpy(source.read(position)).permute(2, 0, 1))
        except Exception:  # noqa: BLE001 - the run itself lists it in errors.jsonl
            continue
        if len(pixels) == count:
            break
    device = normalize.mean.device
    return normalize(torch.stack(pixels).float().div(255).to(device))


def add_evaluate_parser(commands):
    p = add_parser(commands, "evaluate", "faithfulness (deletion / insertion AUC, with bootstrap intervals) of "
                   "registered attribution methods",
                   "  cnnviz evaluate --model zoo:digits --data digits --methods saliency,grad_cam,random\n"
                   "  cnnviz evaluate --data photos --methods integrated_gradients,occlusion --steps 20\n"
                   "  cnnviz evaluate --model zoo:digits --data digits --stream eval-out --sanity 8")
    add_model_options(p)
    p.add_argument("--data", default="photos", help=f"{DATA_HELP} (default: photos)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(registry.attribution_methods())} "
                        f"(default {DEFAULT_METHODS})")
    p.add_argument("--layer", default=None, help="layer for the methods that need one (default: the registry's "
                   "rule, said)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate the first LIMIT images (default 64; with --stream: all)")
    p.add_argument("--steps", type=int, default=50, help="curve steps (default 50)")
    p.add_argument("--batch-size", type=int, default=64, help="masked images per forward pass of the curves")
    p.add_argument("--images-per-batch", type=int, default=16, help="images explained together")
    p.add_argument("--out", default=None, help="also write the settings and table to this Markdown file")
    p.add_argument("--stream", metavar="DIR", default=None,
                   help="dataset scale: stream --data through the saliency pipeline into DIR (maps, per-image "
                        "curves, summary.md, report.html); rerun to resume")
    p.add_argument("--shard-size", type=int, default=1024, help="with --stream: images per output shard")
    p.add_argument("--sanity", type=int, default=0, metavar="N",
                   help="with --stream: add a cascading model-randomization plot on the first N images")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of random methods (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_method_options(p, [registry.get_method(name) for name in registry.attribution_methods()])
    p.set_defaults(run=_run, check=_check_evaluate)
    return p


PARSERS = [add_evaluate_parser]
