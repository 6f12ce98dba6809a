"""``cnnviz saliency`` and ``cnnviz merge``: the command-line face of :mod:`cnnviz_fast.pipeline`.

    cnnviz saliency --model zoo:digits --data digits --out maps/ [--method M] [--dtype bf16]
    torchrun --nproc_per_node 8 -m cnnviz_fast saliency ...      (each rank writes its own shards)
    cnnviz merge maps/ node1/maps node2/maps                     (join per-node folders)
"""
from __future__ import annotations

import importlib
import os

from .. import registry
from ..loading import load_images
from ..pipeline import init_distributed, merge, saliency_maps
from .common import CLIError, add_method_options, add_model_options, add_parser, load_context_model, method_options

DATA_HELP = ("a folder of images (recursive), a text file of paths, digits[:split], samples, photos, or "
             "package.module:factory (a Tensor/Dataset/DataLoader of model inputs)")


def load_data(spec: str, size: int, channels: int, normalize, resize: str):
    """``--data``: a folder or a text file of paths (decoded by the pipeline), ``digits[:split]`` /
    ``samples`` / ``photos`` (built-in images, normalised here), or ``package.module:factory``
    returning a Tensor, Dataset, IterableDataset or DataLoader of model inputs (used as they are)."""
    if os.path.exists(spec):
        return spec
    if spec.split(":")[0] in ("digits", "samples", "photos"):
        return normalize(load_images(spec, size, channels, resize)[0])
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--data {spec!r}: cannot load factory ({error})") from None
    raise ValueError(f"--data {spec!r}: no such folder or file, and not digits[:split], samples, photos or "
                     f"module:factory")


def _check_saliency(args) -> None:
    method = registry.get_method(args.method, "--method")
    method_options(args, method)  # an option of another method: one line, before the model loads
    if args.layer is not None and not method.needs_layer:
        raise CLIError(f"--layer does not apply to {method.name} (it takes no layer)")
    if args.target != "predicted" and not args.target.lstrip("-").isdigit():
        raise CLIError(f"--target must be 'predicted' or a class index, got {args.target!r}")


def _cmd_saliency(args) -> int:
    rank, world, device = init_distributed()
    method = registry.get_method(args.method, "--method")
    loaded = load_context_model(args)
    data = load_data(args.data, loaded.size, loaded.channels, loaded.normalize, args.resize)
    options = method_options(args, method)
    if args.layer is not None:
        options["layer"] = args.layer
    target = "predicted" if args.target == "predicted" else int(args.target)
    # a ValueError (bad input, other settings in --out) becomes one line and exit status 2 in cli.main
    summary = saliency_maps(
        loaded.model, data, args.out, method.name, target, normalize=loaded.normalize, size=loaded.size,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device or device,
        dtype=args.dtype, channels_last=args.channels_last, map_dtype=args.map_dtype,
        shard_size=args.shard_size, overlays=args.pictures, decode=args.decode, progress=not args.quiet,
        resize=args.resize, **options)
    if rank == 0:
        print(f"{args.out}: {summary.line()} [{method.name}, {world} rank(s)]")
    if world > 1:
        from torch import distributed as dist
        dist.destroy_process_group()
    return 0


def _cmd_merge(args) -> int:
    images, skipped = merge(args.out, args.folders)
    print(f"{args.out}: index of {images} images, {skipped} skipped")
    return 0


def add_saliency_parser(commands):
    methods = [registry.get_method(name) for name in registry.attribution_methods()]
    sal = add_parser(commands, "saliency", "attribution maps of any registered method for a whole dataset, "
                     "streamed and resumable (torchrun for many GPUs and nodes)",
                     "  cnnviz saliency --model zoo:digits --data digits --out maps\n"
                     "  cnnviz saliency --data photos/ --method grad_cam --out cams        (default layer, said)\n"
                     "  cnnviz saliency --data photos/ --method occlusion --window 32 --stride 16 --out occ\n"
                     "  torchrun --nproc_per_node 8 -m cnnviz_fast saliency --data /data --out maps --device cuda")
    add_model_options(sal)
    sal.add_argument("--data", default="photos", help=f"{DATA_HELP} (default: photos)")
    sal.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    sal.add_argument("--method", default="saliency", choices=[m.name for m in methods],
                     help="the attribution method (default: saliency)")
    sal.add_argument("--target", default="predicted", help="'predicted' or a class index")
    sal.add_argument("--layer", help="layer for methods that need one (default: the registry's rule, said)")
    sal.add_argument("--seed", type=int, default=0, help="seed of random methods (default 0)")
    sal.add_argument("--batch-size", type=int, default=64, help="images per forward/backward (default 64)")
    sal.add_argument("--num-workers", type=int, help="decoding processes (default: up to 8 with a GPU, 1 on a CPU)")
    sal.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when present, else cpu)")
    sal.add_argument("--dtype", choices=["bf16", "fp16"], help="run under autocast")
    sal.add_argument("--channels-last", action="store_true", help="NHWC memory layout")
    sal.add_argument("--map-dtype", choices=["float16", "float32"], default="float16")
    sal.add_argument("--shard-size", type=int, default=1024, help="items per output shard")
    sal.add_argument("--decode", choices=["pil", "gpu"], default="pil", help="gpu: nvJPEG on the device")
    sal.add_argument("--pictures", type=int, default=0, help="also save overlays of the first N images as PNG")
    sal.add_argument("--quiet", action="store_true")
    sal.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_method_options(sal, methods)
    sal.set_defaults(run=_cmd_saliency, check=_check_saliency)
    return sal


def add_merge_parser(commands):
    merger = add_parser(commands, "merge", "join the output folders of a saliency run's nodes",
                        "  cnnviz merge maps/ node1/maps node2/maps")
    merger.add_argument("out", help="folder to write the merged run into (may be one of the folders)")
    merger.add_argument("folders", nargs="+", help="per-node output folders of the same run")
    merger.add_argument("--debug", action="store_true", help="show the traceback of an error")
    merger.set_defaults(run=_cmd_merge)
    return merger


PARSERS = [add_saliency_parser, add_merge_parser]
