"""Faithfulness at dataset scale: each method's maps and their deletion / insertion curves,
streamed through :mod:`cnnviz_fast.pipeline` (its sources, shard writer, resumption,
run.json check and errors.jsonl), the curves stored as extra per-image columns.

    out/<method>/          one pipeline run per method (see cnnviz_fast.pipeline.results);
                           index.csv adds <metric>_auc and the curve <metric>_0 .. <metric>_K
    out/summary.md         the per-method table (:func:`format_table`), written by the CLI
    out/report.html        table, mean curves, optional sanity plot (:func:`write_report`)

Rerunning with the same ``out`` resumes: finished shards (and finished methods) are skipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.validation import check_choice, check_positive_int
from ..pictures import render_figure
from ..report import Report
from ..pipeline import ExtraColumns, open_results, saliency_maps
from ..pipeline.run import METHODS
from ._common import interval95
from .curves import perturbation_curve
from .evaluate import METRICS, format_table
from .sanity import Randomization

__all__ = ["curve_columns", "evaluate_dataset", "mean_curves", "summarize", "write_report"]

KIND = "faithfulness"  # marks a pipeline run made here (run.json "extra")


def curve_columns(metrics: Sequence[str], steps: int) -> List[str]:
    """Per metric: ``<metric>_auc``, then the curve's ``steps + 1`` points ``<metric>_k``."""
    return [name for m in metrics for name in [f"{m}_auc"] + [f"{m}_{k}" for k in range(steps + 1)]]


def _methods(methods) -> Dict[str, dict]:
    """Method names (a sequence) or name -> keyword arguments (a mapping), checked."""
    if isinstance(methods, str) or not isinstance(methods, (Mapping, Sequence)) or not methods:
        raise ValueError(f"methods must be a non-empty list of names or a dict name -> kwargs, got {methods!r}")
    methods = dict(methods) if isinstance(methods, Mapping) else {name: {} for name in methods}
    for name, kwargs in methods.items():
        check_choice(name, METHODS, "methods")
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"methods[{name!r}] must be a dict of keyword arguments, got {kwargs!r}")
    return methods


def evaluate_dataset(
    model: nn.Module,
    data,
    out: Union[str, Path],
    methods: Union[Sequence[str], Mapping[str, dict]] = ("saliency",),
    target: Union[str, int] = "predicted",
    metrics: Sequence[str] = METRICS,
    steps: int = 50,
    baseline: float = 0.0,
    patch=None,
    curve_batch_size: int = 64,
    **pipeline_kwargs,
) -> Dict[str, Dict[str, dict]]:
    """Deletion / insertion curves of every method's map of every input of ``data``, streamed
    to ``out`` and resumable; returns :func:`summarize` of the finished run.

    Args:
        model, data, target: as in :func:`cnnviz_fast.pipeline.saliency_maps` (``data``: a
            folder, a file of paths, a Tensor, a Dataset, …). The curves score the softmax
            probability of the target class (``"predicted"``: each input's top class).
        out: output folder; each method runs into ``out/<method>``.
        methods: names from :data:`cnnviz_fast.pipeline.METHODS`, or name -> their keyword
            arguments (``{"grad_cam": {"layer": "layer4"}}``).
        metrics: a subset of ``("deletion", "insertion")``.
        steps, patch: as in :func:`~cnnviz_fast.metrics.deletion_curve`; each map is ranked
            as the pipeline stores it (``to_map``, full float32 precision); ``baseline``: a
            number (the value of removed pixels in model-input space).
        curve_batch_size: masked images per forward pass of the curves.
        pipeline_kwargs: to :func:`~cnnviz_fast.pipeline.saliency_maps` (``normalize``,
            ``size``, ``batch_size``, ``shard_size``, ``map_dtype``, ``device``, ``progress``, …).

    Returns:
        ``{method: {metric: {"mean", "low", "high", "n"}}}`` over the AUCs of the images that
        decoded, as :func:`evaluate` returns it (:func:`format_table` prints it).
    """
    methods = _methods(methods)
    if isinstance(metrics, str) or not metrics or any(m not in METRICS for m in metrics):
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {metrics!r}")
    check_positive_int(steps, "steps")
    check_positive_int(curve_batch_size, "curve_batch_size")
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise ValueError(f"baseline must be a number (it is recorded in run.json), got {type(baseline).__name__}")
    metrics = list(metrics)

    def compute(model: nn.Module, inputs: Tensor, classes: Tensor, maps: Tensor) -> Tensor:
        values = []
        for metric in metrics:
            curve = perturbation_curve(model, inputs, classes, maps, metric, steps, float(baseline), patch,
                                       curve_batch_size)
            values += [curve.auc[:, None], curve.scores]
        return torch.cat(values, 1)

    settings = {"kind": KIND, "metrics": metrics, "steps": steps, "baseline": float(baseline),
                "patch": list(patch) if isinstance(patch, (tuple, list)) else patch}
    extra = ExtraColumns(curve_columns(metrics, steps), settings, compute)
    for name, kwargs in methods.items():
        saliency_maps(model, data, Path(out) / name, name, target, extra=extra, **pipeline_kwargs, **kwargs)
    return summarize(out, list(methods))


