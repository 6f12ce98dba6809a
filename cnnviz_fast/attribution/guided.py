"""Guided backpropagation (Springenberg et al. 2015) and deconvnet (Zeiler & Fergus 2014).

Both are the input gradient with every ReLU's backward replaced
(``cnnviz_fast.ops.guided_relu``). Every ReLU the forward pass reaches is
intercepted for the duration of the call, however it is written: ``nn.ReLU``
(also ``inplace=True``), ``F.relu`` (also ``inplace=True``), ``torch.relu``,
``torch.relu_``, ``Tensor.relu``, ``Tensor.relu_`` (Captum's ``GuidedBackprop`` /
``Deconvolution`` only see ``nn.ReLU`` modules and silently return plain gradients
for the others). Other activations (ReLU6, LeakyReLU, ``clamp``) are left as they are.
The model is never edited: the interception is a thread-local ``TorchFunctionMode``.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..core import model_guard
from ._backprop import autograd_on, input_gradients, prepare_inputs, with_output

__all__ = ["deconvnet", "guided_backprop"]


def _modified_gradient(model: nn.Module, inputs: Tensor, target, relu_mode: str, return_output: bool):
    with model_guard(model), autograd_on():
        grads, _, output = input_gradients(model, prepare_inputs(inputs, target, model=model), target, relu_mode,
                                           keep_output=return_output)
    return with_output(grads, output, return_output)


def guided_backprop(model: nn.Module, inputs: Tensor, target, return_output: bool = False):
    """Guided backpropagation: at each ReLU the gradient passes only where both the
    ReLU's input and the incoming gradient are positive.

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron` (guided backprop of one
            intermediate unit, as in the lecture), a callable ``output -> Tensor[N]`` or
            ``"predicted"``.
        return_output: also return the model's output from the same forward pass.

    Returns:
        ``Tensor[N, C, H, W]`` (signed) on the inputs' device (with ``return_output``,
        ``(attributions, output)``); equals Captum's ``GuidedBackprop`` for models whose
        ReLUs are ``nn.ReLU`` modules.
    """
    return _modified_gradient(model, inputs, target, "guided", return_output)


def deconvnet(model: nn.Module, inputs: Tensor, target, return_output: bool = False):
    """Deconvnet: at each ReLU the gradient passes where the incoming gradient is
    positive, whatever the ReLU's input.

    Same arguments and result shape as :func:`guided_backprop`; equals Captum's
    ``Deconvolution`` for models whose ReLUs are ``nn.ReLU`` modules.
    """
    return _modified_gradient(model, inputs, target, "deconvnet", return_output)
