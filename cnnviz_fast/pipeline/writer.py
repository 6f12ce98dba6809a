"""Shards on disk, written by a background thread so that writing overlaps compute.

Shard k holds the items at positions ``[k·S, (k+1)·S)``: ``shards/<k>.npy`` (the maps of the
items that decoded, in position order) and ``shards/<k>.csv`` (one line per item: position,
id, row in the .npy or -1, predicted class, target, score, skip reason, then the run's extra
columns if any, e.g. deletion / insertion AUCs). Both are written
under ``.partial`` names; the CSV is renamed first and the ``.npy`` last, so a shard is
finished exactly when its ``.npy`` exists, and a run killed at any moment leaves no file that
looks complete but is not. Every name is built from numbers, never from input file names.
"""
from __future__ import annotations

import csv
import io
import os
import queue
import signal
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.npy_writer import NpyWriter, fsync_dir

CSV_COLUMNS = ["position", "id", "row", "predicted", "target", "score", "error"]
# Test hook: SIGKILL this process right after it commits this many shards (optionally only on
# one rank), to test resumption at a deterministic point without depending on timing.
KILL_AFTER_SHARDS = "CNNVIZ_TEST_KILL_AFTER_SHARDS"
KILL_RANK = "CNNVIZ_TEST_KILL_RANK"


def shard_paths(out: Path, shard: int) -> Tuple[Path, Path]:
    return out / "shards" / f"{shard:06d}.npy", out / "shards" / f"{shard:06d}.csv"


def stamp_path(out: Path, shard: int) -> Path:
    """The shard's input stamp (files' size and modification time, see FileSource.stamp)."""
    return out / "shards" / f"{shard:06d}.inputs.csv"


def finished_shards(out: Path) -> List[int]:
    """Shards whose ``.npy`` (the last file written) and ``.csv`` both exist."""
    folder = Path(out) / "shards"
    if not folder.is_dir():
        return []
    names = {entry.name for entry in os.scandir(folder)}
    return sorted(int(name[:-4]) for name in names
                  if name.endswith(".npy") and name[:-4].isdigit() and name[:-4] + ".csv" in names)