def _runs(out: Union[str, Path], methods: Optional[Sequence[str]]):
    """name -> (Results, extra settings) of the finished methods' runs in ``out``."""
    out = Path(out)
    if methods is None:  # every run of this kind in the folder, by name
        methods = sorted(p.parent.name for p in out.glob("*/run.json")
                         if json.loads(p.read_text()).get("extra", {}).get("kind") == KIND)
    if not methods:
        raise ValueError(f"out {str(out)!r} holds no finished faithfulness run")
    runs = {}
    for name in methods:
        results = open_results(out / name)  # ValueError when that run has not finished
        settings = results.settings.get("extra", {})
        if settings.get("kind") != KIND:
            raise ValueError(f"{out / name}: a saliency run without faithfulness columns")
        runs[name] = (results, settings)
    return runs


def summarize(out: Union[str, Path], methods: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, dict]]:
    """Mean AUC and its 95% interval per method and metric of a finished run in ``out``
    (``methods``: default every one there, by name), as :func:`evaluate` returns it."""
    return _summary(_runs(out, methods))


def _summary(runs) -> Dict[str, Dict[str, dict]]:
    summary = {}
    for name, (results, settings) in runs.items():
        summary[name] = {}
        for metric in settings["metrics"]:
            mean, low, high, n = interval95(torch.from_numpy(results.extra[f"{metric}_auc"]))
            summary[name][metric] = {"mean": mean, "low": low, "high": high, "n": n}
    return summary


def mean_curves(out: Union[str, Path], methods: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, np.ndarray]]:
    """``{method: {metric: ndarray[K+1]}}``: the mean score at each step over the images."""
    return _curves(_runs(out, methods))


def _curves(runs) -> Dict[str, Dict[str, np.ndarray]]:
    curves = {}
    for name, (results, settings) in runs.items():
        points = range(settings["steps"] + 1)
        curves[name] = {metric: np.array([results.extra[f"{metric}_{k}"].mean() for k in points])
                        for metric in settings["metrics"]}
    return curves


def _figure_png(draw, path: Path, size=(9, 3.6)) -> Path:
    render_figure(draw, size).save(path, format="PNG")
    return path


def _plot_curves(curves: Dict[str, Dict[str, np.ndarray]], path: Path) -> Path:
    metrics = list(dict.fromkeys(m for per in curves.values() for m in per))

    def draw(figure):
        for index, metric in enumerate(metrics):
            axes = figure.add_subplot(1, len(metrics), index + 1)
            for name, per in curves.items():
                if metric in per:
                    axes.plot(np.linspace(0, 1, len(per[metric])), per[metric], label=name)
            axes.set(title=f"{metric} (mean over images)", xlabel="fraction of pixels moved (step k / K)",
                     ylabel="target probability", ylim=(0, 1.02))
            axes.legend(fontsize="small")

    return _figure_png(draw, path)


def _plot_sanity(checks: Dict[str, Randomization], path: Path) -> Path:
    def draw(figure):
        axes = figure.add_subplot(1, 1, 1)
        for name, check in checks.items():
            axes.plot(range(len(check.layers)), check.spearman.mean(1).numpy(), marker="o", label=name)
        layers = next(iter(checks.values())).layers
        axes.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize="small")
        axes.axhline(0, color="grey", linewidth=0.5)
        axes.set(title="cascading randomization, output layer first", ylabel="Spearman with the original map",
                 ylim=(-1.02, 1.02))
        axes.legend(fontsize="small")

    return _figure_png(draw, path, size=(9, 4))


def write_report(out: Union[str, Path], methods: Optional[Sequence[str]] = None,
                 sanity: Optional[Dict[str, Randomization]] = None, progress: bool = False) -> Path:
    """``out/report.html`` (and report.md) of a finished run: the summary table, the mean
    deletion / insertion curves per method and, when given, ``sanity``: method ->
    :class:`~cnnviz_fast.metrics.Randomization` (cascading), plotted as Spearman per layer."""

    out = Path(out)
    runs = _runs(out, methods)  # read once: index.csv holds every curve point of every image
    summary = _summary(runs)
    first = next(iter(runs.values()))[1]
    report = Report(out, progress=progress)

    def table(section):
        section.summary = (f"Mean AUC per image [95% interval] (n images), {first['steps']} steps, baseline "
                           f"{first['baseline']}, patch {first['patch']}: a faithful map has a low deletion AUC "
                           "and a high insertion AUC.")
        section.table = format_table(summary)

    def curves(section):
        section.summary = ("The target's probability as the top-ranked pixels are removed (deletion) or "
                           "revealed (insertion).")
        _plot_curves(_curves(runs), out / "curves.png")
        section.pictures.append(("curves.png", "mean deletion and insertion curves per method"))

    def randomization(section):
        images = next(iter(sanity.values())).spearman.shape[1]
        section.summary = (f"Model parameter randomization (Adebayo et al. 2018) on {images} images: a method "
                           "whose maps stay similar as the weights are destroyed does not explain the model.")
        _plot_sanity(sanity, out / "sanity.png")
        section.pictures.append(("sanity.png", "mean Spearman correlation per randomized layer"))
        section.notes += [f"{name}: {'fails (maps unchanged)' if c.unchanged else 'passes'}"
                          for name, c in sanity.items()]

    report.run("summary", table)
    report.run("mean deletion and insertion curves", curves)
    if sanity:
        report.run("sanity check: model randomization", randomization)
    return report.write("cnnviz evaluate", f"Faithfulness of {', '.join(summary)} on {out}.")
