"""The output folder: settings (``run.json``), the merged index, ``cnnviz merge``, the reader.

    out/run.json        method, its arguments, target, model fingerprint, source, shard size
    out/shards/*.npy    maps [rows, H, W] (float16 unless map_dtype=float32)
    out/shards/*.csv    per-item metadata of each shard
    out/index.csv       item, path, shard, row, predicted, target, score (items that decoded),
                        then the run's extra columns (run.json "extra", e.g. deletion/insertion AUCs)
    out/errors.jsonl    one {"item", "path", "reason"} line per skipped input
    out/overlays/*.png  optional pictures of the first items
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .writer import finished_shards, shard_paths, write_atomic

INDEX_COLUMNS = ["item", "path", "shard", "row", "predicted", "target", "score"]


def check_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in ``out/run.json``, or refuse if the folder holds another run's
    finished shards (a run that failed before finishing any shard is simply replaced)."""
    path = out / "run.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings and finished_shards(out):
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            detail = "; ".join(f"{k}: {before.get(k)!r} in the folder, {settings.get(k)!r} now" for k in changed)
            raise ValueError(f"out {str(out)!r} holds a run with other settings ({detail}). "
                             "Rerun with the same settings to resume, or choose another out folder.")
        if before == settings:
            return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def expected_shards(settings: dict, out: Path) -> Optional[int]:
    """Number of shards of the whole run (None while a stream's length is unknown)."""
    length = settings["source"].get("length")
    if length is None and (out / "length.json").exists():
        length = json.loads((out / "length.json").read_text())["length"]
    return None if length is None else -(-length // settings["shard_size"])


def extra_columns(settings: dict) -> List[str]:
    """Names of a run's extra per-item columns (none for plain saliency runs)."""
    return list(settings.get("extra", {}).get("columns", []))


def write_index(out: Path) -> Tuple[int, int]:
    """Join the shards' CSVs into ``index.csv`` and ``errors.jsonl`` (each written atomically).

    Returns ``(images, skipped)``. Raises ``ValueError`` naming the missing shards if the run
    is not complete in this folder.
    """
    settings = json.loads((out / "run.json").read_text())
    extra = extra_columns(settings)
    total = expected_shards(settings, out)
    done = finished_shards(out)
    if total is None:
        raise ValueError(f"{out}: the stream's length is unknown (no length.json): the run has not finished")
    missing = sorted(set(range(total)) - set(done))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", …" if len(missing) > 10 else "")
        raise ValueError(f"{out}: {len(missing)} of {total} shards are not finished here (shards {shown}); "
                         "rerun the same command to finish them, or `cnnviz merge` the other nodes' folders")
    images = skipped = 0
    index_partial, errors_partial = out / "index.csv.partial", out / "errors.jsonl.partial"
    with open(index_partial, "w", encoding="utf-8", errors="surrogateescape", newline="") as index, \
            open(errors_partial, "w", encoding="utf-8", errors="surrogateescape") as errors:
        table = csv.writer(index)
        table.writerow(INDEX_COLUMNS + extra)
        for shard in range(total):
            with open(shard_paths(out, shard)[1], encoding="utf-8", errors="surrogateescape", newline="") as lines:
                for line in csv.DictReader(lines):
                    if line["error"]:
                        errors.write(json.dumps({"item": int(line["position"]), "path": line["id"],
                                                 "reason": line["error"]}) + "\n")
                        skipped += 1
                    else:
                        table.writerow([line["position"], line["id"], shard, line["row"], line["predicted"],
                                        line["target"], line["score"]] + [line[name] for name in extra])
                        images += 1
        for handle in (index, errors):
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(errors_partial, out / "errors.jsonl")
    os.replace(index_partial, out / "index.csv")  # last: index.csv present means the run is complete
    return images, skipped


