"""Occlusion sensitivity (Zeiler & Fergus 2014): slide a grey (baseline) window over the
image and record how much the target score drops at each position.

By default the occluded scores come from :mod:`.incremental`, which recomputes each layer
only where the window changed it (exact). Full recomputation (``mode="full"``, and the
fallback) builds each occluded batch with one operator call
(:func:`cnnviz_fast.ops.occlude`). The per-position score drops are spread back onto the
pixels once at the end (:func:`cnnviz_fast.ops.occlusion_accumulate`), so no Python work
happens per window position.
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core.arguments import friendly_arguments
from ..core import check_images, model_guard, target_scores
from ..core.layout import run_in_fast_layout
from ..core.targets import Target, check_target, is_predicted, resolve_target, target_for_rows
from ._backprop import detach_output
from ..core.validation import check_baseline, check_model_inputs, check_pair, check_positive_int
from ..ops import occlude, occlusion_accumulate, occlusion_grid
from ..ops.reference import occlusion_window_bounds
from .incremental import IncrementalOcclusion

__all__ = ["occlusion", "choose_batch_size"]

# On CPU, forward passes stop getting faster per image once a batch's activations are
# a few tens of MiB (they fall out of cache); measured on ResNet-18 and the digits CNN.
CPU_MEMORY_BUDGET = 64 * 2**20
# On CUDA, use at most this fraction of the memory that is free when the call starts.
CUDA_FREE_FRACTION = 0.5
# Live activations per image during an inference forward pass, in units of the largest
# layer output: a layer's input and output, plus a skip connection held alongside.
ACTIVATION_COPIES = 3
# Full recomputation without a batch size or budget times these batch sizes (occluded
# images per pass, up to MAX_MEASURED_BUDGET bytes) on its first passes and keeps the fastest.
MEASURED_BATCH_SIZES = (8, 16, 32, 64, 128)
MAX_MEASURED_BUDGET = 2**30
# Window positions per pass of the incremental engine: without batch_size, on the CPU the
# fastest of INCREMENTAL_BATCH_SIZES timed on the first passes (at most a quarter of an
# image's positions), on a GPU INCREMENTAL_BATCH. The best CPU size depends on the model:
# small passes suited EfficientNet-Lite0's depthwise layers, ResNet-18 hardly changed. On
# an H200, VGG-16 exact took 0.26 s with trial passes (16 positions, rectangles on the
# device) and 0.055 s at 128 with rectangles on the host: the passes are launch-bound.
INCREMENTAL_BATCH = 128
INCREMENTAL_BATCH_SIZES = (16, 32, 64, 128)
# The incremental plan is abandoned for full recomputation when it saves less than this
# (multiply-adds of its first batch / those of full passes for the same positions), per
# device type. On a GPU the plan's gathers and small convolutions use the device far less
# well than full batched passes: on an H200 it reached 15-39 % of its theoretical saving
# (70 % and more on a CPU), so ResNet-18 (2.2x fewer multiply-adds) and MobileNetV2 (1.8x)
# ran slower than full recomputation and VGG-16 (6.5x) 2.5x faster
# (benchmarks/results/incremental-*-nvidia-h200.md).
PROFITABLE_FRACTION = {"cpu": 0.8, "cuda": 0.25}
MODES = ("exact", "full", "approximate")
# Approximate mode defaults: the projective-field threshold (rectangles capped at this
# fraction of each map's height and width) and the adaptive drill-down (a pass on every
# COARSE_STEP-th row and column of the window grid, the rest interpolated except for
# this fraction of the positions, the highest estimates, computed exactly). On the trained
# EfficientNet-Lite0 (224 px, window 16, stride 8, 3 photos) these defaults run ~13x faster
# than full recomputation with Pearson 0.58 (worst 0.33) against exact; coarse_step=2,
# field_cap=1, drill_down=0.2 reaches Pearson >= 0.96 and top-5% IoU >= 0.9 at ~3.5x.
# The cap is off by default on a GPU: there the capped plan's many small patch passes ran
# 0.02-2.1x the speed of full recomputation (H200, results/incremental-*-nvidia-h200.md),
# while without it the plan passes PROFITABLE_FRACTION or the drill-down runs full passes.
FIELD_CAP = {"cpu": 0.5, "cuda": 1.0}
DRILL_DOWN = 0.1
COARSE_STEP = 3


@friendly_arguments
def occlusion(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    window: Union[int, Tuple[int, int]] = (16, 16),
    stride: Union[int, Tuple[int, int]] = (8, 8),
    baseline: Union[float, Tensor] = 0.0,
    batch_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    return_deltas: bool = False,
    return_output: bool = False,
    mode: str = "exact",
    field_cap: Optional[float] = None,
    drill_down: Optional[float] = None,
    coarse_step: Optional[int] = None,
    dtype: Optional[str] = None,
):
    """Occlusion map: how much the target score drops when a window around each pixel is
    replaced by ``baseline``.

    Window positions form Captum ``Occlusion``'s grid: top-left corners at multiples of
    ``stride`` until the window reaches the border (``rows = ceil((H - kh) / sh) + 1``),
    the last row/column clipped at the image border. Each pixel gets the mean of
    ``f(x) - f(x occluded at p)`` over the windows ``p`` covering it (0 where no window
    covers it, possible when ``stride > window``). The result equals channel 0 of
    ``captum.attr.Occlusion(model).attribute(inputs, sliding_window_shapes=(C, kh, kw),
    strides=(C, sh, sw), baselines=baseline, target=target)``; all channels are occluded
    together.

    Args:
        model: the network; it runs in eval mode for the call and is restored afterwards.
        inputs: ``Tensor[N, C, H, W]``, finite; not modified.
        target: an int, N ints, a :class:`~cnnviz_fast.core.Neuron` (the forward pass
            stops at its layer) or a callable ``output -> Tensor[B]`` (it also sees the
            occluded batches, so it must work row by row for any batch size B), or
            ``"predicted"`` (each image's top class on the clean forward pass).
        window: ``(kh, kw)`` or an int; must fit in the image.
        stride: ``(sh, sw)`` or an int, each >= 1.
        baseline: value written inside the window: a number, or a tensor broadcastable to
            ``[N, C, H, W]`` (e.g. a per-channel mean ``[1, C, 1, 1]`` or a blurred copy
            ``[N, C, H, W]``).
        batch_size: window positions per pass (windows of several images may share a
            full-recomputation pass). The result does not depend on it. Default: 128 for
            the incremental passes; for full recomputation, as many as fit in
            ``memory_budget`` when one is given (counting per occluded image its own copy
            plus 3 times the largest layer output, measured during the clean forward pass:
            the largest tensor an operator makes), else the fastest of 8, 16, ..., 128
            (within 1 GiB on CPU) timed on the first passes (one pass when all the work
            fits in the default budget).
        memory_budget: bytes one full-recomputation pass may use when ``batch_size`` is
            None. Default: 64 MiB on CPU, half of the free memory on CUDA.
        return_deltas: also return the score drops per window position.
        return_output: also return the model's output on the clean inputs (the pass the
            unoccluded scores come from).
        mode: ``"exact"`` (default): each window's scores are computed by recomputing only
            what the window changes, layer by layer (:mod:`.incremental`); equal to full
            recomputation within float rounding. Used when the model can be captured by
            ``torch.fx.symbolic_trace`` (its forward runs once with proxies) and the plan
            saves work; otherwise, and with ``"full"``, every occluded image runs through
            the whole model. ``"approximate"``: faster, not exact, tuned by ``field_cap``
            and ``drill_down``.
        field_cap: approximate mode: the projective-field threshold, in (0, 1]: changed
            regions are capped at this fraction of each layer's height and width (changes
            outside are dropped). Default 0.5 on the CPU, 1 (off) on a GPU; 1 disables it.
        drill_down: approximate mode: windows are first scored on every 3rd row and column
            of the position grid, the others interpolated, then this fraction (in (0, 1])
            of all positions, those with the highest interpolated values, is scored exactly.
            Default 0.1; 1 disables it (every position scored).
        coarse_step: approximate mode with a drill-down: the coarse grid is every
            ``coarse_step``-th row and column of the position grid (and the last).
            Default 3; 2 costs about twice as many exact positions and interpolates over
            one position instead of two, which a 16-px window at stride 8 needs for maps
            that follow exact (on EfficientNet-Lite0: Pearson 0.96-0.98 with
            ``field_cap=1, drill_down=0.2`` against 0.58 at the defaults).
        dtype: ``"bf16"`` / ``"fp16"``: the clean and occluded passes under autocast (tensor
            cores on a GPU), their scores compared in the inputs' dtype; None / ``"fp32"``
            (default): the inputs' dtype. With 8 bits of mantissa, a score is rounded by
            ~0.4% of its magnitude, so small drops carry that much noise (the error against
            float32 is tested in tests/test_gpu_paths.py).

    Returns:
        ``Tensor[N, H, W]`` on the inputs' device, in the scores' dtype; with
        ``return_deltas=True`` also ``Tensor[N, rows, cols]``, ``deltas[n, i, j] = f(x_n) -
        f(x_n occluded at row i, column j)``; with ``return_output=True`` the clean output
        comes last: ``(attributions[, deltas], output)``.

    Runs under ``torch.inference_mode`` (no autograd); the returned tensors are ordinary
    (non-inference) tensors.
    """
    with model_guard(model):
        check_images(inputs)
        check_model_inputs(model, inputs)
        N, C, H, W = inputs.shape
        window = check_pair(window, "window")
        stride = check_pair(stride, "stride")
        if window[0] > H or window[1] > W:
            raise ValueError(f"window must fit in the image: window {window} > image ({H}, {W})")
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        if memory_budget is not None:
            check_positive_int(memory_budget, "memory_budget")
        base = check_baseline(baseline, inputs)
        check_target(target, N)
        field_cap, drill_down, coarse_step = _check_mode(mode, field_cap, drill_down, coarse_step, inputs.device)
        rows, cols = occlusion_grid(H, W, window, stride)

        keep_output = return_output or is_predicted(target)
        amp = _autocast(dtype, inputs.device)
        with torch.inference_mode(), amp:
            # a copy: a model that writes into its input must not change the caller's tensor
            scores, output, per_image = _clean_pass(model, inputs.clone(), target, keep_output,
                                                    measure=batch_size is None)
            scores = scores.to(inputs.dtype)  # under autocast: drops taken in the inputs' dtype
            target = resolve_target(target, output)
            deltas = None
            plan = (tuple(inputs.shape[1:]), window, stride, inputs.device.type, field_cap,
                    getattr(target, "layer", None), dtype)
            if mode != "full" and plan not in _UNPROFITABLE_PLANS.get(model, ()):
                engine = IncrementalOcclusion.build(model, target, field_cap=field_cap)
                if engine is not None:
                    score = _incremental_scorer(engine, inputs, base, scores, target, window, stride, batch_size)
                    try:
                        deltas = _deltas(score, N, rows, cols, drill_down, coarse_step)
                    except _Unprofitable:
                        _UNPROFITABLE_PLANS.setdefault(model, set()).add(plan)
            if deltas is None and drill_down is not None:
                score = _full_scorer(model, inputs, base, scores, target, window, stride,
                                     batch_size or choose_batch_size(per_image, inputs.device, memory_budget))
                deltas = _deltas(score, N, rows, cols, drill_down, coarse_step)
            if deltas is None:
                deltas = _full_deltas(model, inputs, base, scores, target, window, stride, batch_size,
                                      memory_budget, per_image)

        # outside inference mode so that the results are ordinary tensors
        with torch.no_grad():
            results = (occlusion_accumulate(deltas, H, W, window, stride),)
            if return_deltas:
                results += (deltas.reshape(N, rows, cols).clone(),)
            if return_output:
                results += (detach_output(output, clone=True),)
        return results[0] if len(results) == 1 else results


AUTOCAST_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(dtype, device: torch.device):
    """The passes' autocast context for ``dtype=`` (a no-op for None / ``"fp32"``)."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {list(AUTOCAST_DTYPES)}, got {dtype!r}")
    if AUTOCAST_DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, AUTOCAST_DTYPES[dtype])


