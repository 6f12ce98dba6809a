"""Saliency over a whole dataset: batched, streamed to a memory-mapped ``.npy`` file,
sharded across the ranks of a ``torchrun`` job.

    maps = saliency_maps(model, images, method="guided_backprop", out="maps.npy")

Under ``torchrun`` (``torch.distributed`` initialised, or ``init_distributed()``), rank r
of W handles items r, r+W, r+2W, … and writes its rows into the one output file, which
must therefore lie on a file system every rank sees (one node, or a shared mount).
The file is written as ``<out>.partial`` and renamed only when every rank has finished,
so an interrupted run never leaves a file that looks complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from . import attribution
from .core.data import data_length, iter_batches

# name -> attribution function; every one takes (model, inputs, target, **kwargs).
METHODS: Dict[str, Callable] = {
    "saliency": attribution.saliency,
    "smoothgrad": attribution.smoothgrad,
    "integrated_gradients": attribution.integrated_gradients,
    "guided_backprop": attribution.guided_backprop,
    "deconvnet": attribution.deconvnet,
    "grad_cam": attribution.grad_cam,
    "guided_grad_cam": attribution.guided_grad_cam,
    "occlusion": attribution.occlusion,
}


@dataclass
class SaliencyResult:
    """``maps``: ``Tensor[M, H, W]`` (memory-mapped when written to a file; on rank > 0 of a
    distributed run only this rank's rows are filled before the final barrier);
    ``predictions``: ``Tensor[M]`` class predicted for each input; ``path``: the file or None."""

    maps: torch.Tensor
    predictions: torch.Tensor
    path: Optional[Path]


def init_distributed() -> tuple:
    """Join the ``torchrun`` job described by the environment (no-op outside one).

    Returns ``(rank, world_size, device)``: NCCL and ``cuda:LOCAL_RANK`` when GPUs exist,
    else gloo and the CPU.
    """
    if "WORLD_SIZE" in os.environ and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    return _rank_world() + (device,)


def _rank_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def to_map(attributions: torch.Tensor) -> torch.Tensor:
    """One map per image: ``[N, H, W]`` as is; ``[N, C, H, W]`` by max |·| over channels
    (Simonyan et al.'s saliency map)."""
    return attributions.abs().amax(1) if attributions.dim() == 4 else attributions


def saliency_maps(
    model: nn.Module, data, method: str = "saliency", target: Union[str, int] = "predicted",
    out: Union[str, Path, None] = None, batch_size: int = 64, device: Union[str, torch.device, None] = None,
    progress: bool = True, dtype: torch.dtype = torch.float32, **method_kwargs,
) -> SaliencyResult:
    """Attribution maps ``[M, H, W]`` for every input of ``data`` with one method.

    Args:
        model: the network (moved to ``device``; restored as every method restores it).
        data: ``Tensor[M, C, H, W]`` or a map-style Dataset of such images (items ``x`` or
            ``(x, y)``); model inputs, already normalised.
        method: one of :data:`METHODS`; ``method_kwargs`` go to it (e.g. ``layer=`` for
            Grad-CAM, ``window=`` for occlusion, ``steps=`` for IG).
        target: ``"predicted"`` (the model's top class for each input) or a class index.
        out: path of a ``.npy`` file to stream the maps into (required with several ranks);
            predictions go to ``<out stem>.predictions.npy``.
        batch_size: images per method call.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if not (target == "predicted" or (isinstance(target, int) and not isinstance(target, bool))):
        raise ValueError(f"target must be 'predicted' or a class index, got {target!r}")
    total = data_length(data)
    if total is None or isinstance(data, torch.utils.data.IterableDataset):
        raise ValueError("data must be a Tensor or a map-style Dataset with a length")
    if total == 0:
        raise ValueError("data is empty")
    rank, world = _rank_world()
    if world > 1 and out is None:
        raise ValueError("out (a path every rank can write) is required when running on several ranks")
    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    model = model.to(device)
    height, width = next(iter_batches(data, 1)).shape[-2:]

    path = Path(out) if out is not None else None
    if path is not None:
        partial = path.with_name(path.name + ".partial")
        preds_path = path.with_name(path.stem + ".predictions.npy")
        preds_partial = preds_path.with_name(preds_path.name + ".partial")
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(partial, "w+", dtype=np.dtype(str(dtype).split(".")[-1]),
                                      shape=(total, height, width)).flush()
            np.lib.format.open_memmap(preds_partial, "w+", dtype=np.int64, shape=(total,)).flush()
        _barrier()
        maps = torch.from_numpy(np.load(partial, mmap_mode="r+"))
        predictions = torch.from_numpy(np.load(preds_partial, mmap_mode="r+"))
    else:
        maps = torch.empty(total, height, width, dtype=dtype)
        predictions = torch.empty(total, dtype=torch.long)

    mine = range(rank, total, world)
    function = METHODS[method]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), desc=f"{method} (rank 0 of {world})", unit="img")
    try:
        position = 0
        for inputs in iter_batches(data, batch_size, indices=None if world == 1 else mine):
            rows = torch.as_tensor(mine[position:position + inputs.shape[0]])
            position += inputs.shape[0]
            inputs = inputs.to(device)
            with torch.inference_mode():
                logits = _predict(model, inputs)
            classes = logits.argmax(1)
            chosen = classes if target == "predicted" else torch.full_like(classes, target)
            result = to_map(function(model, inputs, target=chosen, **method_kwargs))
            maps[rows] = result.detach().to("cpu", dtype)
            predictions[rows] = classes.cpu()
            if bar is not None:
                bar.update(inputs.shape[0])
    except BaseException:
        if path is not None and world == 1:
            for leftover in (partial, preds_partial):
                leftover.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    if path is not None:
        _barrier()
        if rank == 0:
            os.replace(partial, path)
            os.replace(preds_partial, preds_path)
        _barrier()
        maps = torch.from_numpy(np.load(path, mmap_mode="c"))
        predictions = torch.from_numpy(np.load(preds_path, mmap_mode="c"))
    return SaliencyResult(maps, predictions, path)


def _predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode, restoring the model's mode (the methods do the same)."""
    from .core import model_guard
    with model_guard(model):
        return model(inputs)
