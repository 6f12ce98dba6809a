"""One way to walk over a user's data: a tensor, a Dataset, a DataLoader or an iterable of batches."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .validation import check_finite, check_model_inputs


def images_of(item):
    """Inputs of a dataset item or batch: ``x`` or the first element of ``(x, y, ...)``."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"data must yield tensors or (tensor, ...) tuples, got {type(item).__name__}")
    return item


def checked_batch(model, batch: torch.Tensor, seen: int, device, argument: str = "data") -> torch.Tensor:
    """``batch`` (inputs ``seen`` onwards of ``data``) checked and moved to ``device`` for the
    model: refused with a ValueError naming ``argument`` if it is not floating point, is a
    meta tensor, holds NaN or infinity, or is float64 for a lower-precision model; and never
    the caller's own memory, so a model that writes into its input cannot change the
    caller's data."""
    where = f"{argument} (inputs {seen} to {seen + len(batch) - 1})"
    if not batch.is_floating_point():
        raise ValueError(f"{where} must be floating-point model inputs, got {batch.dtype} (images stored as "
                         f"uint8: x.float() / 255, then the model's normalisation)")
    check_finite(batch, where)
    if seen == 0:
        check_model_inputs(model, batch, argument)
    moved = batch.to(device, non_blocking=True)
    return moved.clone() if moved.data_ptr() == batch.data_ptr() else moved


def data_length(data) -> Optional[int]:
    """Number of inputs in ``data`` when it is known without iterating, else None."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, DataLoader):
        if data.drop_last:
            return None
        try:
            return len(data.sampler)
        except TypeError:
            return None
    if isinstance(data, Dataset):
        try:
            return len(data)
        except TypeError:
            return None
    return None


def iter_batches(data, batch_size: int = 64, indices: Optional[Sequence[int]] = None,
                 num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Yield input batches ``Tensor[B, ...]`` from ``data`` in order.

    ``data``: a Tensor ``[M, ...]`` (sliced, no copy), a map-style ``Dataset`` (items ``x`` or
    ``(x, y)``), a ``DataLoader`` (its own batching), or any iterable of batches.
    ``indices`` restricts a Tensor or Dataset to those items (used to shard a dataset across
    ranks); other kinds of data cannot be restricted.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, torch.Tensor):
        if indices is None:
            for start in range(0, data.shape[0], batch_size):
                yield data[start:start + batch_size]
        else:
            index = torch.as_tensor(indices, dtype=torch.long)
            for start in range(0, len(index), batch_size):
                yield data[index[start:start + batch_size]]
        return
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        subset = data if indices is None else torch.utils.data.Subset(data, list(indices))
        loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        for batch in loader:
            yield images_of(batch)
        return
    if indices is not None:
        raise ValueError("indices can only restrict a Tensor or a map-style Dataset; "
                         f"got {type(data).__name__}")
    if not isinstance(data, Iterable):
        raise ValueError(f"data must be a Tensor, Dataset, DataLoader or iterable of batches, "
                         f"got {type(data).__name__}")
    for batch in data:
        yield images_of(batch)
