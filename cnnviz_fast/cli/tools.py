"""The synthesis and feature subcommands of ``cnnviz`` (the ``command`` of their registry
declarations): visualize, adversarial, invert, dream, texture, style, filters, activations, features,
neighbors, embed, patches, and layers. Each writes PNGs (and ``.npy`` where numbers are the
product) into ``--out`` through :func:`~cnnviz_fast.cli.common.staged_output`."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .. import features, synthesis
from ..core import Neuron
from ..loading import DEFAULT_MODEL, load_images
from ..pictures import colorize, image_grid, save_png
from ..registry import candidate_layers, get_method
from .common import (
    CLIError, Context, add_method_options, add_model_options, add_parser, add_run_options, load_context_model,
    method_options, staged_output,
)


def _upscale(size: int) -> int:
    return max(1, 128 // size)


def _save_images(args, ctx, names, images, suffix: str) -> int:
    """One PNG per input image, ``<name><suffix>.png``, written to ``--out`` all at once."""
    with staged_output(Path(args.out)) as stage:
        for name, image in zip(names, images):
            save_png(image, stage / f"{name}{suffix}.png", upscale=_upscale(ctx.size))
    return 0


# --- synthesis -----------------------------------------------------------------------------

def _cmd_visualize(args) -> int:
    ctx = Context(args)
    shape = (ctx.channels, ctx.size, ctx.size)
    common = dict(normalize=ctx.normalize, steps=args.steps, lr=args.lr, parameterization=args.parameterization,
                  tv=args.tv, l2=args.l2, seed=args.seed, progress=ctx.progress)
    if args.neuron:
        neurons = []
        for spec in args.neuron:
            layer, _, channel = spec.rpartition(":")
            if not layer or not channel.isdigit():
                raise CLIError(f"--neuron {spec!r}: expected LAYER:CHANNEL, e.g. features.conv5:3")
            neurons.append(Neuron(ctx.layer(layer), int(channel)))
        result = synthesis.visualize_neuron(ctx.model, neurons, shape, **common)
        names = [f"neuron-{n.layer}-{n.channel}" for n in neurons]
    else:
        classes = args.classes or [0]
        result = synthesis.visualize_class(ctx.model, classes, shape, **common)
        with torch.no_grad():
            logits = ctx.model(ctx.normalize(result.images.to(ctx.device)))
        labels = ctx.labels(logits)
        probs = logits.softmax(1)
        names = [f"class-{c}" for c in classes]
        for c, p in zip(classes, probs):
            ctx.say(f"class {c} ({labels[c]}): probability {float(p[c]):.3f}")
    with staged_output(Path(args.out)) as stage:
        for name, image in zip(names, result.images):
            save_png(image, stage / f"{name}.png", upscale=_upscale(ctx.size))
        save_png(image_grid(result.images.cpu()), stage / "grid.png", upscale=_upscale(ctx.size))
    ctx.say(f"wrote {len(names) + 1} PNGs to {args.out}/")
    return 0


def add_visualize_parser(commands) -> None:
    p = add_parser(commands, "visualize", "images that maximise a class score or a neuron (feature visualization)",
                   "  cnnviz visualize --model zoo:efficientnet-lite0 --class 1 130 --out classes\n"
                   "  cnnviz visualize --model zoo:digits --neuron features.conv5:3 features.conv5:7 --out neurons")
    add_model_options(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--class", dest="classes", type=int, nargs="+", help="class indices (default: 0)")
    what.add_argument("--neuron", nargs="+", help="LAYER:CHANNEL (the channel's spatial mean)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--parameterization", choices=("fourier", "pixels"), default="fourier")
    p.add_argument("--tv", type=float, default=0.0, help="total-variation weight")
    p.add_argument("--l2", type=float, default=0.0, help="L2 weight")
    add_run_options(p, "cnnviz-visualize")
    p.set_defaults(run=_cmd_visualize)


def _cmd_adversarial(args) -> int:
    ctx = Context(args)
    pixels, names = ctx.images(args.images)
    with torch.no_grad():
        logits = ctx.model(ctx.normalize(pixels))
    before, labels = logits.argmax(1), ctx.labels(logits)
    target = torch.full_like(before, args.target) if args.target is not None else before
    result = synthesis.adversarial(ctx.model, pixels, target, args.method, eps=args.eps / 255, steps=args.steps,
                                   targeted=args.target is not None, normalize=ctx.normalize, seed=args.seed,
                                   progress=ctx.progress)
    with staged_output(Path(args.out)) as stage:
        for index, name in enumerate(names):
            b, a = int(before[index]), int(result.predictions[index])
            ctx.say(f"{name}: {labels[b]} ({b}) → {labels[a]} ({a})")
            clean, adv = pixels[index].cpu(), result.images[index].cpu()
            delta = (0.5 + 0.5 * (adv - clean) / max(args.eps / 255, 1e-8)).clamp(0, 1)  # ±eps → black/white
            save_png(image_grid([clean, adv, delta], nrow=3, scale=False),
                     stage / f"{name}-{b}-to-{a}.png", upscale=_upscale(ctx.size))
            save_png(adv, stage / f"{name}-adversarial.png")
        np.save(stage / "predictions.npy", np.stack([before.cpu().numpy(), result.predictions.cpu().numpy()], 1))
    ctx.say(f"success {float(result.success.float().mean()):.0%}; wrote {args.out}/")
    return 0


def add_adversarial_parser(commands) -> None:
    p = add_parser(commands, "adversarial", "adversarial examples (PGD, FGSM, gradient ascent) with the labels",
                   "  cnnviz adversarial --model zoo:efficientnet-lite0 --images cat.jpg --eps 2 --out adv\n"
                   "  cnnviz adversarial --model zoo:digits --images digits --target 3 --method ascent")
    add_model_options(p)
    p.add_argument("--images", nargs="+", required=True, help="image files or folders (or 'photos', 'digits')")
    p.add_argument("--method", choices=("pgd", "fgsm", "ascent"), default="pgd")
    p.add_argument("--eps", type=float, default=8.0, help="L∞ radius in grey levels out of 255 (default: 8)")
    p.add_argument("--steps", type=int, help="iterations (default: the method's)")
    p.add_argument("--target", type=int, help="targeted attack toward this class (default: untargeted)")
    add_run_options(p, "cnnviz-adversarial")
    p.set_defaults(run=_cmd_adversarial)


def _cmd_invert(args) -> int:
    ctx = Context(args)
    pixels, names = ctx.images(args.images)
    rows = [pixels.cpu()]
    with staged_output(Path(args.out)) as stage:
        for layer in args.layers:
            result = synthesis.invert_features(ctx.model, pixels, ctx.layer(layer), normalize=ctx.normalize,
                                               steps=args.steps, seed=args.seed, progress=ctx.progress)
            rows.append(result.images.cpu())
            for name, image, error in zip(names, result.images, result.relative_error):
                save_png(image, stage / f"{name}-{layer}.png", upscale=_upscale(ctx.size))
                ctx.say(f"{name} from {layer}: relative feature error {float(error):.3f}")
        save_png(image_grid(torch.cat(rows), nrow=len(names), scale=False), stage / "grid.png",
                 upscale=_upscale(ctx.size))
    return 0


def add_invert_parser(commands) -> None:
    p = add_parser(commands, "invert", "reconstruct images from their activations at one or more layers",
                   "  cnnviz invert --model zoo:digits --images digits --layers features.relu2 features.relu4")
    add_model_options(p)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--layers", nargs="+", required=True, help="layer names (see `cnnviz layers`)")
    p.add_argument("--steps", type=int, default=200)
    add_run_options(p, "cnnviz-invert")
    p.set_defaults(run=_cmd_invert)


def _cmd_dream(args) -> int:
    ctx = Context(args)
    pixels, names = ctx.images(args.images)
    result = synthesis.deep_dream(ctx.model, pixels, ctx.layer(args.layer), normalize=ctx.normalize,
                                  steps=args.steps, octaves=args.octaves, seed=args.seed, progress=ctx.progress)
    return _save_images(args, ctx, names, result.images, "-dream")


def add_dream_parser(commands) -> None:
    p = add_parser(commands, "dream", "DeepDream: amplify what a layer sees in the images",
                   "  cnnviz dream --model zoo:efficientnet-lite0 --images photo.jpg --layer _blocks.7 --size 320")
    add_model_options(p)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--steps", type=int, default=20, help="steps per octave")
    p.add_argument("--octaves", type=int, default=3)
    add_run_options(p, "cnnviz-dream")
    p.set_defaults(run=_cmd_dream)


# the texture methods of `cnnviz texture --method`: Gram matrices of a network, or without one

TEXTURE_METHODS = {"gram": "synthesize_texture", "quilt": "texture_quilt", "efros-leung": "texture_efros_leung"}
NONPARAMETRIC_SOURCE_SIZE = 128  # px of the source when --size is not given (no model to ask)


def _check_texture(args) -> None:
    if args.method == "gram" and not args.layers:
        raise CLIError("--layers is required for --method gram (the layers whose Gram matrices are matched)")
    if args.method != "gram" and args.layers:
        raise CLIError(f"--layers applies to --method gram only; --method {args.method} uses no network")
    if args.method == "gram":
        method_options(args, get_method(TEXTURE_METHODS["gram"]))  # refuses --patch, --window, ...


def _cmd_texture(args) -> int:
    if args.method != "gram":
        return _cmd_texture_nonparametric(args)
    ctx = Context(args)
    pixels, names = ctx.images(args.images)
    layers = [ctx.layer(layer) for layer in args.layers]
    size = args.texture_size
    result = synthesis.synthesize_texture(ctx.model, pixels, layers, size=size, normalize=ctx.normalize,
                                          steps=args.steps, seed=args.seed, progress=ctx.progress)
    return _save_images(args, ctx, names, result.images, "-texture")


def _cmd_texture_nonparametric(args) -> int:
    """Quilting / Efros-Leung: no model is loaded; the sources are read at --size (default 128)."""
    method = get_method(TEXTURE_METHODS[args.method])
    options = method_options(args, method)
    source_size = args.size or NONPARAMETRIC_SOURCE_SIZE
    pixels, names = load_images(args.images, source_size, 3, args.resize)
    pixels = pixels.to(args.device)
    size = args.texture_size or 2 * source_size
    with staged_output(Path(args.out)) as stage:
        for name, source in zip(names, pixels):
            if source.std(0).max() == 0:  # a grayscale picture: one channel does the work
                source = source[:1]
            made = method.function(source, size, **options)
            save_png(made[0], stage / f"{name}-{args.method}.png", upscale=max(1, 128 // size))
            if not args.quiet:
                print(f"{name}: {args.method} {size}×{size} px from a {source_size} px source")
    return 0


def add_texture_parser(commands) -> None:
    p = add_parser(commands, "texture", "texture synthesis: new images with the texture of the images "
                   "(Gram matrices of a network, image quilting or Efros-Leung sampling)",
                   "  cnnviz texture --model zoo:efficientnet-lite0 --images brick.png --size 128 \\\n"
                   "      --layers _blocks.0 _blocks.2 _blocks.4 _blocks.7\n"
                   "  cnnviz texture --method quilt --images brick.png --size 128 --texture-size 256 --patch 32\n"
                   "  cnnviz texture --method efros-leung --images brick.png --size 64 --texture-size 96 --window 11")
    add_model_options(p)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--method", choices=tuple(TEXTURE_METHODS), default="gram",
                   help="gram: match a network's Gram matrices (Gatys et al. 2015; needs --layers); quilt: image "
                        "quilting (Efros & Freeman 2001); efros-leung: non-parametric sampling (Efros & Leung "
                        "1999). quilt and efros-leung use no network: the sources are read at --size "
                        f"(default {NONPARAMETRIC_SOURCE_SIZE})")
    p.add_argument("--layers", nargs="+", help="layers whose Gram matrices are matched (--method gram)")
    p.add_argument("--steps", type=int, default=100, help="L-BFGS iterations (--method gram)")
    p.add_argument("--texture-size", type=int, help="side of the new textures in px (default: gram the source's "
                   "size, quilt / efros-leung twice it)")
    add_run_options(p, "cnnviz-texture")
    add_method_options(p, [get_method(name) for name in TEXTURE_METHODS.values()])
    p.set_defaults(run=_cmd_texture, check=_check_texture)


def _cmd_style(args) -> int:
    if args.fast:
        return _cmd_fast_style(args)
    ctx = Context(args)
    content, names = ctx.images(args.content)
    style, _ = ctx.images(args.style)
    layers = [ctx.layer(layer) for layer in args.style_layers]
    result = synthesis.style_transfer(ctx.model, content, style[:1], ctx.layer(args.content_layer), layers,
                                      normalize=ctx.normalize, steps=args.steps, style_weight=args.style_weight,
                                      seed=args.seed, progress=ctx.progress)
    return _save_images(args, ctx, names, result.images, "-styled")


FAST_STYLE_SIZE = 256  # the size the shipped network is evaluated at


def _check_style(args) -> None:
    """Optimisation (default): a style image and the layers. ``--fast``: the shipped
    network, a style by ``--style NAME`` or ``--style-index``, no model options."""
    if not args.fast:
        missing = [flag for flag, value in (("--style", args.style), ("--content-layer", args.content_layer),
                                            ("--style-layers", args.style_layers)) if not value]
        if missing:
            raise CLIError(f"{', '.join(missing)} required (or --fast for the shipped feed-forward network)")
        if args.style_index is not None:
            raise CLIError("--style-index applies only with --fast")
        return
    given = [flag for flag in ("content_layer", "style_layers", "weights", "mean", "std")
             if getattr(args, flag) is not None] + (["model"] if args.model != DEFAULT_MODEL else [])
    if given:
        raise CLIError(f"--{given[0].replace('_', '-')} does not apply to --fast (the shipped network needs no model)")
    if args.style is not None and args.style_index is not None:
        raise CLIError("give --style NAME or --style-index, not both")
    from ..zoo import fast_style_network

    styles = fast_style_network().styles
    if args.style is not None and args.style not in styles:
        raise CLIError(f"--style {args.style!r}: with --fast, one of the shipped styles: {', '.join(styles)}")
    if args.style_index is not None and not 0 <= args.style_index < len(styles):
        raise CLIError(f"--style-index must be in [0, {len(styles) - 1}] ({', '.join(styles)}), got {args.style_index}")


def _cmd_fast_style(args) -> int:
    from ..zoo import fast_style_network

    network = fast_style_network().to(args.device)
    style = args.style if args.style is not None else args.style_index or 0
    size = args.size or FAST_STYLE_SIZE
    content, names = load_images(args.content, size, 3, args.resize)
    started = time.perf_counter()
    images = synthesis.stylize(content.to(args.device), style, network)
    seconds = time.perf_counter() - started
    name = style if isinstance(style, str) else network.styles[style]
    with staged_output(Path(args.out)) as stage:
        for image_name, image in zip(names, images):
            save_png(image, stage / f"{image_name}-{name}.png")
    if not args.quiet:
        print(f"stylized {len(names)} images ({size}×{size} px) as {name!r} in {seconds:.2f} s; wrote {args.out}/")
    return 0


def add_style_parser(commands) -> None:
    p = add_parser(commands, "style", "style transfer: the content images painted in the style image's style "
                   "(optimisation), or in a shipped style by one forward pass (--fast)",
                   "  cnnviz style --model zoo:efficientnet-lite0 --content photo.jpg --style painting.jpg \\\n"
                   "      --content-layer _blocks.7 --style-layers _blocks.0 _blocks.2 _blocks.4 --size 160\n"
                   "  cnnviz style --fast --content photo.jpg --style brick      # or --style-index 1 (stain)")
    add_model_options(p)
    p.add_argument("--content", nargs="+", required=True)
    p.add_argument("--style", help="the style image; with --fast a shipped style's name (brick, stain)")
    p.add_argument("--content-layer")
    p.add_argument("--style-layers", nargs="+")
    p.add_argument("--style-weight", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="L-BFGS iterations")
    fast = p.add_argument_group("fast (feed-forward) style transfer")
    fast.add_argument("--fast", action="store_true", help="one forward pass of the shipped style network "
                      f"(zoo.fast_style_network) instead of the optimisation; images at --size (default "
                      f"{FAST_STYLE_SIZE})")
    fast.add_argument("--style-index", type=int, help="with --fast: the style by index (default 0)")
    add_run_options(p, "cnnviz-style")
    p.set_defaults(run=_cmd_style, check=_check_style)


# --- filters and features ------------------------------------------------------------------

def _cmd_filters(args) -> int:
    ctx = Context(args)
    layer = ctx.layer(args.layer) if args.layer else None
    grid = features.filter_grid(ctx.model, layer)
    with staged_output(Path(args.out)) as stage:
        save_png(grid, stage / f"filters-{layer or 'first'}.png", upscale=args.upscale)
    ctx.say(f"wrote {args.out}/filters-{layer or 'first'}.png")
    return 0


def add_filters_parser(commands) -> None:
    p = add_parser(commands, "filters", "the filters of a convolution as a picture",
                   "  cnnviz filters --model zoo:efficientnet-lite0 --out filters\n"
                   "  cnnviz filters --model zoo:digits --layer features.conv2 --upscale 4")
    add_model_options(p)
    p.add_argument("--layer", help="a Conv2d (default: the first)")
    p.add_argument("--upscale", type=int, default=8)
    add_run_options(p, "cnnviz-filters")
    p.set_defaults(run=_cmd_filters)


def _cmd_activations(args) -> int:
    ctx = Context(args)
    pixels, names = ctx.images(args.images)
    layer = ctx.layer(args.layer)
    result = features.activation_grid(ctx.model, ctx.normalize(pixels), layer,
                                      **method_options(args, get_method("activation_grid")))
    with staged_output(Path(args.out)) as stage:
        for index, name in enumerate(names):
            save_png(result.grids[index], stage / f"activations-{layer}-{name}.png", upscale=args.upscale)
        # which channel each tile shows (raster order), per image
        (stage / f"activations-{layer}-channels.txt").write_text(
            "".join(f"{name}: {' '.join(map(str, result.channels[i].tolist()))}\n" for i, name in enumerate(names)))
    ctx.say(f"wrote {args.out}/activations-{layer}-*.png ({result.tiles.shape[1]} tiles each) and "
            f"activations-{layer}-channels.txt")
    return 0


def add_activations_parser(commands) -> None:
    p = add_parser(commands, "activations", "the feature maps of a layer for each image as a grid of tiles",
                   "  cnnviz activations --model zoo:digits --images digits --layer features.conv5 --top-k 16\n"
                   "  cnnviz activations --model zoo:efficientnet-lite0 --images cat.jpg --layer _blocks.10 "
                   "--scale shared")
    add_model_options(p)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--layer", required=True, help="a layer with a feature map [N, K, h, w] (see `cnnviz layers`)")
    p.add_argument("--upscale", type=int, default=4)
    add_run_options(p, "cnnviz-activations")
    add_method_options(p, [get_method("activation_grid")])
    p.set_defaults(run=_cmd_activations)


def _features(ctx, args):
    pixels, names = ctx.images(args.images)
    feats = features.extract_features(ctx.model, ctx.normalize(pixels), ctx.layer(args.layer),
                                      pool=None if args.pool == "flatten" else args.pool,
                                      device=ctx.device, progress=ctx.progress)
    return pixels, names, feats.reshape(len(feats), -1)


def _cmd_features(args) -> int:
    ctx = Context(args)
    _, names, feats = _features(ctx, args)
    with staged_output(Path(args.out)) as stage:
        np.save(stage / "features.npy", feats.cpu().numpy())
        (stage / "names.txt").write_text("\n".join(names) + "\n")
        # one row per image, one column per feature, min-max coloured
        save_png(colorize(feats.cpu()), stage / "features.png", upscale=max(1, 256 // max(feats.shape)))
    ctx.say(f"wrote {args.out}/features.npy {list(feats.shape)}, names.txt and features.png")
    return 0


def _add_feature_options(p, pool="avg") -> None:
    add_model_options(p)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--pool", choices=("avg", "max", "flatten"), default=pool,
                   help=f"spatial pooling of [N, C, h, w] outputs, or flatten them (default: {pool})")


def add_features_parser(commands) -> None:
    p = add_parser(commands, "features", "the activations of a layer for every image → features.npy",
                   "  cnnviz features --model zoo:digits --images digits:all --layer classifier.fc1 --out feats")
    _add_feature_options(p)
    add_run_options(p, "cnnviz-features")
    p.set_defaults(run=_cmd_features)


def _cmd_neighbors(args) -> int:
    ctx = Context(args)
    pixels, names, feats = _features(ctx, args)
    k = min(args.k, len(feats) - 1)
    if k < 1:
        raise CLIError("--images: need at least 2 images for neighbours")
    distances, indices = features.nearest_neighbors(feats, None, k=k, metric=args.metric, exclude_self=True)
    with staged_output(Path(args.out)) as stage:
        np.save(stage / "indices.npy", indices.cpu().numpy())
        np.save(stage / "distances.npy", distances.cpu().numpy())
        shown = range(min(len(names), args.show))
        rows = torch.cat([torch.cat([pixels[q:q + 1], pixels[indices[q]]]).cpu() for q in shown])
        save_png(image_grid(rows, nrow=k + 1, scale=False), stage / "neighbors.png", upscale=_upscale(ctx.size))
    ctx.say(f"wrote {args.out}/indices.npy, distances.npy [{len(feats)}, {k}], neighbors.png")
    return 0


def add_neighbors_parser(commands) -> None:
    p = add_parser(commands, "neighbors", "nearest neighbours of each image in a layer's feature space",
                   "  cnnviz neighbors --model zoo:digits --images digits --layer classifier.fc1 -k 5")
    _add_feature_options(p)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--metric", choices=("l2", "cosine"), default="l2")
    p.add_argument("--show", type=int, default=10, help="queries drawn in neighbors.png")
    add_run_options(p, "cnnviz-neighbors")
    p.set_defaults(run=_cmd_neighbors)


def _cmd_embed(args) -> int:
    ctx = Context(args)
    pixels, names, feats = _features(ctx, args)
    points = features.embed(feats, args.method, seed=args.seed)
    with staged_output(Path(args.out)) as stage:
        np.save(stage / "embedding.npy", points.cpu().numpy())
        features.plot_embedding(points, images=pixels.cpu(), path=stage / "embedding.png",
                                title=f"{args.method} of {args.layer}")
    ctx.say(f"wrote {args.out}/embedding.npy [{len(points)}, 2] and embedding.png")
    return 0


def add_embed_parser(commands) -> None:
    p = add_parser(commands, "embed", "a 2-D map (PCA or t-SNE) of the images in a layer's feature space",
                   "  cnnviz embed --model zoo:digits --images digits:all --layer classifier.fc1 --method tsne")
    _add_feature_options(p)
    p.add_argument("--method", choices=("pca", "tsne"), default="pca")
    add_run_options(p, "cnnviz-embed")
    p.set_defaults(run=_cmd_embed)


def _cmd_patches(args) -> int:
    ctx = Context(args)
    pixels, _ = ctx.images(args.images)
    top = features.max_activating_patches(ctx.model, ctx.normalize(pixels), ctx.layer(args.layer),
                                          channels=args.channels, k=args.k, guided=args.guided, device=ctx.device,
                                          progress=ctx.progress)
    with staged_output(Path(args.out)) as stage:
        save_png(features.patch_grid(top, inverse=ctx.normalize.inverse), stage / f"patches-{args.layer}.png",
                 upscale=_upscale(ctx.size))
    ctx.say(f"wrote {args.out}/patches-{args.layer}.png")
    return 0


def add_patches_parser(commands) -> None:
    p = add_parser(commands, "patches", "the image patches that activate each channel of a layer most",
                   "  cnnviz patches --model zoo:digits --images digits:all --layer features.conv4 --channels 0 1 2")
    add_model_options(p)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--channels", type=int, nargs="+", help="default: every channel")
    p.add_argument("-k", type=int, default=8, help="patches per channel")
    p.add_argument("--guided", action="store_true", help="also their guided backprop")
    add_run_options(p, "cnnviz-patches")
    p.set_defaults(run=_cmd_patches)


def _cmd_layers(args) -> int:
    loaded = load_context_model(args)
    model, normalize, size = loaded.model.to(args.device), loaded.normalize.to(args.device), loaded.size
    shapes = {}

    def record(name):
        def hook(module, args, output):  # returns None: the output is left alone
            shapes.setdefault(name, tuple(getattr(output, "shape", ())))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
             if n and not isinstance(m, torch.jit.ScriptModule)]
    try:
        with torch.no_grad():
            model(normalize(torch.full((1, normalize.channels, size, size), 0.5, device=args.device)))
    finally:
        for hook in hooks:
            hook.remove()
    probe = normalize(torch.full((1, normalize.channels, size, size), 0.5, device=args.device))
    suggested = {name for name, _ in candidate_layers(model, probe)}
    for name, module in model.named_modules():
        if name:
            mark = "*" if name in suggested else " "
            print(f"{mark} {name:40s} {type(module).__name__:20s} {list(shapes.get(name, ()))}")
    return 0


def add_layers_parser(commands) -> None:
    p = add_parser(commands, "layers", "the model's layer names and output shapes (* = image-shaped outputs, "
                   "from which the default CAM layer is the last)",
                   "  cnnviz layers --model zoo:efficientnet-lite0")
    add_model_options(p)
    add_run_options(p, None)
    p.set_defaults(run=_cmd_layers)


PARSERS = [add_visualize_parser, add_adversarial_parser, add_invert_parser, add_dream_parser, add_texture_parser,
           add_style_parser, add_filters_parser, add_features_parser, add_neighbors_parser, add_embed_parser,
           add_patches_parser, add_layers_parser]
PARSERS.insert(PARSERS.index(add_filters_parser) + 1, add_activations_parser)
