"""Grad-CAM and Guided Grad-CAM (Selvaraju et al. 2017).

The backward pass runs only from the target to ``layer``: the forward pass below the
layer records no autograd graph, the layer's output becomes a fresh leaf, and
``torch.autograd.grad`` differentiates with respect to it alone (no parameter
gradients, nothing flows to the input). Model in eval mode for the call (``model_guard``),
gradients enabled even under ``torch.no_grad()`` / ``torch.inference_mode()``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Neuron, get_layer, layer_name, model_guard, target_scores
from ..core.arguments import friendly_arguments
from ..core import autograd_on
from ..core.deferred import deferred_checks
from ..core.targets import is_predicted, resolve_target
from ..core.validation import check_choice
from ._backprop import check_nonlinear, detach_output, input_gradients, prepare_inputs, with_output

__all__ = ["grad_cam", "guided_grad_cam"]

_INTERPOLATE_MODES = ("bilinear", "nearest")


@contextmanager
def _graph_starts_at(module: nn.Module, layer: str) -> Iterator[Dict[str, Tensor]]:
    """Run the forward inside this block under ``torch.no_grad()``: the first output of
    ``module`` is stored as a leaf that requires grad (``captured["activation"]``) and
    gradient recording switches on from there to the end of the forward pass."""
    captured: Dict[str, Tensor] = {}

    def hook(_module, _args, output):
        if "activation" in captured:  # a module run several times: its first output counts
            return None
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError(f"layer {layer!r} must output a feature map Tensor[N, K, h, w], got "
                             f"{tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}")
        leaf = output.detach().requires_grad_(True)
        captured["activation"] = leaf
        torch.set_grad_enabled(True)  # undone when the enclosing no_grad() block exits
        return leaf.clone()  # a following in-place op (ReLU(inplace=True)) must not touch the leaf

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _grad_cam(model: nn.Module, x: Tensor, target, layer: str, interpolate: str, keep_output: bool = False):
    """``(cam Tensor[N, H, W], output or None)``: the model output of the same pass with ``keep_output``."""
    module = get_layer(model, layer)
    output = None
    with _graph_starts_at(module, layer) as captured, torch.no_grad():
        if keep_output:
            scores, output = target_scores(model, x, target, keep_output=True)
            output = detach_output(output)
        else:
            scores = target_scores(model, x, target)
    if "activation" not in captured:
        if isinstance(target, Neuron):
            raise ValueError(f"layer {layer!r} did not run before the forward pass stopped at the "
                             f"target Neuron's layer {target.layer!r}: the Neuron must lie at or after layer")
        raise ValueError(f"layer {layer!r} was not executed during the forward pass of {type(model).__name__}")
    activation = captured["activation"]
    if not scores.requires_grad:
        raise ValueError(f"target does not depend on layer {layer!r}")
    (grads,) = torch.autograd.grad(scores.sum(), activation)
    with torch.no_grad():
        weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
        align = False if interpolate == "bilinear" else None
        cam = F.interpolate(cam, size=x.shape[2:], mode=interpolate, align_corners=align)
    return cam[:, 0], output


def _check_interpolate(interpolate: str) -> None:
    check_choice(interpolate, _INTERPOLATE_MODES, "interpolate")


@friendly_arguments
def grad_cam(model: nn.Module, inputs: Tensor, layer: str, target, interpolate: str = "bilinear",
             return_output: bool = False):
    """Grad-CAM: ``ReLU(sum_k alpha_k A_k)`` upsampled to the input size, not normalised.

    ``A = Tensor[N, K, h, w]`` is the output of ``layer`` (its first call when the module
    runs several times) and ``alpha_k`` the spatial mean of ``d score / d A_k``.

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        layer: dotted module name (``model.get_submodule``) or the module itself, with a ``[N, K, h, w]`` output.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron` at or after ``layer`` (the
            forward stops at the Neuron's layer), a callable ``output -> Tensor[N]`` or
            ``"predicted"``.
        interpolate: ``"bilinear"`` (default, ``align_corners=False``) or ``"nearest"``.
        return_output: also return the model's output from the same forward pass.

    Returns:
        ``Tensor[N, H, W]`` (>= 0) on the inputs' device (with ``return_output``,
        ``(cam, output)``).
    """
    layer = layer_name(model, layer, "layer", target, "grad_cam")
    _check_interpolate(interpolate)
    with model_guard(model), autograd_on(), deferred_checks():
        x = prepare_inputs(inputs, target, copy=True, model=model)
        cam, output = _grad_cam(model, x, target, layer, interpolate, keep_output=return_output)
    return with_output(cam, output, return_output)


@friendly_arguments
def guided_grad_cam(
    model: nn.Module, inputs: Tensor, layer: str, target, interpolate: str = "bilinear",
    return_output: bool = False, nonlinear: str = "raise",
):
    """Guided Grad-CAM: :func:`guided_backprop` times the upsampled :func:`grad_cam` map.

    Same arguments as :func:`grad_cam`. Returns ``Tensor[N, C, H, W]`` on the inputs'
    device (Captum's ``GuidedGradCam`` with ``interpolate_mode=interpolate``; Captum's
    default there is ``"nearest"``, the paper's is bilinear); with ``return_output``,
    ``(attributions, output)``, the output of the Grad-CAM pass (whose prediction
    ``target="predicted"`` also fixes for the guided pass). ``nonlinear``: as in
    :func:`guided_backprop`.
    """
    layer = layer_name(model, layer, "layer", target, "guided_grad_cam")
    _check_interpolate(interpolate)
    check_nonlinear(nonlinear)
    with model_guard(model), autograd_on(), deferred_checks():
        x = prepare_inputs(inputs, target, copy=True, model=model)
        cam, output = _grad_cam(model, x, target, layer, interpolate,
                                keep_output=return_output or is_predicted(target))
        guided, _, _ = input_gradients(model, x, resolve_target(target, output), relu_mode="guided",
                                       nonlinear=nonlinear)
    return with_output(guided * cam[:, None], output, return_output)
