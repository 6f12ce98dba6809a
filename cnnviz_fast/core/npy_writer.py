"""One streaming ``.npy`` writer: rows appended with plain file writes, committed atomically.

Used by feature extraction and the dataset pipeline. Rows go to ``<path>.partial``; ``finish``
writes the final header, fsyncs and renames, so a file at ``path`` is always complete (a
crash or SIGKILL leaves at most a ``.partial`` file). Plain writes, not stores into a memory
map, keep resident memory constant: dirty pages of a mapping count in the process's RSS
until it is unmapped, page-cache pages of written files do not.

The header is written first with room for any row count (padded to :data:`HEADER_BYTES`),
then rewritten in place at ``finish`` with the real count, so an unknown length costs
nothing extra.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

HEADER_BYTES = 128  # magic + version + length + dict, padded; a multiple of 64 as numpy aligns


def _header(shape: Sequence[int], dtype: np.dtype) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)})
    prefix = b"\x93NUMPY\x01\x00"
    room = HEADER_BYTES - len(prefix) - 2
    if len(text) + 1 > room:
        raise ValueError(f"shape {tuple(shape)} does not fit a {HEADER_BYTES}-byte .npy header")
    text = text.ljust(room - 1) + "\n"
    return prefix + len(text).to_bytes(2, "little") + text.encode("latin1")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


class NpyWriter:
    """Stream rows of shape ``row_shape`` into ``path`` (a ``.npy`` file).

    ``length``: the expected number of rows, checked at ``finish`` (None: whatever arrives).
    ``durable``: fsync the file and its folder before and after the rename (a power cut then
    loses nothing committed); feature extraction skips it, the pipeline uses it.
    """

    def __init__(self, path, row_shape: Sequence[int], dtype, length: Optional[int] = None,
                 durable: bool = False):
        self.path = Path(path)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = np.dtype(dtype)
        self.length, self.durable, self.rows = length, durable, 0
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.partial, "wb")
        self.file.write(_header((length or 0,) + self.row_shape, self.dtype))

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows must have shape [n, {', '.join(map(str, self.row_shape))}], "
                             f"got {list(rows.shape)}")
        if self.length is not None and self.rows + len(rows) > self.length:
            raise ValueError(f"data yielded more than length={self.length} inputs")
        self.file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def finish(self) -> Path:
        if self.length is not None and self.rows != self.length:
            self.abort()
            raise ValueError(f"data yielded {self.rows} inputs, expected length={self.length}")
        self.file.seek(0)
        self.file.write(_header((self.rows,) + self.row_shape, self.dtype))
        self.file.flush()
        if self.durable:
            os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        if self.durable:
            fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)
