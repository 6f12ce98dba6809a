"""Guided backpropagation (Springenberg et al. 2015) and deconvnet (Zeiler & Fergus 2014).

Both are the input gradient with every rectifier's backward replaced
(``cnnviz_fast.ops.guided_relu``). Every rectifier the forward pass reaches is
intercepted for the duration of the call, however it is written: ReLU (``nn.ReLU``,
``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not), ReLU6 (``nn.ReLU6``,
``F.relu6``), ``Hardtanh(0, t)`` / ``F.hardtanh(x, 0, t)``, ``clamp(min=0[, max=t])``
(``torch.clamp`` / ``clip`` / ``clamp_min`` and their Tensor / in-place forms) and
``threshold(x, 0, 0)`` (Captum's ``GuidedBackprop`` / ``Deconvolution`` only see
``nn.ReLU`` modules and silently return plain gradients for the others). The model is
never edited: the interception is a thread-local ``TorchFunctionMode``.

Rule at a rectifier ``clamp(x, 0, upper)`` (``upper = inf`` for ReLU), whose linear
range is ``0 < x < upper`` (open: ``x == 0`` and ``x == upper`` pass nothing):
guided passes the gradient where ``x`` is in the linear range and the gradient is
positive; deconvnet passes it where the gradient is positive and ``x < upper`` (the
lower side is replaced by the gradient's sign as for ReLU; a unit saturated at the top
passes nothing).

Other activations: ``clamp`` with another lower bound or tensor bounds is not an
activation and keeps its gradient; Sigmoid, Tanh and Hardsigmoid (gates and output
squashers, derivative never negative) keep their own gradient; ReLU replacements that
are not rectifiers (LeakyReLU, PReLU, RReLU, ELU, SELU, CELU, SiLU, GELU, Mish,
Hardswish, Softplus, Hardtanh with ``min_val != 0``, other thresholds) raise a
``ValueError`` unless ``nonlinear="gradient"`` lets their own gradient through.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..core.arguments import friendly_arguments
from ..core import model_guard
from ..core import autograd_on
from ..core.deferred import deferred_checks
from ._backprop import check_nonlinear, input_gradients, prepare_inputs, with_output

__all__ = ["deconvnet", "guided_backprop"]


def _modified_gradient(
    model: nn.Module, inputs: Tensor, target, relu_mode: str, return_output: bool, nonlinear: str
):
    check_nonlinear(nonlinear)
    with model_guard(model), autograd_on(), deferred_checks():
        grads, _, output = input_gradients(model, prepare_inputs(inputs, target, model=model), target, relu_mode,
                                           keep_output=return_output, nonlinear=nonlinear)
    return with_output(grads, output, return_output)


@friendly_arguments
def guided_backprop(model: nn.Module, inputs: Tensor, target, return_output: bool = False,
                    nonlinear: str = "raise"):
    """Guided backpropagation: at each ReLU the gradient passes only where both the
    ReLU's input and the incoming gradient are positive (at ReLU6 / ``Hardtanh(0, t)`` /
    ``clamp(min=0, max=t)``: where the input is in ``(0, t)`` and the gradient positive).

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron` (guided backprop of one
            intermediate unit, as in the lecture), a callable ``output -> Tensor[N]`` or
            ``"predicted"``.
        return_output: also return the model's output from the same forward pass.
        nonlinear: what a non-rectifying activation (LeakyReLU, ELU, SiLU, GELU, ...)
            does: ``"raise"`` (default, a ``ValueError`` naming it) or ``"gradient"``
            (its own gradient passes, unmodified).

    Returns:
        ``Tensor[N, C, H, W]`` (signed) on the inputs' device (with ``return_output``,
        ``(attributions, output)``); equals Captum's ``GuidedBackprop`` for models whose
        ReLUs are ``nn.ReLU`` modules.
    """
    return _modified_gradient(model, inputs, target, "guided", return_output, nonlinear)


@friendly_arguments
def deconvnet(model: nn.Module, inputs: Tensor, target, return_output: bool = False, nonlinear: str = "raise"):
    """Deconvnet: at each ReLU the gradient passes where the incoming gradient is
    positive, whatever the ReLU's input (at ReLU6 / ``Hardtanh(0, t)`` /
    ``clamp(min=0, max=t)``: where the gradient is positive and the input below ``t``).

    Same arguments and result shape as :func:`guided_backprop`; equals Captum's
    ``Deconvolution`` for models whose ReLUs are ``nn.ReLU`` modules.
    """
    return _modified_gradient(model, inputs, target, "deconvnet", return_output, nonlinear)
