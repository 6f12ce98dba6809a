"""``cnnviz saliency`` and ``cnnviz merge``: the command-line face of :mod:`cnnviz_fast.pipeline`.

    cnnviz saliency --model resnet18 --data /data/images --out maps/ [--method M] [--dtype bf16]
    torchrun --nproc_per_node 8 -m cnnviz_fast saliency ...      (each rank writes its own shards)
    cnnviz merge maps/ node1/maps node2/maps                     (join per-node folders)
"""
from __future__ import annotations

import argparse
import importlib
import os

from .run import METHODS


def _load_data(spec: str, size: int, channels: int, normalize):
    """``--data``: a folder or a text file of paths (decoded by the pipeline), ``digits[:split]`` /
    ``samples`` (built-in images, normalised here), or ``package.module:factory`` returning a
    Tensor, Dataset, IterableDataset or DataLoader of model inputs (used as they are)."""
    from ..cli import load_images

    if os.path.exists(spec):
        return spec
    if spec.split(":")[0] in ("digits", "samples"):
        return normalize(load_images(spec, size, channels)[0])
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--data {spec!r}: cannot load factory ({error})") from error
    raise ValueError(f"--data {spec!r}: no such folder or file, and not digits[:split], samples or module:factory")


def _cmd_saliency(args) -> int:
    from ..cli import load_model
    from .distributed import init_distributed
    from .run import saliency_maps

    rank, world, device = init_distributed()
    model, normalize, size = load_model(args.model, args.weights)
    size = args.size or size
    data = _load_data(args.data, size, normalize.channels, normalize)
    kwargs = {}
    if args.layer:
        kwargs["layer"] = args.layer
    if args.method == "occlusion":
        kwargs.update(window=tuple(args.window), stride=tuple(args.stride))
    if args.method == "integrated_gradients" and args.steps:
        kwargs["steps"] = args.steps
    if args.method == "smoothgrad":
        if args.samples:
            kwargs["samples"] = args.samples
        kwargs["seed"] = args.seed
    target = "predicted" if args.target == "predicted" else int(args.target)
    # a ValueError (bad input, other settings in --out) becomes one line and exit status 2 in cli.main
    summary = saliency_maps(
        model, data, args.out, args.method, target, normalize=normalize, size=size,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device or device,
        dtype=args.dtype, channels_last=args.channels_last, map_dtype=args.map_dtype,
        shard_size=args.shard_size, overlays=args.pictures, decode=args.decode, progress=not args.quiet,
        **kwargs)
    if rank == 0:
        print(f"{args.out}: {summary.line()} [{args.method}, {world} rank(s)]")
    if world > 1:
        from torch import distributed as dist
        dist.destroy_process_group()
    return 0


def _cmd_merge(args) -> int:
    from .results import merge

    images, skipped = merge(args.out, args.folders)
    print(f"{args.out}: index of {images} images, {skipped} skipped")
    return 0


def add_saliency_parser(commands) -> argparse.ArgumentParser:
    from ..cli import MODEL_HELP

    sal = commands.add_parser("saliency", help="attribution maps for a whole dataset, streamed and resumable "
                                               "(torchrun for many GPUs and nodes)")
    sal.add_argument("--model", default="digits", help=MODEL_HELP)
    sal.add_argument("--weights", help="state dict for --model")
    sal.add_argument("--data", default="digits", help="a folder of images (recursive), a text file of paths, "
                     "digits[:split], samples, or package.module:factory (a Tensor/Dataset/DataLoader)")
    sal.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    sal.add_argument("--method", default="saliency", choices=sorted(METHODS))
    sal.add_argument("--target", default="predicted", help="'predicted' or a class index")
    sal.add_argument("--layer", help="layer for grad_cam / guided_grad_cam")
    sal.add_argument("--window", type=int, nargs=2, default=(16, 16), help="occlusion window")
    sal.add_argument("--stride", type=int, nargs=2, default=(8, 8), help="occlusion stride")
    sal.add_argument("--steps", type=int, help="integrated_gradients steps")
    sal.add_argument("--samples", type=int, help="smoothgrad samples")
    sal.add_argument("--seed", type=int, default=0, help="smoothgrad noise seed (default 0)")
    sal.add_argument("--size", type=int, help="input size (default: the model's)")
    sal.add_argument("--batch-size", type=int, default=64)
    sal.add_argument("--num-workers", type=int, help="decoding processes (default: up to 8 with a GPU, 1 on a CPU)")
    sal.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when present)")
    sal.add_argument("--dtype", choices=["bf16", "fp16"], help="run under autocast")
    sal.add_argument("--channels-last", action="store_true", help="NHWC memory layout")
    sal.add_argument("--map-dtype", choices=["float16", "float32"], default="float16")
    sal.add_argument("--shard-size", type=int, default=1024, help="items per output shard")
    sal.add_argument("--decode", choices=["pil", "gpu"], default="pil", help="gpu: nvJPEG on the device")
    sal.add_argument("--pictures", type=int, default=0, help="also save overlays of the first N images as PNG")
    sal.add_argument("--quiet", action="store_true")
    sal.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sal.set_defaults(run=_cmd_saliency)
    return sal


def add_merge_parser(commands) -> argparse.ArgumentParser:
    merge = commands.add_parser("merge", help="join the output folders of a saliency run's nodes")
    merge.add_argument("out", help="folder to write the merged run into (may be one of the folders)")
    merge.add_argument("folders", nargs="+", help="per-node output folders of the same run")
    merge.add_argument("--debug", action="store_true", help="show the traceback of an error")
    merge.set_defaults(run=_cmd_merge)
    return merge
