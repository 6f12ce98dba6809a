"""Where the images come from: a folder, a text file of paths, a Dataset / IterableDataset /
DataLoader, or a tensor, each read as numbered items (position 0, 1, …) in a fixed order.

Indexable sources (files, a tensor, a map-style Dataset) are read only where needed: the run
asks for batches of positions and the decoding happens in DataLoader worker processes.
Streams (an IterableDataset or a DataLoader) are read whole, in order; the run keeps the items
it needs. A file that cannot be decoded, or a Dataset item that raises, becomes a *skip* with
a reason instead of stopping the run.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from ..core.images import check_resize, fit_pixels
from ..core.validation import check_choice
from ..loading import IMAGE_SUFFIXES, decode_file
DECODERS = ("pil", "gpu")


@dataclass
class Batch:
    """Items of one batch that decoded (``positions``, ``ids``, ``inputs``) and those skipped."""

    positions: np.ndarray          # int64[B]
    ids: List[str]
    inputs: torch.Tensor           # [B, C, H, W]: uint8 pixels (files) or model inputs
    skipped: List[Tuple[int, str, str]] = field(default_factory=list)  # (position, id, reason)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread (``pin_memory=True``, next to a GPU)."""
        if isinstance(self.inputs, torch.Tensor):
            self.inputs = self.inputs.pin_memory()
        return self


# ---------------------------------------------------------------------------- decoding

def decode_image(data, size: int, channels: int, resize: str = "crop") -> np.ndarray:
    """A file (path or bytes) decoded with Pillow as ``uint8[size, size, channels]``, fitted by
    the package's one ``resize`` policy (:func:`cnnviz_fast.loading.decode_file`)."""
    return decode_file(data, size, channels, resize)


def decode_on_device(raw: Sequence[torch.Tensor], size: int, channels: int,
                     device: torch.device, resize: str = "crop") -> Tuple[List[int], torch.Tensor, List[Tuple[int, str]]]:
    """Decode file bytes with ``torchvision.io`` on ``device`` (nvJPEG on a GPU), resize there.

    Returns ``(kept, pixels uint8[K, C, size, size], failed [(index, reason)])``. A batch whose
    joint JPEG decode fails is retried one file at a time, so one bad file skips only itself;
    a file torchvision's decoders refuse (CMYK JPEG, 16-bit PNG, ...) is decoded by Pillow,
    as in the CPU path, and skipped only when Pillow fails too.
    """
    import torchvision.io as tio

    mode = tio.ImageReadMode.RGB if channels == 3 else tio.ImageReadMode.GRAY
    decoded: List[Optional[torch.Tensor]] = [None] * len(raw)
    failed: List[Tuple[int, str]] = []

    def with_pillow(i: int) -> None:
        try:
            array = decode_image(raw[i].numpy().tobytes(), size, channels, resize)
            decoded[i] = torch.from_numpy(array).permute(2, 0, 1).to(device)
        except Exception as error:  # noqa: BLE001 - a bad file is a skip, whatever it raised
            failed.append((i, f"decode: {error}".splitlines()[0]))

    jpegs = [i for i, data in enumerate(raw) if data.numel() > 2 and data[0] == 0xFF and data[1] == 0xD8]
    try:
        for i, image in zip(jpegs, tio.decode_jpeg([raw[i] for i in jpegs], mode=mode, device=device)):
            decoded[i] = image
    except RuntimeError:
        for i in jpegs:
            try:
                decoded[i] = tio.decode_jpeg(raw[i], mode=mode, device=device)
            except RuntimeError:
                with_pillow(i)
    for i, data in enumerate(raw):
        if i in jpegs:
            continue
        try:  # PNG and others: torchvision's CPU decoders, then on to the device
            decoded[i] = tio.decode_image(data, mode=mode).to(device)
        except RuntimeError:
            with_pillow(i)
    kept = [i for i, image in enumerate(decoded) if image is not None]
    pixels = [fit_pixels(decoded[i][None].float(), size, resize)[0] for i in kept]
    stacked = (torch.stack(pixels).round_().clamp_(0, 255).to(torch.uint8) if pixels
               else torch.empty(0, channels, size, size, dtype=torch.uint8, device=device))
    return kept, stacked, sorted(failed)


# ---------------------------------------------------------------------------- sources

class Source:
    """Base: ``length`` (None for streams), ``describe()`` for run.json, ``batches()``."""

    kind = "?"
    length: Optional[int] = None
    pixels = False  # True: batches hold uint8 pixels to normalise; False: model inputs

    def describe(self) -> dict:
        return {"kind": self.kind, "length": self.length}


