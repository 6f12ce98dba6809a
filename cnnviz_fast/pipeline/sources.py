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
from ..core.images import check_resize
from ..core.validation import check_choice, check_image_batch, check_int
from ..loading import IMAGE_SUFFIXES, decode_file
from .decoders import DECODE_CHOICES as DECODERS, DEVICE_DECODERS, decode_in_worker, runs_on_device
from .decoders import decode_on_device  # noqa: F401  (its home until pipeline/decoders.py)


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
    the package's one ``resize`` policy (:func:`cnnviz_fast.loading.decode_file`). Raises on
    an unreadable, truncated or empty file (ValueError when Pillow does not recognise it)."""
    from PIL import UnidentifiedImageError

    check_int(size, "size", minimum=1)
    check_choice(channels, (1, 3), "channels")
    try:
        return decode_file(data, size, channels, resize)
    except UnidentifiedImageError as error:
        raise ValueError(f"data is not an image Pillow can read ({error})") from None


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


def is_image_name(name: str) -> bool:
    """Whether a file name has an image suffix (``..png`` and ``.png`` too, which
    ``os.path.splitext`` sees as names without a suffix)."""
    return "." in name and "." + name.rsplit(".", 1)[1].lower() in IMAGE_SUFFIXES


def _image_files(root: Path) -> Iterator[str]:
    """Image files below ``root`` (links followed), as ``/``-separated paths relative to it.
    Each real folder is walked once, so a link loop (``loop -> .``) or two links to one
    folder do not list its files again."""
    seen = set()
    for folder, folders, files in os.walk(root, followlinks=True):
        try:
            info = os.stat(folder)
        except OSError:
            folders[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        folders.sort()
        for name in files:
            if is_image_name(name):
                yield os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")


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

    def __init__(self, spec, size: int, channels: int, decode: str = "pil", resize: str = "crop",
                 on_device: Optional[bool] = None):
        check_resize(resize)
        self.resize = resize
        # workers read bytes and the main process decodes on the device (pipeline/decoders.py)
        self.on_device = decode in DEVICE_DECODERS if on_device is None else on_device
        root = Path(spec)
        if root.is_dir():
            names = sorted(_image_files(root))
            self.kind, base = "folder", root
        elif root.is_file() and root.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"data {str(spec)!r} is one image; pass its folder or a text file of image paths")
        elif root.is_file():
            try:
                with open(root, encoding="utf-8") as lines:
                    names = [line.rstrip("\r\n") for line in lines if line.strip()]
            except UnicodeDecodeError:
                raise ValueError(f"data {str(spec)!r} is neither a folder nor a text file of image paths "
                                 "(not UTF-8 text)") from None
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

    def stamp(self, shard: int, shard_size: int) -> str:
        """What identifies the content of shard ``shard``'s files without reading them: one
        line ``position,size,mtime_ns`` per file (``-1,-1`` for a file that is gone), as
        ``make`` and ``rsync`` judge a file unchanged. Taken before the files are read, so
        a file changed during a run is found changed by the next one."""
        lines = []
        for position in range(shard * shard_size, min((shard + 1) * shard_size, self.length)):
            try:
                info = os.stat(os.path.join(self.base, self.ident(position)))
                lines.append(f"{position},{info.st_size},{info.st_mtime_ns}")
            except OSError:
                lines.append(f"{position},-1,-1")
        return "position,size,mtime_ns\n" + "\n".join(lines) + "\n"

    def ident(self, position: int) -> str:
        return self.names[position].decode("utf-8", "surrogateescape")

    def read(self, position: int):
        path = os.path.join(self.base, self.ident(position))
        if self.on_device:  # bytes only; the main process decodes on the GPU
            with open(path, "rb") as handle:
                data = handle.read()
            if not data:
                raise ValueError("empty file")
            return np.frombuffer(data, dtype=np.uint8).copy()
        return decode_in_worker(path, self.size, self.channels, self.resize, self.decode)

    def batches(self, sampler, num_workers, pin_memory):
        if not self.on_device:
            yield from super().batches(sampler, num_workers, pin_memory)
            return
        loader = DataLoader(_ItemDataset(self.read, self.ident), batch_sampler=sampler, num_workers=num_workers,
                            collate_fn=_collate_raw, prefetch_factor=4 if num_workers else None)
        yield from loader

    def decode_batch(self, batch: Batch, device: torch.device) -> Batch:
        """GPU decode: the raw bytes of ``batch`` decoded and resized on ``device``."""
        kept, pixels, failed = decode_on_device(batch.inputs, self.size, self.channels, device, self.resize,
                                                self.decode)
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
        check_image_batch(data)
        if not data.is_floating_point():
            raise ValueError(f"data tensor must be float [M, C, H, W], got {data.dtype} {list(data.shape)}")
        if not len(data):
            raise ValueError(f"data holds no images: shape {list(data.shape)}")
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
                batch_size: int = 64, resize: str = "crop", device=None) -> Source:
    """The :class:`Source` for ``data``: a folder or text file of paths (needs ``size`` and
    ``channels``), a Tensor, a map-style Dataset, an IterableDataset or a DataLoader."""
    check_choice(decode, DECODERS, "decode")
    if isinstance(data, (str, os.PathLike)):
        if size is None or channels is None:
            raise ValueError("size and channels are required to decode image files")
        return FileSource(data, size, channels, decode, resize,
                          on_device=None if device is None else runs_on_device(decode, device))
    if decode not in ("pil", "auto"):
        raise ValueError(f"decode={decode!r} applies to image files only")
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if isinstance(data, (DataLoader, IterableDataset)):
        return StreamSource(data, batch_size)
    if isinstance(data, Dataset):
        return DatasetSource(data)
    raise ValueError(f"data must be a folder, a text file of paths, a Tensor, a Dataset or a DataLoader, "
                     f"got {type(data).__name__}")
