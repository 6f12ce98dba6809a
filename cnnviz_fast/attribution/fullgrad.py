"""FullGrad (Srinivas & Fleuret 2019), as pytorch-grad-cam computes it: input-gradient
and bias-gradient maps, each channel min-max scaled, summed.

One forward and one backward: the gradient with respect to the input and to the output of
every layer that adds a bias (``Conv2d`` and ``BatchNorm2d`` with a bias, the exact types
pytorch-grad-cam takes), captured through the shared layer pass of :mod:`._cam_engine`
(each output handed on as a copy, so an in-place ReLU after a batch norm leaves the
pre-activation gradient intact). No layer argument: FullGrad uses all of them.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..core import autograd_on, model_guard, target_scores
from ..core.layout import run_in_fast_layout
from ..core.arguments import friendly_arguments
from ..core.deferred import deferred_checks
from ._backprop import detach_output, prepare_inputs, with_output
from ._cam_engine import augment, check_flag, check_interpolate, clean_rows, deaugment, layer_outputs, min_max, upsample

__all__ = ["bias_layers", "full_grad"]


def _bias(module: nn.Module) -> Tensor:
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
        # eval-mode batch norm is y = gamma (x - mu) / sqrt(var + eps) + beta: its bias
        return module.bias - module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps)
    return module.bias


def bias_layers(model: nn.Module) -> List[Tuple[str, Tensor]]:
    """``(name, bias Tensor[K])`` of every ``Conv2d`` / ``BatchNorm2d`` (exact types) with a
    bias, in registration order; a batch norm's bias is its eval-mode one,
    ``beta - mu gamma / sqrt(var + eps)``."""
    return [(name, _bias(module).detach()) for name, module in model.named_modules()
            if name and type(module) in (nn.Conv2d, nn.BatchNorm2d) and module.bias is not None]


@friendly_arguments
def full_grad(model: nn.Module, inputs: Tensor, target, interpolate: str = "bilinear", aug_smooth: bool = False,
              return_output: bool = False):
    """FullGrad: ``sum_c s(|x_c * dS/dx_c|) + sum_layers up(sum_k s(|b_k * dS/dz_k|))``.

    ``s`` scales each (image, channel) map to [0, 1] (``(m - min) / (1e-7 + max)``), ``z``
    is a bias layer's output, ``b`` its bias, ``up`` upsamples to the input size; as
    pytorch-grad-cam's ``FullGrad`` before its final scaling (``eigen_smooth`` is not offered).

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints, a Neuron (bias layers after it do not count), a callable
            ``output -> Tensor[N]`` or ``"predicted"``.
        interpolate: ``"bilinear"`` (default, ``align_corners=False``) or ``"nearest"``.
        aug_smooth: pytorch-grad-cam's test-time augmentation (six copies, one pass); each
            copy's map min-max scaled, flipped back and averaged.
        return_output: also return the model's output from the same forward pass.

    Returns:
        ``Tensor[N, H, W]`` (>= 0) on the inputs' device (with ``return_output``,
        ``(map, output)``).
    """
    check_interpolate(interpolate)
    check_flag(aug_smooth, "aug_smooth")
    with model_guard(model), autograd_on(), deferred_checks():
        x = prepare_inputs(inputs, target, copy=True, model=model)
        n, size = x.shape[0], x.shape[2:]
        batch, batch_target = augment(x, target) if aug_smooth else (x, target)
        layers = bias_layers(model)
        leaf = batch.detach().requires_grad_(True)

        def forward(inputs: Tensor):
            output = None
            with layer_outputs(model, [name for name, _ in layers], start_graph=False) as captured:
                # the model gets a copy inside the graph: it may write into its input
                if return_output:
                    scores, output = target_scores(model, inputs.clone(), batch_target, keep_output=True)
                    output = detach_output(output)
                else:
                    scores = target_scores(model, inputs.clone(), batch_target)
            return captured, scores, output

        # large CPU batches run channels-last (core.layout); the maps are the same up to rounding
        captured, scores, output = run_in_fast_layout(model, leaf, forward)
        if not scores.requires_grad:
            raise ValueError("target does not depend on inputs (its score has no gradient)")
        ran = [(name, bias) for name, bias in layers if name in captured]
        grads = torch.autograd.grad(scores.sum(), [leaf] + [captured[name] for name, _ in ran], allow_unused=True)
        with torch.no_grad():
            total = min_max((grads[0] * batch).abs()).sum(dim=1) if grads[0] is not None else batch.new_zeros(
                (batch.shape[0], *size))
            by_size: Dict[Tuple[int, ...], Tensor] = {}
            for (name, bias), grad in zip(ran, grads[1:]):
                if grad is None:  # a branch the target does not depend on: all-zero maps
                    continue
                scaled = min_max((bias[None, :, None, None] * grad).abs()).sum(dim=1)
                key = tuple(scaled.shape[1:])
                by_size[key] = by_size[key] + scaled if key in by_size else scaled
            for maps in by_size.values():  # upsampling is linear: one per resolution
                total = total + upsample(maps, size, interpolate)
            if aug_smooth:
                total = deaugment(min_max(total))
                output = clean_rows(output, n) if return_output else None
    return with_output(total, output, return_output)