class _ItemDataset(Dataset):
    """Position → ``(position, id, uint8 HWC array | tensor | None, reason)`` in a worker."""

    def __init__(self, read, ident):
        self.read, self.ident = read, ident

    def __getitem__(self, position):
        ident = self.ident(position)
        try:
            return position, ident, self.read(position), ""
        except Exception as error:  # noqa: BLE001 - a bad item is a skip, whatever it raised
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            return position, ident, None, reason


def _collate(items) -> Batch:
    good = [item for item in items if item[2] is not None]
    skipped = [(int(p), i, r) for p, i, value, r in items if value is None]
    tensors = [torch.from_numpy(v).permute(2, 0, 1) if isinstance(v, np.ndarray) and v.ndim == 3
               else torch.as_tensor(v) for _, _, v, _ in good]
    inputs = torch.stack(tensors) if tensors else torch.empty(0)
    return Batch(np.array([p for p, *_ in good], dtype=np.int64), [i for _, i, _, _ in good], inputs, skipped)


class PositionBatches(Sampler):
    """Batches of positions: each pending shard ``[k·S, (k+1)·S) ∩ [0, length)`` cut into
    chunks of ``batch_size`` (a batch never spans two shards)."""

    def __init__(self, shards: Sequence[int], shard_size: int, length: int, batch_size: int):
        self.shards, self.shard_size, self.length, self.batch_size = list(shards), shard_size, length, batch_size

    def __iter__(self) -> Iterator[List[int]]:
        for shard in self.shards:
            end = min((shard + 1) * self.shard_size, self.length)
            for start in range(shard * self.shard_size, end, self.batch_size):
                yield list(range(start, min(start + self.batch_size, end)))

    def __len__(self) -> int:
        return sum(-(-(min((k + 1) * self.shard_size, self.length) - k * self.shard_size) // self.batch_size)
                   for k in self.shards)


class IndexedSource(Source):
    """Items read by position in DataLoader workers."""

    def read(self, position: int):
        raise NotImplementedError

    def ident(self, position: int) -> str:
        return str(position)

    def batches(self, sampler: PositionBatches, num_workers: int, pin_memory: bool) -> Iterator[Batch]:
        loader = DataLoader(_ItemDataset(self.read, self.ident), batch_sampler=sampler, collate_fn=_collate,
                            num_workers=num_workers, pin_memory=pin_memory,
                            prefetch_factor=4 if num_workers else None, persistent_workers=False)
        yield from loader


class FileSource(IndexedSource):
    """Image files: a folder (recursive, sorted) or a text file of paths (one per line,
    relative to the text file's folder). Ids are paths relative to the folder / as listed."""

    pixels = True

    def __init__(self, spec, size: int, channels: int, decode: str = "pil", resize: str = "crop"):
        check_resize(resize)
        self.resize = resize
        root = Path(spec)
        if root.is_dir():
            names = sorted(
                os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                for folder, _, files in os.walk(root, followlinks=True) for name in files
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)
            self.kind, base = "folder", root
        elif root.is_file():
            with open(root, encoding="utf-8") as lines:
                names = [line.rstrip("\r\n") for line in lines if line.strip()]
            self.kind, base = "list", root.parent
        else:
            raise ValueError(f"data {str(spec)!r}: no such folder or file of paths")
        if not names:
            raise ValueError(f"data {str(spec)!r}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
        # bytes in one numpy array: compact, and forked workers do not copy it by touching refcounts
        self.names = np.array([name.encode("utf-8", "surrogateescape") for name in names])
        self.base, self.size, self.channels, self.decode = str(base), size, channels, decode
        self.length = len(names)
        digest = hashlib.sha1()
        for name in self.names:
            digest.update(name + b"\n")
        self.fingerprint = digest.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "length": self.length, "files_sha1": self.fingerprint, "resize": self.resize}

    def ident(self, position: int) -> str:
        return self.names[position].decode("utf-8", "surrogateescape")

    def read(self, position: int):
        path = os.path.join(self.base, self.ident(position))
        if self.decode == "gpu":  # bytes only; the main process decodes on the GPU
            with open(path, "rb") as handle:
                data = handle.read()
            if not data:
                raise ValueError("empty file")
            return np.frombuffer(data, dtype=np.uint8).copy()
        return decode_image(path, self.size, self.channels, self.resize)

    def batches(self, sampler, num_workers, pin_memory):
        if self.decode != "gpu":
            yield from super().batches(sampler, num_workers, pin_memory)
            return
        loader = DataLoader(_ItemDataset(self.read, self.ident), batch_sampler=sampler, num_workers=num_workers,
                            collate_fn=_collate_raw, prefetch_factor=4 if num_workers else None)
        yield from loader

    def decode_batch(self, batch: Batch, device: torch.device) -> Batch:
        """GPU decode: the raw bytes of ``batch`` decoded and resized on ``device``."""
        kept, pixels, failed = decode_on_device(batch.inputs, self.size, self.channels, device, self.resize)
        skipped = batch.skipped + [(int(batch.positions[i]), batch.ids[i], reason) for i, reason in failed]
        return Batch(batch.positions[kept], [batch.ids[i] for i in kept], pixels, sorted(skipped))


def _collate_raw(items) -> Batch:
    """Like :func:`_collate` but ``inputs`` stays a list of byte tensors (sizes differ)."""
    good = [item for item in items if item[2] is not None]
    return Batch(np.array([p for p, *_ in good], dtype=np.int64), [i for _, i, _, _ in good],
                 [torch.from_numpy(v) for _, _, v, _ in good],
                 [(int(p), i, r) for p, i, v, r in items if v is None])


class TensorSource(IndexedSource):
    """A ``Tensor[M, C, H, W]`` of model inputs, sliced in the main process (no copy)."""

    kind = "tensor"

    def __init__(self, data: torch.Tensor):
        if data.dim() != 4 or not data.is_floating_point():
            raise ValueError(f"data tensor must be float [M, C, H, W], got {data.dtype} {list(data.shape)}")
        self.data, self.length = data, data.shape[0]

    def describe(self) -> dict:
        return {"kind": self.kind, "length": self.length, "shape": list(self.data.shape[1:])}

    def batches(self, sampler, num_workers, pin_memory):
        for positions in sampler:
            start, end = positions[0], positions[-1] + 1
            yield Batch(np.arange(start, end, dtype=np.int64), [str(p) for p in positions], self.data[start:end])


class DatasetSource(IndexedSource):
    """A map-style Dataset of model inputs (items ``x`` or ``(x, y, …)``), read in workers."""

    kind = "dataset"

    def __init__(self, data: Dataset):
        self.data, self.length = data, len(data)

    def describe(self) -> dict:
        return {"kind": self.kind, "length": self.length, "type": type(self.data).__name__}

    def read(self, position: int):
        item = self.data[position]
        item = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(item, torch.Tensor):
            raise ValueError(f"items must be tensors or (tensor, ...) tuples, got {type(item).__name__}")
        return item


class StreamSource(Source):
    """An IterableDataset or a DataLoader, read whole and in order; positions are counted."""

    kind = "stream"

    def __init__(self, data, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def describe(self) -> dict:
        return {"kind": self.kind, "length": None, "type": type(self.data).__name__}

    def batches(self, num_workers: int, pin_memory: bool) -> Iterator[Batch]:
        # One worker at most: several would each yield the whole stream (unless the dataset
        # splits itself by worker); one still overlaps reading with compute.
        loader = self.data if isinstance(self.data, DataLoader) else DataLoader(
            self.data, batch_size=self.batch_size, num_workers=min(num_workers, 1), pin_memory=pin_memory)
        position = 0
        for batch in loader:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
                raise ValueError("data must yield batches [B, C, H, W] or ([B, C, H, W], ...) tuples, got "
                                 f"{getattr(inputs, 'shape', type(inputs).__name__)}")
            count = inputs.shape[0]
            positions = np.arange(position, position + count, dtype=np.int64)
            position += count
            yield Batch(positions, [str(p) for p in positions], inputs)


def make_source(data, size: Optional[int] = None, channels: Optional[int] = None, decode: str = "pil",
                batch_size: int = 64, resize: str = "crop") -> Source:
    """The :class:`Source` for ``data``: a folder or text file of paths (needs ``size`` and
    ``channels``), a Tensor, a map-style Dataset, an IterableDataset or a DataLoader."""
    check_choice(decode, DECODERS, "decode")
    if isinstance(data, (str, os.PathLike)):
        if size is None or channels is None:
            raise ValueError("size and channels are required to decode image files")
        return FileSource(data, size, channels, decode, resize)
    if decode != "pil":
        raise ValueError("decode='gpu' applies to image files only")
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if isinstance(data, (DataLoader, IterableDataset)):
        return StreamSource(data, batch_size)
    if isinstance(data, Dataset):
        return DatasetSource(data)
    raise ValueError(f"data must be a folder, a text file of paths, a Tensor, a Dataset or a DataLoader, "
                     f"got {type(data).__name__}")