def write_atomic(path: Path, text: str) -> None:
    """``path`` replaced by ``text`` all at once (temporary name, fsync, rename)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # ranks may write the same file
    with open(partial, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


class ShardWriter:
    """One shard being filled; ``commit`` makes it finished."""

    def __init__(self, out: Path, shard: int, map_dtype: np.dtype, extra_columns: Sequence[str] = (),
                 stamp: Optional[str] = None):
        self.shard, self.map_dtype, self.extra_columns, self.stamp = shard, map_dtype, list(extra_columns), stamp
        self.stamp_path = stamp_path(out, shard)
        self.npy_path, self.csv_path = shard_paths(out, shard)
        for leftover in self.npy_path.parent.glob(f"{shard:06d}.*partial"):  # from a killed attempt
            leftover.unlink(missing_ok=True)
        self.npy: Optional[NpyWriter] = None
        self.lines: List[list] = []  # one shard's metadata: small, kept in memory until commit

    def add(self, positions, ids, maps: np.ndarray, predicted, target, score, extra=None) -> None:
        if self.npy is None:
            self.npy = NpyWriter(self.npy_path, maps.shape[1:], self.map_dtype, durable=True)
        first = self.npy.rows
        self.npy.write(maps)
        for k, position in enumerate(positions):
            values = [repr(float(v)) for v in extra[k]] if extra is not None else []
            self.lines.append([int(position), ids[k], first + k, int(predicted[k]), int(target[k]),
                               repr(float(score[k])), ""] + values)

    def skip(self, position: int, ident: str, reason: str) -> None:
        self.lines.append([position, ident, -1, -1, -1, "", reason] + [""] * len(self.extra_columns))

    def commit(self) -> None:
        self.lines.sort(key=lambda line: line[0])
        text = io.StringIO()
        table = csv.writer(text)
        table.writerow(CSV_COLUMNS + self.extra_columns)
        table.writerows(self.lines)
        if self.stamp is not None:  # what the inputs were when read; before the files that finish the shard
            write_atomic(self.stamp_path, self.stamp)
        write_atomic(self.csv_path, text.getvalue())
        if self.npy is None:  # every item skipped: an empty array marks the shard finished
            self.npy = NpyWriter(self.npy_path, (0, 0), self.map_dtype, durable=True)
        self.npy.finish()

    def abort(self) -> None:
        if self.npy is not None:
            self.npy.abort()


class BackgroundWriter:
    """Receives computed batches from the main thread through a bounded queue and writes shards.

    ``put`` blocks when the queue is full (so memory stays bounded) and re-raises an error the
    thread met. On a GPU the maps arrive with a CUDA event, recorded after their non-blocking
    copy to pinned memory; the thread waits on it before reading them. ``extra_columns``: names
    of the per-item numbers (``[N, E]``) that come with each batch, written after the fixed columns.
    """

    def __init__(self, out: Path, shard_size: int, map_dtype: np.dtype, rank: int = 0,
                 overlays: int = 0, depth: int = 4, extra_columns: Sequence[str] = (),
                 stamps: Optional[Dict[int, str]] = None):
        self.out, self.shard_size, self.map_dtype, self.overlays = Path(out), shard_size, map_dtype, overlays
        self.stamps = stamps or {}  # shard -> FileSource.stamp, taken before its files were read
        self.extra_columns = list(extra_columns)
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        self.queue: "queue.Queue" = queue.Queue(depth)
        self.error: Optional[BaseException] = None
        self.abandoned = False
        self.current: Optional[ShardWriter] = None
        self.committed = 0
        kill = os.environ.get(KILL_AFTER_SHARDS)
        kill_rank = os.environ.get(KILL_RANK)
        self.kill_after = int(kill) if kill and (kill_rank is None or int(kill_rank) == rank) else None
        self.thread = threading.Thread(target=self._run, name="cnnviz-shard-writer", daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise RuntimeError("the shard writer failed") from self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, commit the last shard and stop the thread."""
        self.put(None)
        self.thread.join()
        if self.error is not None:
            raise RuntimeError("the shard writer failed") from self.error

    def abandon(self) -> None:
        """Stop after an error in the main thread: what was queued is written (shards it
        completes are committed), the shard in flight is not (some of its items never
        arrived) and its partial files are removed."""
        self.abandoned = True
        while self.thread.is_alive():
            try:
                self.queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self.thread.join()
        if self.current is not None:
            self.current.abort()

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:  # after every batch queued before it, also when abandoned
                    break
                self._write(*item)
            if not self.abandoned and self.current is not None:
                self._commit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            self.error = error

    def _shard(self, position: int) -> ShardWriter:
        shard = position // self.shard_size
        if self.current is not None and self.current.shard != shard:
            self._commit()
        if self.current is None:
            self.current = ShardWriter(self.out, shard, self.map_dtype, self.extra_columns, self.stamps.get(shard))
        return self.current

    def _commit(self) -> None:
        self.current.commit()
        self.current = None
        self.committed += 1
        if self.kill_after is not None and self.committed >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def _write(self, positions, ids, maps, predicted, target, score, ready, skipped, pixels, extra) -> None:
        if ready is not None:
            ready.synchronize()
        events = [(int(p), k, None) for k, p in enumerate(positions)] + [(p, i, r) for p, i, r in skipped]
        events.sort(key=lambda event: event[0])
        maps = maps.numpy() if isinstance(maps, torch.Tensor) else maps
        start = 0
        while start < len(events):  # runs of consecutive events in one shard
            shard = events[start][0] // self.shard_size
            end = start
            while end < len(events) and events[end][0] // self.shard_size == shard:
                end += 1
            writer = self._shard(events[start][0])
            good = [k for _, k, reason in events[start:end] if reason is None]
            if good:
                rows = slice(good[0], good[-1] + 1)  # good items of a batch are consecutive in it
                writer.add(positions[rows], ids[rows], maps[rows], predicted[rows], target[rows], score[rows],
                           None if extra is None else extra[rows])
            for position, ident, reason in events[start:end]:
                if reason is not None:
                    writer.skip(position, ident, reason)
            start = end
        if pixels is not None:
            self._overlays(positions, maps, predicted, pixels)

    def _overlays(self, positions, maps, predicted, pixels) -> None:
        from ..pictures import colorize, heatmap_overlay, image_grid, save_png

        folder = self.out / "overlays"
        folder.mkdir(exist_ok=True)
        for k in range(min(len(pixels), len(positions))):
            image = pixels[k].float().expand(3, -1, -1)
            heat = torch.from_numpy(np.asarray(maps[k], dtype=np.float32))
            panel = image_grid([image, colorize(heat), heatmap_overlay(image, heat)], nrow=3, scale=False)
            path = folder / f"{int(positions[k]):08d}-pred{int(predicted[k])}.png"
            partial = path.with_name(path.stem + ".partial.png")
            save_png(panel, partial, upscale=max(1, 128 // max(1, heat.shape[-1])))
            os.replace(partial, path)
