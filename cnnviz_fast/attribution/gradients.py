"""Input-gradient attributions: saliency, SmoothGrad, integrated gradients.

Every method runs the model in eval mode (``model_guard``; the model's train/eval
flags, hooks and parameters are restored afterwards, also after an exception),
with gradients enabled even when the caller is in ``torch.no_grad()`` or
``torch.inference_mode()``. Only gradients with respect to the inputs are computed,
never parameter gradients; the caller's ``inputs`` are not modified.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.arguments import friendly_arguments
from ..core import model_guard
from ..core.validation import check_baseline, check_number, check_positive_int
from ..core import autograd_on
from ._backprop import accumulate_gradients, clean_output, input_gradients, prepare_inputs, with_output

__all__ = ["gradient_x_input", "integrated_gradients", "saliency", "smoothgrad"]

DEFAULT_BATCH_SIZE = 32


@friendly_arguments
def saliency(model: nn.Module, inputs: Tensor, target, abs: bool = True, return_output: bool = False):
    """Gradient of the target score with respect to each input pixel (Captum's ``Saliency``).

    Args:
        model: the network; run in eval mode for the call.
        inputs: ``Tensor[N, C, H, W]``, finite.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron`, a callable
            ``output -> Tensor[N]`` or ``"predicted"`` (see :mod:`cnnviz_fast.core.targets`).
        abs: return ``|gradient|`` (default, as Captum) instead of the signed gradient.
        return_output: also return the model's output on ``inputs`` from the same
            forward pass (one forward + one backward in all).

    Returns:
        ``Tensor[N, C, H, W]`` on the inputs' device; with ``return_output``,
        ``(attributions, output)``.
    """
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        grads, _, output = input_gradients(model, x, target, keep_output=return_output)
    return with_output(grads.abs() if abs else grads, output, return_output)


@friendly_arguments
def gradient_x_input(model: nn.Module, inputs: Tensor, target, return_output: bool = False):
    """Gradient × input, signed (Captum's ``InputXGradient``): ``inputs * d score / d inputs``.

    Same arguments and return as :func:`saliency`; one forward + one backward pass."""
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        grads, _, output = input_gradients(model, x, target, keep_output=return_output)
    return with_output(grads * x.detach(), output, return_output)


@friendly_arguments
def smoothgrad(
    model: nn.Module,
    inputs: Tensor,
    target,
    samples: int = 50,
    noise: float = 0.15,
    batch_size: int = DEFAULT_BATCH_SIZE,
    squared: bool = False,
    abs: bool = True,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_output: bool = False,
):
    """SmoothGrad (Smilkov et al. 2017): saliency averaged over noisy copies of each image.

    Each image ``x`` gets ``samples`` copies ``x + N(0, sigma^2)`` with
    ``sigma = noise * (x.max() - x.min())`` (the paper's noise level, per image). The
    result is the mean over copies of ``|g|`` (``abs=True``, Captum's
    ``NoiseTunnel(Saliency)`` default), of ``g`` (``abs=False``, the paper's), or of
    ``g**2`` (``squared=True``, Captum's ``smoothgrad_sq``).

    Args:
        samples: noisy copies per image (>= 1).
        noise: noise standard deviation as a fraction of each image's value range (>= 0).
        batch_size: noisy images per forward/backward pass; bounds memory.
        seed / generator: make the noise reproducible (``generator`` on the inputs'
            device; default: torch's global generator). Noise is drawn one noisy image
            at a time, image-major (all copies of image 0 first), as
            ``torch.randn(C, H, W)``, so it does not depend on ``batch_size``.
        return_output: also return the model's output on the clean inputs (the same
            forward pass that fixes ``target="predicted"``).

    Returns:
        ``Tensor[N, C, H, W]`` on the inputs' device (with ``return_output``,
        ``(attributions, output)``). Model in eval mode for the call.
    """
    check_positive_int(samples, "samples")
    check_positive_int(batch_size, "batch_size")
    noise = check_number(noise, "noise")
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        target, output = clean_output(model, x, target, return_output)
        if seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        elif generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"generator must be on the inputs' device {x.device}, got {generator.device}")
        sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))

        def noisy(image: Tensor, copy: Tensor) -> Tensor:
            draws = torch.empty((len(image),) + x.shape[1:], dtype=x.dtype, device=x.device)
            for row in draws:
                row.normal_(generator=generator)
            return x[image] + draws * sigma[image, None, None, None]

        def statistic(grads: Tensor, copy: Tensor) -> Tensor:
            return grads.square() if squared else grads.abs() if abs else grads

        total = accumulate_gradients(model, x, target, samples, batch_size, noisy, statistic)
    return with_output(total / samples, output, return_output)


def _gauss_legendre(steps: int, like: Tensor):
    """Nodes (alphas) and weights of the ``steps``-point Gauss–Legendre rule on [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.as_tensor(0.5 * (nodes + 1), dtype=like.dtype, device=like.device)
    return alphas, torch.as_tensor(0.5 * weights, dtype=like.dtype, device=like.device)


@friendly_arguments
def integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target,
    baseline: Union[None, float, Tensor] = None,
    steps: int = 50,
    batch_size: int = DEFAULT_BATCH_SIZE,
    return_output: bool = False,
):
    """Integrated gradients (Sundararajan et al. 2017), as Captum's ``IntegratedGradients``.

    ``(x - b) * integral_0^1 grad f(b + a (x - b)) da``, the integral by the
    ``steps``-point Gauss–Legendre rule (Captum's default ``gausslegendre``). The
    attributions of each image sum to ``f(x) - f(b)`` up to the quadrature error
    (within 1% at 256 steps for ReLU networks).

    Args:
        baseline: ``None`` (zeros), a number, or a tensor broadcastable to the inputs
            (e.g. ``[C, H, W]`` or ``[N, C, H, W]``).
        steps: quadrature points (>= 1).
        batch_size: interpolated images per forward/backward pass; bounds memory.
        return_output: also return the model's output on the clean inputs (the same
            forward pass that fixes ``target="predicted"``).

    Returns:
        ``Tensor[N, C, H, W]`` on the inputs' device (with ``return_output``,
        ``(attributions, output)``). Model in eval mode for the call.
    """
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        base = torch.broadcast_to(check_baseline(0.0 if baseline is None else baseline, x), x.shape)
        target, output = clean_output(model, x, target, return_output)
        path = x - base
        alphas, weights = _gauss_legendre(steps, x)

        def interpolated(image: Tensor, step: Tensor) -> Tensor:
            return base[image] + alphas[step, None, None, None] * path[image]

        def weighted(grads: Tensor, step: Tensor) -> Tensor:
            return grads * weights[step, None, None, None]

        total = accumulate_gradients(model, x, target, steps, batch_size, interpolated, weighted)
    return with_output(total * path, output, return_output)
