"""The CAM family beyond Grad-CAM, on the pass every CAM shares (:mod:`._cam_engine`):
one forward and one backward from the target to the layer (none for Eigen-CAM), the
formulas of :mod:`.cam_rules`, pytorch-grad-cam's ``eigen_smooth`` and ``aug_smooth``.

    cam = grad_cam_plus_plus(model, x, "layer4", labels)                 # Tensor[N, H, W]
    maps = cams(model, x, "layer4", labels, ["grad_cam", "layer_cam", "eigen_cam"])  # one pass
    fused = layer_cam(model, x, ["layer2", "layer3", "layer4"], labels)  # several layers, in [0, 1]
    vit = hires_cam(vit_model, x, "blocks.11.norm1", labels)             # tokens laid on their grid

Every function takes ``layer`` as a dotted module name or the module itself, or a list of
them (pytorch-grad-cam's ``target_layers``). Layer outputs may be feature maps
``[N, K, h, w]``, ViT tokens ``[N, tokens, C]`` (leading class / register tokens skipped,
the rest laid on the input's grid) or Swin's ``[N, h, w, C]``; ``reshape=`` (a callable
``output -> [N, K, h, w]``) overrides that rule. One layer gives ``ReLU(map)`` upsampled
to the input size, not normalised (as :func:`grad_cam`); several layers or
``aug_smooth=True`` give pytorch-grad-cam's min-max scaled maps in [0, 1].
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..core import autograd_on, model_guard
from ..core.arguments import friendly_arguments
from ..core.deferred import deferred_checks
from ._backprop import prepare_inputs, with_output
from ._cam_engine import Reshape, check_flag, check_interpolate, check_methods, layer_names_of, run_cams, token_grid
from .cam_rules import CAM_RULES

__all__ = ["CAM_METHODS", "cams", "token_grid", "eigen_cam", "eigen_grad_cam", "grad_cam_elementwise", "grad_cam_plus_plus",
           "hires_cam", "layer_cam", "xgrad_cam"]

CAM_METHODS = tuple(CAM_RULES)  # the names cams() takes


def _run(method: str, model, inputs, layer, target, methods: Sequence[str], interpolate: str,
         eigen_smooth: bool, aug_smooth: bool, reshape: Reshape, return_output: bool):
    layers, fused = layer_names_of(model, layer, target, method)
    check_interpolate(interpolate)
    check_flag(eigen_smooth, "eigen_smooth")
    check_flag(aug_smooth, "aug_smooth")
    if reshape is not None and not callable(reshape):
        raise ValueError(f"reshape must be a callable (layer output -> Tensor[N, K, h, w]), got {reshape!r}")
    with model_guard(model), autograd_on(), deferred_checks():
        x = prepare_inputs(inputs, target, copy=True, model=model)
        maps, output = run_cams(model, x, layers, target, methods, fused=fused, eigen_smooth=eigen_smooth,
                                aug_smooth=aug_smooth, interpolate=interpolate, keep_output=return_output,
                                reshape=reshape)
    return maps, output


def _one(method: str, model, inputs, layer, target, interpolate, eigen_smooth, aug_smooth, reshape,
         return_output):
    maps, output = _run(method, model, inputs, layer, target, [method], interpolate, eigen_smooth, aug_smooth,
                        reshape, return_output)
    return with_output(maps[method], output, return_output)


@friendly_arguments
def cams(model: nn.Module, inputs: Tensor, layer, target, methods: Sequence[str] = CAM_METHODS,
         interpolate: str = "bilinear", eigen_smooth: bool = False, aug_smooth: bool = False,
         reshape: Reshape = None, return_output: bool = False):
    """Several CAMs of the same layer(s) from ONE forward and one backward pass.

    Args:
        model, inputs (``Tensor[N, C, H, W]``), layer, target: as in every CAM.
        methods: names from :data:`CAM_METHODS` (``grad_cam``, ``grad_cam_plus_plus``,
            ``xgrad_cam``, ``hires_cam``, ``layer_cam``, ``grad_cam_elementwise``,
            ``eigen_cam``, ``eigen_grad_cam``); default all. Only Eigen-CAM: no backward.
        interpolate, eigen_smooth, aug_smooth, reshape: as in each CAM (``eigen_smooth``
            applies to the methods that have it).
        return_output: also return the model output of that pass.

    Returns:
        ``{name: Tensor[N, H, W]}`` in the order of ``methods`` (with ``return_output``,
        ``(maps, output)``); each equal to the single method's result.
    """
    methods = check_methods(methods)
    maps, output = _run("cams", model, inputs, layer, target, methods, interpolate, eigen_smooth, aug_smooth,
                        reshape, return_output)
    return with_output(maps, output, return_output)


_ARGS = """
    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        layer: a dotted module name or the module (output ``[N, K, h, w]``, ViT tokens
            ``[N, tokens, C]`` or Swin's ``[N, h, w, C]``), or a list of them: their maps
            are scaled, averaged and scaled again (pytorch-grad-cam's multi-layer CAM).
        target: an int, N ints, a Neuron at or after ``layer``, a callable
            ``output -> Tensor[N]`` or ``"predicted"``.
        interpolate: ``"bilinear"`` (default, ``align_corners=False``) or ``"nearest"``.{eigen}
        aug_smooth: pytorch-grad-cam's test-time augmentation (flip x brightness 0.9 / 1 /
            1.1: six copies in one pass; ``"predicted"`` is the clean image's class); the
            maps are then min-max scaled per image.
        reshape: a callable ``layer output -> Tensor[N, K, h, w]`` replacing the token rule.
        return_output: also return the model's output from the same forward pass.

    Returns:
        ``Tensor[N, H, W]`` (>= 0) on the inputs' device (with ``return_output``,
        ``(cam, output)``).
    """
_EIGEN = """
        eigen_smooth: the first principal component of the weighted activations instead
            of their channel sum (sign: see :func:`~.cam_rules.first_component`)."""


def _document(function, summary: str, eigen: bool = True):
    function.__doc__ = summary + "\n" + _ARGS.format(eigen=_EIGEN if eigen else "")
    return function


@friendly_arguments
def grad_cam_plus_plus(model: nn.Module, inputs: Tensor, layer, target, interpolate: str = "bilinear",
                       eigen_smooth: bool = False, aug_smooth: bool = False, reshape: Reshape = None,
                       return_output: bool = False):
    return _one("grad_cam_plus_plus", model, inputs, layer, target, interpolate, eigen_smooth, aug_smooth,
                reshape, return_output)


@friendly_arguments
def xgrad_cam(model: nn.Module, inputs: Tensor, layer, target, interpolate: str = "bilinear",
              eigen_smooth: bool = False, aug_smooth: bool = False, reshape: Reshape = None,
              return_output: bool = False):
    return _one("xgrad_cam", model, inputs, layer, target, interpolate, eigen_smooth, aug_smooth, reshape,
                return_output)


@friendly_arguments
def hires_cam(model: nn.Module, inputs: Tensor, layer, target, interpolate: str = "bilinear",
              eigen_smooth: bool = False, aug_smooth: bool = False, reshape: Reshape = None,
              return_output: bool = False):
    return _one("hires_cam", model, inputs, layer, target, interpolate, eigen_smooth, aug_smooth, reshape,
                return_output)


@friendly_arguments
def layer_cam(model: nn.Module, inputs: Tensor, layer, target, interpolate: str = "bilinear",
              eigen_smooth: bool = False, aug_smooth: bool = False, reshape: Reshape = None,
              return_output: bool = False):
    return _one("layer_cam", model, inputs, layer, target, interpolate, eigen_smooth, aug_smooth, reshape,
                return_output)


@friendly_arguments
def grad_cam_elementwise(model: nn.Module, inputs: Tensor, layer, target, interpolate: str = "bilinear",
                         eigen_smooth: bool = False, aug_smooth: bool = False, reshape: Reshape = None,
                         return_output: bool = False):
    return _one("grad_cam_elementwise", model, inputs, layer, target, interpolate, eigen_smooth, aug_smooth,
                reshape, return_output)


@friendly_arguments
def eigen_cam(model: nn.Module, inputs: Tensor, layer, target, interpolate: str = "bilinear",
              aug_smooth: bool = False, reshape: Reshape = None, return_output: bool = False):
    return _one("eigen_cam", model, inputs, layer, target, interpolate, False, aug_smooth, reshape, return_output)


@friendly_arguments
def eigen_grad_cam(model: nn.Module, inputs: Tensor, layer, target, interpolate: str = "bilinear",
                   aug_smooth: bool = False, reshape: Reshape = None, return_output: bool = False):
    return _one("eigen_grad_cam", model, inputs, layer, target, interpolate, False, aug_smooth, reshape,
                return_output)


_document(grad_cam_plus_plus, """Grad-CAM++ (Chattopadhay et al. 2018): ``ReLU(sum_k w_k A_k)`` with
    ``w_k = sum_ij relu(g) g^2 / (2 g^2 + sum(A_k) g^3)``, ``g = d score / d A_k(i, j)``
    (pytorch-grad-cam's ``GradCAMPlusPlus``).""")
_document(xgrad_cam, """XGrad-CAM (Fu et al. 2020): ``ReLU(sum_k w_k A_k)`` with
    ``w_k = sum_ij g A_k(i, j) / sum_ij A_k(i, j)`` (pytorch-grad-cam's ``XGradCAM``).""")
_document(hires_cam, """HiResCAM (Draelos & Carin 2020): ``ReLU(sum_k g_k * A_k)``, the elementwise
    product of gradient and activation summed over channels (pytorch-grad-cam's ``HiResCAM``).""")
_document(layer_cam, """LayerCAM (Jiang et al. 2021): ``ReLU(sum_k relu(g_k) * A_k)``; over a list of
    layers, pytorch-grad-cam's fusion of their scaled maps (its ``LayerCAM`` with several
    ``target_layers``).""")
_document(grad_cam_elementwise, """Grad-CAM element-wise: ``ReLU(sum_k relu(g_k * A_k))``
    (pytorch-grad-cam's ``GradCAMElementWise``).""")
_document(eigen_cam, """Eigen-CAM (Muhammad & Yeasin 2020): ``ReLU`` of the activations' projection on
    their first principal component (pytorch-grad-cam's ``EigenCAM``; its sign fixed, see
    :func:`~.cam_rules.first_component`). Class-agnostic: ``target`` is checked but not
    used, and no backward pass runs.""", eigen=False)
_document(eigen_grad_cam, """EigenGrad-CAM: Eigen-CAM of ``g * A`` (pytorch-grad-cam's ``EigenGradCAM``;
    sign fixed, see :func:`~.cam_rules.first_component`).""", eigen=False)

