"""Occlusion's entry point: argument checks, the clean pass, and the choice of engine:
the incremental engine (:mod:`.incremental_scorer`) unless the mode, the model (not
traceable) or the plan (too little saved) says otherwise, else full recomputation
(:mod:`.full`); with a drill-down (:mod:`.approximate`) either engine scores the chosen
positions only. The score drops are spread back onto the pixels once at the end."""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ...core import check_images, model_guard
from ...core.arguments import friendly_arguments
from ...core.targets import Target, check_target, is_predicted, resolve_target
from ...core.validation import check_baseline, check_model_inputs, check_pair, check_positive_int
from ...ops import occlusion_accumulate, occlusion_grid
from .._backprop import detach_output
from .approximate import COARSE_STEP, check_mode, drill_down as drill_down_deltas
from .batching import choose_batch_size, clean_pass
from .full import Scorer, full_deltas, full_scorer
from .folding import checked_folded_model
from .incremental import IncrementalOcclusion
from .incremental_scorer import Fallback, Unprofitable, incremental_scorer

__all__ = ["occlusion", "PROFITABLE_FRACTION"]

# The incremental plan is abandoned for full recomputation when it saves less than this
# (multiply-adds of its first batch / those of full passes for the same positions), per
# device type. On a GPU the plan's gathers and small convolutions use the device far less
# well than full batched passes: on an H200 it reached 15-39 % of its theoretical saving
# (70 % and more on a CPU), so ResNet-18 (2.2x fewer multiply-adds) and MobileNetV2 (1.8x)
# ran slower than full recomputation and VGG-16 (6.5x) 2.5x faster
# (benchmarks/results/incremental-*-nvidia-h200.md).
PROFITABLE_FRACTION = {"cpu": 0.8, "cuda": 0.25}

# Plans found unprofitable, per model: (image shape, window, stride, device type, field_cap,
# target layer). Later calls with the same geometry skip the trace, the clean pass through
# the graph and the trial batch (40 ms of a 110 ms ResNet-18 call on an H200).
_UNPROFITABLE_PLANS: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


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
        field_cap, drill_down, coarse_step = check_mode(mode, field_cap, drill_down, coarse_step, inputs.device)
        rows, cols = occlusion_grid(H, W, window, stride)

        keep_output = return_output or is_predicted(target)
        amp = _autocast(dtype, inputs.device)
        with torch.inference_mode(), amp:
            # a copy: a model that writes into its input must not change the caller's tensor
            scores, output, per_image = clean_pass(model, inputs.clone(), target, keep_output,
                                                   measure=batch_size is None)
            scores = scores.to(inputs.dtype)  # under autocast: drops taken in the inputs' dtype
            target = resolve_target(target, output)
            # occluded passes run with batch norm folded into the convolutions (same function)
            runner = checked_folded_model(model, inputs, target, scores)
            deltas = None
            plan = (tuple(inputs.shape[1:]), window, stride, inputs.device.type, field_cap,
                    getattr(target, "layer", None), dtype)
            if mode != "full" and plan not in _UNPROFITABLE_PLANS.get(model, ()):
                engine = IncrementalOcclusion.build(runner, target, field_cap=field_cap)
                if engine is not None:
                    fraction = PROFITABLE_FRACTION.get(inputs.device.type, PROFITABLE_FRACTION["cuda"])
                    score = incremental_scorer(engine, inputs, base, scores, target, window, stride, batch_size,
                                               fraction)
                    try:
                        deltas = _deltas(score, N, rows, cols, drill_down, coarse_step)
                    except Unprofitable:
                        _UNPROFITABLE_PLANS.setdefault(model, set()).add(plan)
            if deltas is None and drill_down is not None:
                score = full_scorer(runner, inputs, base, scores, target, window, stride,
                                    batch_size or choose_batch_size(per_image, inputs.device, memory_budget))
                deltas = _deltas(score, N, rows, cols, drill_down, coarse_step)
            if deltas is None:
                deltas = full_deltas(runner, inputs, base, scores, target, window, stride, batch_size,
                                     memory_budget, per_image)

        # outside inference mode so that the results are ordinary tensors
        with torch.no_grad():
            results = (occlusion_accumulate(deltas, H, W, window, stride),)
            if return_deltas:
                results += (deltas.reshape(N, rows, cols).clone(),)
            if return_output:
                results += (detach_output(output, clone=True),)
        return results[0] if len(results) == 1 else results


def _deltas(score: Scorer, n_images: int, rows: int, cols: int, drill_down: Optional[float],
            coarse_step: int = COARSE_STEP) -> Optional[Tensor]:
    """``deltas [N, rows * cols]`` from ``score(n, positions) -> deltas of those positions``
    (every position, or the drill-down's choice); None when the scorer gives up."""
    positions = torch.arange(rows * cols)
    try:
        if drill_down is None:
            return torch.stack([score(n, positions) for n in range(n_images)])
        return torch.stack([drill_down_deltas(lambda p: score(n, p), rows, cols, drill_down, coarse_step)
                            for n in range(n_images)])
    except Unprofitable:
        raise
    except Fallback:
        return None


AUTOCAST_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(dtype, device: torch.device):
    """The passes' autocast context for ``dtype=`` (a no-op for None / ``"fp32"``)."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {list(AUTOCAST_DTYPES)}, got {dtype!r}")
    if AUTOCAST_DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, AUTOCAST_DTYPES[dtype])