def merge(out: Union[str, Path], folders: Sequence[Union[str, Path]]) -> Tuple[int, int]:
    """Join the output folders of several nodes (same command, each holding some shards) into
    ``out`` (which may be one of them): finished shards are hard-linked (copied across file
    systems), settings must match, then the index is written. Returns ``(images, skipped)``."""
    out = Path(out)
    settings = None
    for folder in map(Path, folders):
        if not (folder / "run.json").exists():
            raise ValueError(f"{folder}: not a cnnviz saliency output folder (no run.json)")
        theirs = json.loads((folder / "run.json").read_text())
        if settings is None:
            settings = theirs
        elif theirs != settings:
            raise ValueError(f"{folder}: its run.json differs from {folders[0]}'s; only folders of the same run merge")
    if settings is None:
        raise ValueError("folders: give at least one output folder")
    check_settings(out, settings)
    (out / "shards").mkdir(exist_ok=True)
    for folder in map(Path, folders):
        if (folder / "length.json").exists() and not (out / "length.json").exists():
            shutil.copyfile(folder / "length.json", out / "length.json")
        if folder.resolve() == out.resolve():
            continue
        for shard in finished_shards(folder):
            for source, target in zip(shard_paths(folder, shard)[::-1], shard_paths(out, shard)[::-1]):
                if target.exists():
                    continue
                partial = target.with_name(target.name + ".partial")
                try:
                    os.link(source, partial)
                except OSError:
                    shutil.copyfile(source, partial)
                os.replace(partial, target)
    return write_index(out)


class Results:
    """A finished output folder: ``len``, ``results[i]`` (the i-th image in input order),
    ``results.get(path)``, iteration in order. Each item is a dict with ``item``, ``path``,
    ``shard``, ``row``, ``predicted``, ``target``, ``score``, ``map`` (``ndarray[H, W]``) and the
    run's extra columns; ``results.extra[name]`` holds each extra column (float64, input order).
    Shards are memory-mapped; a few stay open."""

    def __init__(self, out: Union[str, Path], cache: int = 8):
        self.out = Path(out)
        if not (self.out / "index.csv").exists():
            raise ValueError(f"{out}: no index.csv (the run has not finished, or it ran on several nodes "
                             "without a shared folder: `cnnviz merge` their folders)")
        self.settings = json.loads((self.out / "run.json").read_text())
        with open(self.out / "index.csv", encoding="utf-8", errors="surrogateescape", newline="") as lines:
            rows = list(csv.reader(lines))[1:]
        self.paths = [row[1] for row in rows]
        numbers = np.array([[row[0], row[2], row[3], row[4], row[5]] for row in rows], dtype=np.int64).reshape(-1, 5)
        self.items, self.shards, self.rows, self.predicted, self.targets = numbers.T
        self.scores = np.array([float(row[6]) for row in rows], dtype=np.float64)
        values = np.array([row[7:] for row in rows], dtype=np.float64).reshape(len(rows), -1)
        self.extra: Dict[str, np.ndarray] = {name: values[:, k] for k, name in enumerate(extra_columns(self.settings))}
        self._by_path: Optional[Dict[str, int]] = None
        self._open: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._open:
            self._open[shard] = np.load(shard_paths(self.out, shard)[0], mmap_mode="r")
            if len(self._open) > self._cache:
                self._open.popitem(last=False)
        self._open.move_to_end(shard)
        return self._open[shard]

    def map(self, index: int) -> np.ndarray:
        return np.asarray(self._shard(int(self.shards[index]))[int(self.rows[index])])

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} results")
        index %= len(self)
        return {"item": int(self.items[index]), "path": self.paths[index], "shard": int(self.shards[index]),
                "row": int(self.rows[index]), "predicted": int(self.predicted[index]),
                "target": int(self.targets[index]), "score": float(self.scores[index]), "map": self.map(index),
                **{name: float(column[index]) for name, column in self.extra.items()}}

    def get(self, path: str) -> dict:
        """The result for an input path (as in ``index.csv``: relative to the folder or as listed)."""
        if self._by_path is None:
            self._by_path = {p: i for i, p in enumerate(self.paths)}
        if path not in self._by_path:
            raise KeyError(f"{path!r} is not in {self.out}/index.csv")
        return self[self._by_path[path]]

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def maps(self) -> np.ndarray:
        """Every map in order, ``[len, H, W]``, in memory (for small runs)."""
        return np.stack([self.map(i) for i in range(len(self))]) if len(self) else np.empty((0, 0, 0))

    def errors(self) -> List[dict]:
        with open(self.out / "errors.jsonl", encoding="utf-8") as lines:
            return [json.loads(line) for line in lines]


def open_results(out: Union[str, Path]) -> Results:
    """Read a finished output folder (see :class:`Results`)."""
    return Results(out)