def _check_mode(mode, field_cap, drill_down, coarse_step,
                device: torch.device) -> Tuple[Optional[float], Optional[float], int]:
    """``(field_cap, drill_down, coarse_step)`` for ``mode``; None where a knob is off."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode != "approximate":
        for name, value in (("field_cap", field_cap), ("drill_down", drill_down), ("coarse_step", coarse_step)):
            if value is not None:
                raise ValueError(f"{name} applies only to mode='approximate', got {name}={value!r} "
                                 f"with mode={mode!r}")
        return None, None, COARSE_STEP
    if coarse_step is None:
        coarse_step = COARSE_STEP
    check_positive_int(coarse_step, "coarse_step")
    knobs = []
    default_cap = FIELD_CAP.get(device.type, FIELD_CAP["cuda"])
    for name, value, default in (("field_cap", field_cap, default_cap), ("drill_down", drill_down, DRILL_DOWN)):
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        knobs.append(None if value >= 1 else float(value))
    return knobs[0], knobs[1], coarse_step


class _Fallback(Exception):
    """The incremental plan is not used for this call (see _incremental_scorer)."""


class _Unprofitable(_Fallback):
    """The incremental plan saves too little arithmetic (PROFITABLE_FRACTION)."""


# Plans found unprofitable, per model: (image shape, window, stride, device type, field_cap,
# target layer). Later calls with the same geometry skip the trace, the clean pass through
# the graph and the trial batch (40 ms of a 110 ms ResNet-18 call on an H200).
_UNPROFITABLE_PLANS: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


Scorer = Callable[[int, Tensor], Tensor]


def _deltas(score: Scorer, n_images: int, rows: int, cols: int, drill_down: Optional[float],
            coarse_step: int = COARSE_STEP) -> Optional[Tensor]:
    """``deltas [N, rows * cols]`` from ``score(n, positions) -> deltas of those positions``
    (every position, or the drill-down's choice); None when the scorer gives up."""
    positions = torch.arange(rows * cols)
    try:
        if drill_down is None:
            return torch.stack([score(n, positions) for n in range(n_images)])
        return torch.stack([_drill_down(lambda p: score(n, p), rows, cols, drill_down, coarse_step)
                            for n in range(n_images)])
    except _Unprofitable:
        raise
    except _Fallback:
        return None


def _incremental_scorer(engine: IncrementalOcclusion, inputs: Tensor, base: Tensor, scores: Tensor, target,
                        window, stride, batch_size: Optional[int]) -> Scorer:
    """Deltas of image ``n`` at some positions from the incremental engine. Raises
    _Fallback when the traced graph does not reproduce the model's clean score (a trace
    that missed something) or when its first batch saves too little arithmetic."""
    N, C, H, W = inputs.shape
    bounds = occlusion_window_bounds(H, W, window, stride)  # on the host, as the engine wants them
    # on a GPU bigger batches only help; on the CPU the best size depends on the model
    state = {"image": None, "checked": False,
             "batch": batch_size or (INCREMENTAL_BATCH if inputs.device.type != "cpu" else None)}

    def run(chunk: Tensor) -> Tensor:
        out = engine.scores(*(b[chunk] for b in bounds))
        if not state["checked"]:
            fraction = PROFITABLE_FRACTION.get(inputs.device.type, PROFITABLE_FRACTION["cuda"])
            if engine.macs_incremental > fraction * engine.positions * engine.macs_clean:
                raise _Unprofitable
            state["checked"] = True
        return out

    def score(n: int, positions: Tensor) -> Tensor:
        if state["image"] != n:
            clean = engine.clean(inputs[n:n + 1], _rows(base, n, n + 1), _image_target(target, n))
            clean = clean.to(scores.dtype)  # under autocast: a 16-bit score
            if clean.shape != (1,) or not torch.allclose(clean, scores[n:n + 1], rtol=1e-3, atol=1e-5):
                raise _Fallback
            state["image"] = n
        positions = positions.cpu()
        out, first = [], 0
        if state["batch"] is None:  # time the candidate sizes on the first passes
            seconds, first = _time_batch_sizes(lambda start, size: out.append(run(positions[start:start + size])),
                                               INCREMENTAL_BATCH_SIZES, len(positions) // 4, inputs.device)
            state["batch"] = min(seconds, key=seconds.get) if seconds else INCREMENTAL_BATCH
            if seconds and inputs.device.type == "cpu":
                first = _choose_engine_layout(engine, lambda chunk: out.append(run(chunk)), positions, first,
                                              state["batch"], seconds[state["batch"]])
        out += [run(chunk) for chunk in positions[first:].split(state["batch"])]
        return scores[n] - torch.cat(out).to(scores.dtype)  # a 0-dim minuend would not promote
    return score


def _choose_engine_layout(engine: IncrementalOcclusion, run_chunk: Callable[[Tensor], None], positions: Tensor,
                          first: int, size: int, contiguous_seconds: float) -> int:
    """On the CPU, whether the engine's whole-map layers run channels-last: kept if a timed
    pass of ``size`` positions (after an untimed one, which pays oneDNN's set-up for the
    layout) beats ``contiguous_seconds`` per position: which layout wins depends on the
    network. Both passes score real positions; returns how many are done."""
    if len(positions) - first < 2 * size:
        return first
    engine.channels_last = True
    run_chunk(positions[first:first + size])
    start = time.perf_counter()
    run_chunk(positions[first + size:first + 2 * size])
    engine.channels_last = (time.perf_counter() - start) / size < contiguous_seconds
    return first + 2 * size


def _full_scorer(model: nn.Module, inputs: Tensor, base: Tensor, scores: Tensor, target, window, stride,
                 batch_size: int) -> Scorer:
    """Deltas of image ``n`` at some positions, each occluded image run through the model."""
    N, C, H, W = inputs.shape
    bounds = occlusion_window_bounds(H, W, window, stride, device=inputs.device)
    hh, ww = torch.arange(H, device=inputs.device), torch.arange(W, device=inputs.device)

    def score(n: int, positions: Tensor) -> Tensor:
        image, fill = inputs[n:n + 1], _rows(base, n, n + 1)
        out = []
        for chunk in positions.to(inputs.device).split(batch_size):
            r0, r1, c0, c1 = (b[chunk, None] for b in bounds)
            masks = ((hh >= r0) & (hh < r1))[:, :, None] & ((ww >= c0) & (ww < c1))[:, None, :]
            occluded = torch.where(masks[:, None], fill, image)
            rows = target_for_rows(target, torch.full_like(chunk, n))
            out.append(run_in_fast_layout(model, occluded, lambda batch: target_scores(model, batch, rows)))
        return scores[n] - torch.cat(out).to(scores.dtype)  # a 0-dim minuend would not promote
    return score


def _drill_down(score: Callable[[Tensor], Tensor], rows: int, cols: int, fraction: float, step: int) -> Tensor:
    """Deltas of one image's ``rows x cols`` positions (flat): exact on a coarse grid (every
    ``step``-th row and column, and the last) and on the ``fraction`` of positions with
    the highest bilinear interpolation of it; interpolated elsewhere."""
    knots_r = sorted(set(range(0, rows, step)) | {rows - 1})
    knots_c = sorted(set(range(0, cols, step)) | {cols - 1})
    coarse = (torch.tensor(knots_r)[:, None] * cols + torch.tensor(knots_c)[None, :]).flatten()
    coarse_deltas = score(coarse)
    grid = coarse_deltas.view(len(knots_r), len(knots_c))
    with torch.autocast(grid.device.type, enabled=False):  # interpolated in the deltas' dtype (dtype=bf16 too)
        estimate = (_interpolation(knots_r, rows).to(grid) @ grid @ _interpolation(knots_c, cols).to(grid).T).flatten()
    estimate[coarse.to(estimate.device)] = coarse_deltas
    todo = torch.ones(rows * cols, dtype=torch.bool)
    todo[coarse] = False
    candidates = todo.nonzero()[:, 0]
    k = min(candidates.numel(), math.ceil(fraction * rows * cols))
    if k:
        chosen = candidates[estimate[candidates.to(estimate.device)].topk(k).indices.cpu()]
        estimate[chosen.to(estimate.device)] = score(chosen)
    return estimate


def _interpolation(knots: List[int], n: int) -> Tensor:
    """``[n, len(knots)]`` weights of linear interpolation at 0..n-1 from values at ``knots``."""
    weights = torch.zeros(n, len(knots), dtype=torch.float64)
    for k, (a, b) in enumerate(zip(knots, knots[1:])):
        t = torch.arange(a, b + 1, dtype=torch.float64)
        weights[a:b + 1, k] = (b - t) / (b - a)
        weights[a:b + 1, k + 1] = (t - a) / (b - a)
    if len(knots) == 1:
        weights[:, 0] = 1
    return weights


def _image_target(target, n: int):
    """Image ``n``'s target for passes over copies of that image only."""
    if isinstance(target, (list, tuple, Tensor)):
        return int(torch.as_tensor(target)[n])
    return target


def _full_deltas(model: nn.Module, inputs: Tensor, base: Tensor, scores: Tensor, target, window, stride,
                 batch_size: Optional[int], memory_budget: Optional[int], per_image: Optional[int]) -> Tensor:
    """``deltas [N, positions]`` by full recomputation, in passes of ``batch_size`` occluded
    images; without one, the memory budget's size, or (no budget given and more work than
    one pass of it) the fastest of MEASURED_BATCH_SIZES timed on the first passes."""
    N, C, H, W = inputs.shape
    positions = math.prod(occlusion_grid(H, W, window, stride))
    deltas = scores.new_empty((N, positions))

    def run(n0, n1, first, count):
        batch = occlude(inputs[n0:n1], window, stride, _rows(base, n0, n1), first, count)
        images = torch.arange(n0, n1, device=inputs.device).repeat_interleave(count)
        rows = target_for_rows(target, images)
        occluded = run_in_fast_layout(model, batch.reshape(-1, C, H, W), lambda b: target_scores(model, b, rows))
        deltas[n0:n1, first:first + count] = scores[n0:n1, None] - occluded.view(n1 - n0, count)

    if batch_size is None:
        batch_size = choose_batch_size(per_image, inputs.device, memory_budget)
        if memory_budget is None and N * positions > batch_size:
            largest = choose_batch_size(per_image, inputs.device, max(memory_budget or 0, MAX_MEASURED_BUDGET))
            candidates = [b for b in MEASURED_BATCH_SIZES if b <= min(largest, positions)] or [batch_size]
            return _measured_passes(run, N, positions, candidates, inputs.device, deltas)
    for chunk in _chunks(N, positions, batch_size):
        run(*chunk)
    return deltas


def _time_batch_sizes(run_pass: Callable[[int, int], None], candidates, limit: int, device,
                      stop_when_slower: bool = False) -> Tuple[Dict[int, float], int]:
    """Consecutive first passes, one timed per candidate size, while they cover at most
    ``limit`` positions (``stop_when_slower``: also stop after a size slower per position
    than the best so far). The very first pass runs untimed: it also pays one-time costs
    (allocations, caches), which made the best size look slowest on EfficientNet-Lite0.
    ``run_pass(first, size)`` runs one. Returns ``({size: seconds per position}, positions
    done)``."""
    seconds: Dict[int, float] = {}
    first = 0
    for index, size in enumerate(candidates):
        if first + size * (2 if index == 0 else 1) > limit:
            break
        if index == 0:
            run_pass(first, size)
            first += size
        start = time.perf_counter()
        run_pass(first, size)
        if device.type == "cuda":  # time the work, not its launch
            torch.cuda.synchronize(device)
        seconds[size] = (time.perf_counter() - start) / size
        first += size
        if stop_when_slower and seconds[size] > min(seconds.values()):
            break
    return seconds, first


def _measured_passes(run, n_images: int, positions: int, candidates: List[int], device, deltas: Tensor) -> Tensor:
    """Run image 0's first passes with each candidate batch size (ascending) while they take
    at most a quarter of all the work and each is faster per image than the one before
    (trials past the best size cost ever more time), then everything left with the size
    that was fastest per image."""
    seconds, first = _time_batch_sizes(lambda start, size: run(0, 1, start, size), candidates,
                                       min(positions, n_images * positions // 4), device, stop_when_slower=True)
    best = min(seconds, key=seconds.get) if seconds else candidates[0]
    for start in range(first, positions, best):
        run(0, 1, start, min(best, positions - start))
    for n0, n1, start, count in _chunks(n_images - 1, positions, best):
        run(n0 + 1, n1 + 1, start, count)
    return deltas


def choose_batch_size(bytes_per_image: int, device: torch.device, memory_budget: Optional[int] = None) -> int:
    """Occluded images per forward pass: as many as fit in ``memory_budget`` bytes at
    ``bytes_per_image`` each (at least 1).

    Default budget: 64 MiB on CPU, half of the free memory (including memory cached but
    unused by PyTorch's allocator) on CUDA.
    """
    if memory_budget is None:
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            memory_budget = int(CUDA_FREE_FRACTION * (free + cached))
        else:
            memory_budget = CPU_MEMORY_BUDGET
    check_positive_int(memory_budget, "memory_budget")
    return max(1, memory_budget // max(1, int(bytes_per_image)))


def _clean_pass(model: nn.Module, inputs: Tensor, target: Target, keep_output: bool, measure: bool):
    """``(scores, output or None, bytes per image or None)`` from one forward pass on the
    clean inputs: the target scores, the model output when kept, and (``measure``) the
    estimated memory one more image adds to a forward pass: its occluded copy plus
    ``ACTIVATION_COPIES`` times the largest tensor an operator of this forward pass makes
    (:class:`_LargestTensor`)."""
    with _LargestTensor() if measure else contextlib.nullcontext() as largest:
        if keep_output:
            scores, output = target_scores(model, inputs, target, keep_output=True)
        else:
            scores, output = target_scores(model, inputs, target), None
    if not measure:
        return scores, output, None
    n = inputs.shape[0]
    return scores, output, inputs.nbytes // n + ACTIVATION_COPIES * math.ceil(largest.nbytes / n)


class _LargestTensor(TorchDispatchMode):
    """Records the size of the largest tensor any operator of the forward pass produces.
    A dispatch mode sees every operator whatever the model format (eager, TorchScript,
    torch.compile, torch.export), where module hooks do not run in all of them."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.nbytes = max(self.nbytes, t.nbytes)
        return out


def _chunks(n_images: int, positions: int, batch_size: int) -> List[Tuple[int, int, int, int]]:
    """Forward passes as ``(n0, n1, first, count)``: images ``n0:n1`` occluded at window
    positions ``first:first+count``, with at most ``batch_size`` images per pass. Whole
    images are grouped when all their positions fit; otherwise each image's positions are
    split into equal-sized passes (no small last pass)."""
    if batch_size >= positions:
        group = batch_size // positions
        return [(n0, min(n0 + group, n_images), 0, positions) for n0 in range(0, n_images, group)]
    passes = -(-positions // batch_size)
    size = -(-positions // passes)
    return [(n, n + 1, first, min(size, positions - first))
            for n in range(n_images) for first in range(0, positions, size)]


def _rows(base: Tensor, n0: int, n1: int) -> Tensor:
    """The baseline for images ``n0:n1`` (a per-image baseline is sliced)."""
    if base.shape[0] == 1:
        return base.reshape(()) if base.numel() == 1 else base
    return base[n0:n1]
