"""Faithfulness of several attribution methods over a dataset, in one summary table."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Sequence, Union

import sys

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ..core.model_state import check_model
from ..core.validation import check_positive_int
from ._common import interval95
from .curves import deletion_curve, insertion_curve

__all__ = ["BETTER", "METRICS", "evaluate", "format_table"]

METRICS = ("deletion", "insertion")
# which way is better: a faithful map's most important pixels, removed first, drop the score
# fast (low deletion AUC); inserted first, raise it fast (high insertion AUC)
BETTER = {"deletion": "lower", "insertion": "higher"}


def _batches(data, images_per_batch: int):
    """``(images, labels or None)`` batches from a Tensor, a map-style Dataset, a DataLoader or
    an iterable of batches (labels: the second element of ``(x, y, ...)`` items)."""
    if isinstance(data, Tensor):
        for start in range(0, data.shape[0], images_per_batch):
            yield data[start:start + images_per_batch], None
        return
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=images_per_batch, shuffle=False)
    for item in data:
        if isinstance(item, Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor):
            yield item[0], item[1]
        else:
            raise ValueError("data must be a Tensor[N, C, H, W], a Dataset, or an iterable of images or "
                             f"(images, labels) batches, got an item of type {type(item).__name__}")


def evaluate(
    model: nn.Module,
    data: Union[Tensor, Iterable],
    methods: Dict[str, Callable],
    target="predicted",
    metrics: Sequence[str] = METRICS,
    steps: int = 50,
    baseline: Union[float, Callable] = 0.0,
    patch=None,
    batch_size: int = 64,
    images_per_batch: int = 16,
    device=None,
    progress: bool = False,
) -> Dict[str, Dict[str, dict]]:
    """Deletion / insertion AUCs of every method over a dataset, summarised per method.

    Args:
        model: the classifier.
        data: a ``Tensor[N, C, H, W]`` or a map-style ``Dataset`` (explained
            ``images_per_batch`` at a time), or an iterable (e.g. a DataLoader) of image
            batches or ``(images, labels)`` batches.
        methods: name -> ``method(model, images, target) -> maps`` (e.g.
            ``{"saliency": cnnviz_fast.saliency, "grad_cam": partial(grad_cam, layer="layer4")}``).
        target: ``"predicted"`` (default), ``"label"`` (the batches' labels), or any target
            the curves accept.
        metrics: a subset of ``("deletion", "insertion")``.
        steps, patch, batch_size: as in :func:`deletion_curve` (``batch_size``: masked
            images per forward pass); ``baseline``: a number or a
            callable ``images -> baseline tensor`` (e.g. a blur).
        device: where the batches are moved (default: the model's device).
        progress: a progress bar over the images (stderr).

    Returns:
        ``{method: {metric: {"mean", "low", "high", "n"}}}``: the mean AUC per image and its
        95% percentile-bootstrap interval (inside [0, 1]; see :data:`BETTER` for which way
        is better).
    """
    check_model(model)
    if not isinstance(methods, dict) or not methods or not all(callable(m) for m in methods.values()):
        raise ValueError("methods must be a non-empty dict of name -> callable(model, inputs, target)")
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {list(metrics)}")
    check_positive_int(images_per_batch, "images_per_batch")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    curve_fns = {"deletion": deletion_curve, "insertion": insertion_curve}
    aucs = {name: {m: [] for m in metrics} for name in methods}
    bar = tqdm(total=len(data) if isinstance(data, (Tensor, Dataset)) and not isinstance(data, IterableDataset)
               else None, unit="img", desc="evaluate", disable=not progress, file=sys.stderr)
    for images, labels in _batches(data, images_per_batch):
        images = images.to(device)
        if target == "label":
            if labels is None:
                raise ValueError("target='label' needs (images, labels) batches")
            tgt = torch.as_tensor(labels, device=device)
        else:
            tgt = target
        base = baseline(images) if callable(baseline) else baseline
        for name, method in methods.items():
            maps = method(model, images, tgt).detach()
            for metric in metrics:
                curve = curve_fns[metric](model, images, tgt, maps, steps=steps, baseline=base, patch=patch,
                                          batch_size=batch_size)
                aucs[name][metric].append(curve.auc.cpu())
        bar.update(len(images))
    bar.close()
    if not any(values for per_metric in aucs.values() for values in per_metric.values()):
        raise ValueError("data holds no images")
    summary = {}
    for name, per_metric in aucs.items():
        summary[name] = {}
        for metric, values in per_metric.items():
            mean, low, high, n = interval95(torch.cat(values) if values else torch.empty(0))
            summary[name][metric] = {"mean": mean, "low": low, "high": high, "n": n}
    return summary


def format_table(summary: Dict[str, Dict[str, dict]]) -> str:
    """The summary of :func:`evaluate` as a Markdown table (mean [95% bootstrap interval] per
    cell; the header says which way is better)."""
    if not isinstance(summary, dict) or not all(isinstance(v, dict) for v in summary.values()):
        raise ValueError(f"summary must be the dict evaluate returns, got {type(summary).__name__}")
    metrics = list(next(iter(summary.values())).keys()) if summary else []
    lines = ["| method | " + " | ".join(f"{m} AUC ({BETTER.get(m, '?')} is better)" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name, per_metric in summary.items():
        cells = [f"{v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}] (n={v['n']})" for v in per_metric.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
