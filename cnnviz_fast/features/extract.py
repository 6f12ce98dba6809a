"""Activations of one layer for every input of a dataset, in memory or streamed to disk."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core import forward_to_layers, get_layer, model_guard
from ..core.data import checked_batch, data_length, iter_batches
from ..core.npy_writer import NpyWriter
from ..core.validation import (check_choice, check_device, check_image_batch, check_positive_int,
                               model_device_dtype)

_POOLS = (None, "avg", "max")


def _flatten(activation: torch.Tensor, pool: Optional[str]) -> torch.Tensor:
    """``[B, C, *spatial]`` → ``[B, D]``: global average/max over the spatial dims, or flatten."""
    if activation.dim() > 2 and pool == "avg":
        return activation.flatten(2).mean(2)
    if activation.dim() > 2 and pool == "max":
        return activation.flatten(2).amax(2)
    return activation.reshape(activation.shape[0], -1)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _known_length(data) -> Optional[int]:
    """Inputs ``data`` will yield, when known without iterating. A DataLoader yields what
    its sampler draws (fewer than its dataset with a subset sampler or ``drop_last``)."""
    if isinstance(data, DataLoader):
        if data.drop_last and data.batch_size is not None:
            return None
        try:
            return len(data.sampler) if data.batch_size is not None else None
        except TypeError:
            return None
    return data_length(data)


def extract_features(
    model: nn.Module, data, layer: str, batch_size: int = 256,
    out: Union[str, Path, None] = None, pool: Optional[str] = None,
    length: Optional[int] = None, device: Union[str, torch.device, None] = None,
    progress: Optional[bool] = None, num_workers: int = 0,
) -> torch.Tensor:
    """The activations of ``layer`` for every input of ``data``: ``Tensor[M, D]``.

    Runs the model in eval mode under ``torch.inference_mode``, stopping each forward pass
    at ``layer``; the model is left as it was.

    Args:
        model: the network (its parameters' device is used unless ``device`` is given).
        data: model inputs: a ``Tensor[M, C, H, W]``, a map-style ``Dataset`` (items ``x``
            or ``(x, y)``), a ``DataLoader`` or any iterable of batches ``x`` or ``(x, y, …)``.
        layer: dotted module name.
        batch_size: inputs per forward pass (a DataLoader keeps its own batching).
        out: path of a ``.npy`` file to stream the features into. It is written as
            ``<out>.partial`` and renamed to ``out`` only when every input is done; after an
            exception the partial file is deleted, so a file at ``out`` is always complete.
            Memory stays constant whatever the dataset size.
        pool: ``None`` (flatten the activation: D = C·h·w), ``"avg"`` or ``"max"`` (global
            pooling over the spatial dims: D = C).
        length: number of inputs, for an iterable whose length is unknown (a Tensor,
            Dataset or DataLoader knows its own); checked when given.
        progress: show a tqdm bar (``None``: only on a terminal).
        num_workers: DataLoader workers for a Dataset.

    Returns:
        ``Tensor[M, D]`` float (the layer's dtype; bfloat16/half become float32 on disk):
        with ``out``, a CPU tensor backed by the memory-mapped file (copy-on-write: changes
        to it are not written back); else in memory, on ``data``'s device for a Tensor and
        on the CPU otherwise.
    """
    get_layer(model, layer)
    if isinstance(data, torch.Tensor) and not data.is_meta:  # a meta tensor: refused below, with its positions
        check_image_batch(data)
    check_positive_int(batch_size, "batch_size")
    check_choice(pool, _POOLS, "pool")
    if length is not None:
        check_positive_int(length, "length", minimum=0)
    known = _known_length(data)
    if known is not None and length is not None and known != length:
        raise ValueError(f"length={length} but data holds {known} inputs")
    total = known if known is not None else length
    device = check_device(device) or model_device_dtype(model)[0]
    result_device = data.device if isinstance(data, torch.Tensor) else torch.device("cpu")
    path = Path(out) if out is not None else None
    if path is not None and path.is_dir():  # found now, not after all the work at the final rename
        raise ValueError(f"out must be the path of a .npy file, got the directory {str(path)!r}")

    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="input", desc=f"features of {layer}",
               disable=None if progress is None else not progress)
    writer: Optional[NpyWriter] = None
    chunks, filled, seen = [], 0, 0
    features = None
    try:
        with model_guard(model):
            for inputs in iter_batches(data, batch_size, num_workers=num_workers):
                batch = check_image_batch(checked_batch(model, inputs, seen, device))
                seen += len(inputs)
                with torch.inference_mode():
                    activation = forward_to_layers(model, batch, [layer])[layer]
                    rows = _flatten(activation, pool)
                # Outside inference mode from here: the result must be an ordinary tensor.
                if rows.dtype in (torch.float16, torch.bfloat16) and path is not None:
                    rows = rows.float()
                if path is not None:
                    if writer is None:
                        writer = NpyWriter(path, rows.shape[1:], _numpy_dtype(rows.dtype), length=total)
                    writer.write(rows.cpu().numpy())
                elif total is not None:
                    if features is None:
                        features = torch.empty(total, rows.shape[1], dtype=rows.dtype, device=result_device)
                    if filled + len(rows) > total:
                        raise ValueError(f"data yielded more than length={total} inputs")
                    features[filled:filled + len(rows)] = rows
                    filled += len(rows)
                else:
                    chunks.append(rows.to(result_device))
                bar.update(len(rows))
        if writer is None and path is not None:
            raise ValueError("data is empty: no input to extract features from")
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if path is not None:
        return torch.from_numpy(np.load(path, mmap_mode="c"))
    if total is not None:
        if features is None:
            raise ValueError("data is empty: no input to extract features from")
        if filled != total:
            raise ValueError(f"data yielded {filled} inputs, expected length={total}")
        return features
    if not chunks:
        raise ValueError("data is empty: no input to extract features from")
    return torch.cat(chunks)
