"""Occlusion sensitivity (Zeiler & Fergus 2014): slide a grey (baseline) window over the
image and record how much the target score drops at each position.

Occluded batches are built by one operator call per forward pass
(:func:`cnnviz_fast.ops.occlude`) and the per-position score drops are spread back onto
the pixels once at the end (:func:`cnnviz_fast.ops.occlusion_accumulate`), so no Python
work happens per window position.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..core import check_images, model_guard, target_scores
from ..core.targets import Target, check_target, is_predicted, resolve_target, target_for_rows
from ._backprop import detach_output
from ..core.validation import check_baseline, check_model_inputs, check_pair, check_positive_int
from ..ops import occlude, occlusion_accumulate, occlusion_grid

__all__ = ["occlusion", "choose_batch_size"]

# On CPU, forward passes stop getting faster per image once a batch's activations are
# a few tens of MiB (they fall out of cache); measured on ResNet-18 and the digits CNN.
CPU_MEMORY_BUDGET = 64 * 2**20
# On CUDA, use at most this fraction of the memory that is free when the call starts.
CUDA_FREE_FRACTION = 0.5
# Live activations per image during an inference forward pass, in units of the largest
# layer output: a layer's input and output, plus a skip connection held alongside.
ACTIVATION_COPIES = 3


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
        batch_size: occluded images per forward pass (windows of several images may share
            a pass). The result does not depend on it. Default: as many as fit in
            ``memory_budget``, counting per occluded image its own copy plus 3 times the
            largest layer output (a layer's input, its output and a skip connection),
            measured by hooks on the leaf modules during the clean forward pass.
        memory_budget: bytes one forward pass may use when ``batch_size`` is None.
            Default: 64 MiB on CPU (larger batches run no faster there: they fall out of
            cache), half of the free memory on CUDA.
        return_deltas: also return the score drops per window position.
        return_output: also return the model's output on the clean inputs (the pass the
            unoccluded scores come from).

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
        rows, cols = occlusion_grid(H, W, window, stride)
        positions = rows * cols

        keep_output = return_output or is_predicted(target)
        with torch.inference_mode():
            # a copy: a model that writes into its input must not change the caller's tensor
            scores, output, per_image = _clean_pass(model, inputs.clone(), target, keep_output,
                                                    measure=batch_size is None)
            if batch_size is None:
                batch_size = choose_batch_size(per_image, inputs.device, memory_budget)
            target = resolve_target(target, output)
            deltas = scores.new_empty((N, positions))
            for n0, n1, first, count in _chunks(N, positions, batch_size):
                batch = occlude(inputs[n0:n1], window, stride, _rows(base, n0, n1), first, count)
                images = torch.arange(n0, n1, device=inputs.device).repeat_interleave(count)
                occluded = target_scores(model, batch.reshape(-1, C, H, W), target_for_rows(target, images))
                deltas[n0:n1, first:first + count] = scores[n0:n1, None] - occluded.view(n1 - n0, count)

        # outside inference mode so that the results are ordinary tensors
        with torch.no_grad():
            results = (occlusion_accumulate(deltas, H, W, window, stride),)
            if return_deltas:
                results += (deltas.reshape(N, rows, cols).clone(),)
            if return_output:
                results += (_ordinary(output),)
        return results[0] if len(results) == 1 else results


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
    ``ACTIVATION_COPIES`` times the largest layer output (measured by hooks on the leaf
    modules during this forward pass)."""
    largest = [0]

    def record(module, args, output):
        if isinstance(output, Tensor):
            largest[0] = max(largest[0], output.nbytes)

    leaves = [m for m in model.modules() if next(m.children(), None) is None] if measure else []
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        if keep_output:
            scores, output = target_scores(model, inputs, target, keep_output=True)
        else:
            scores, output = target_scores(model, inputs, target), None
    finally:
        for handle in handles:
            handle.remove()
    if not measure:
        return scores, output, None
    n = inputs.shape[0]
    return scores, output, inputs.nbytes // n + ACTIVATION_COPIES * math.ceil(largest[0] / n)


def _ordinary(output):
    """An inference-mode output as ordinary tensors (callers may use them in autograd)."""
    output = detach_output(output)
    if isinstance(output, Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_ordinary(o) for o in output)
    if isinstance(output, dict):
        return {k: _ordinary(v) for k, v in output.items()}
    return output


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
