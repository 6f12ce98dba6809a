"""Grad-CAM and Guided Grad-CAM (Selvaraju et al. 2017).

Grad-CAM runs on the pass every CAM shares (:mod:`._cam_engine`): the backward runs only
from the target to ``layer`` (no parameter gradients, nothing flows to the input). Model
in eval mode for the call (``model_guard``), gradients enabled even under
``torch.no_grad()`` / ``torch.inference_mode()``. The other CAMs are in :mod:`.cams`.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..core import layer_name, model_guard
from ..core.arguments import friendly_arguments
from ..core import autograd_on
from ..core.deferred import deferred_checks
from ..core.targets import is_predicted, resolve_target
from ._backprop import check_nonlinear, input_gradients, prepare_inputs, with_output
from ._cam_engine import Reshape, check_flag, check_interpolate, run_cams

__all__ = ["grad_cam", "guided_grad_cam"]


def _grad_cam(model: nn.Module, x: Tensor, target, layer: str, interpolate: str, keep_output: bool = False,
              eigen_smooth: bool = False, aug_smooth: bool = False, reshape: Reshape = None):
    """``(cam Tensor[N, H, W], output or None)``: the model output of the same pass with ``keep_output``."""
    cams, output = run_cams(model, x, [layer], target, ["grad_cam"], eigen_smooth=eigen_smooth,
                            aug_smooth=aug_smooth, interpolate=interpolate, keep_output=keep_output,
                            reshape=reshape)
    return cams["grad_cam"], output


@friendly_arguments
def grad_cam(model: nn.Module, inputs: Tensor, layer: str, target, interpolate: str = "bilinear",
             return_output: bool = False, eigen_smooth: bool = False, aug_smooth: bool = False,
             reshape: Reshape = None):
    """Grad-CAM: ``ReLU(sum_k alpha_k A_k)`` upsampled to the input size, not normalised.

    ``A = Tensor[N, K, h, w]`` is the output of ``layer`` (its first call when the module
    runs several times) and ``alpha_k`` the spatial mean of ``d score / d A_k``.

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        layer: dotted module name (``model.get_submodule``) or the module itself, with a
            ``[N, K, h, w]`` output, or tokens ``[N, tokens, C]`` / ``[N, h, w, C]`` (ViT, Swin:
            see :func:`~cnnviz_fast.attribution.cams.cams`).
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron` at or after ``layer`` (the
            forward stops at the Neuron's layer), a callable ``output -> Tensor[N]`` or
            ``"predicted"``.
        interpolate: ``"bilinear"`` (default, ``align_corners=False``) or ``"nearest"``.
        return_output: also return the model's output from the same forward pass.
        eigen_smooth: the first principal component of ``alpha_k A_k`` instead of their sum.
        aug_smooth: pytorch-grad-cam's test-time augmentation (6 copies, one pass); the
            map is then min-max scaled per image, as pytorch-grad-cam's.
        reshape: a callable ``layer output -> Tensor[N, K, h, w]`` replacing the token rule.

    Returns:
        ``Tensor[N, H, W]`` (>= 0) on the inputs' device (with ``return_output``,
        ``(cam, output)``).
    """
    layer = layer_name(model, layer, "layer", target, "grad_cam")
    check_interpolate(interpolate)
    check_flag(eigen_smooth, "eigen_smooth")
    check_flag(aug_smooth, "aug_smooth")
    with model_guard(model), autograd_on(), deferred_checks():
        x = prepare_inputs(inputs, target, copy=True, model=model)
        cam, output = _grad_cam(model, x, target, layer, interpolate, keep_output=return_output,
                                eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, reshape=reshape)
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
    check_interpolate(interpolate)
    check_nonlinear(nonlinear)
    with model_guard(model), autograd_on(), deferred_checks():
        x = prepare_inputs(inputs, target, copy=True, model=model)
        cam, output = _grad_cam(model, x, target, layer, interpolate,
                                keep_output=return_output or is_predicted(target))
        guided, _, _ = input_gradients(model, x, resolve_target(target, output), relu_mode="guided",
                                       nonlinear=nonlinear)
    return with_output(guided * cam[:, None], output, return_output)
