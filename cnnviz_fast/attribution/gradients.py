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
from ..core.validation import check_int, check_baseline, check_number, check_positive_int
from ..core import autograd_on
from ..core.deferred import deferred_checks
from ._backprop import accumulate_gradients, clean_output, input_gradients, prepare_inputs, with_output

__all__ = ["gradient_shap", "gradient_x_input", "integrated_gradients", "saliency", "smoothgrad", "smoothgrad_sq",
           "vargrad"]

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
    with model_guard(model), autograd_on(), deferred_checks():
        x = prepare_inputs(inputs, target, model=model)
        grads, _, output = input_gradients(model, x, target, keep_output=return_output)
    return with_output(grads.abs() if abs else grads, output, return_output)


@friendly_arguments
def gradient_x_input(model: nn.Module, inputs: Tensor, target, return_output: bool = False):
    """Gradient × input, signed (Captum's ``InputXGradient``): ``inputs * d score / d inputs``.

    Same arguments and return as :func:`saliency`; one forward + one backward pass."""
    with model_guard(model), autograd_on(), deferred_checks():
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
    ``g**2`` (``squared=True``, Captum's ``smoothgrad_sq``; also :func:`smoothgrad_sq`).

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
    statistic = "squared" if squared else "mean"
    return _noise_tunnel(model, inputs, target, samples, noise, batch_size, statistic, abs, seed, generator,
                         return_output)


@friendly_arguments
def smoothgrad_sq(
    model: nn.Module,
    inputs: Tensor,
    target,
    samples: int = 50,
    noise: float = 0.15,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_output: bool = False,
):
    """SmoothGrad²: the mean of ``g**2`` over noisy copies (Captum's ``NoiseTunnel``
    ``nt_type="smoothgrad_sq"``); :func:`smoothgrad` with ``squared=True``, same noise."""
    return _noise_tunnel(model, inputs, target, samples, noise, batch_size, "squared", True, seed, generator,
                         return_output)


@friendly_arguments
def vargrad(
    model: nn.Module,
    inputs: Tensor,
    target,
    samples: int = 50,
    noise: float = 0.15,
    batch_size: int = DEFAULT_BATCH_SIZE,
    abs: bool = True,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_output: bool = False,
):
    """VarGrad (Adebayo et al. 2018): the variance over noisy copies of ``|g|``
    (``abs=True``, Captum's ``NoiseTunnel(Saliency)`` with ``nt_type="vargrad"``) or of
    the signed gradient ``g`` (``abs=False``, the paper's), ``E[a^2] - E[a]^2`` over the
    ``samples`` copies (population variance, as Captum). Same noise, arguments and
    result shape as :func:`smoothgrad`; one pass over the noisy copies gives both moments.
    """
    return _noise_tunnel(model, inputs, target, samples, noise, batch_size, "var", abs, seed, generator,
                         return_output)


def _generator(seed: Optional[int], generator: Optional[torch.Generator], like: Tensor):
    """The generator the noise comes from: a new one from ``seed``, the given one (on the
    inputs' device), or None (torch's global generator)."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        return torch.Generator(device=like.device).manual_seed(check_int(seed, "seed", minimum=0))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != like.device.type:
        raise ValueError(f"generator must be on the inputs' device {like.device}, got {generator.device}")
    return generator


def _normal_rows(shape, like: Tensor, generator) -> Tensor:
    """``Tensor[rows, C, H, W]`` of N(0, 1), drawn one row at a time (so the values of a row
    do not depend on how many rows a batch holds)."""
    draws = torch.empty(shape, dtype=like.dtype, device=like.device)
    for row in draws:
        row.normal_(generator=generator)
    return draws


def _noise_tunnel(model, inputs, target, samples, noise, batch_size, statistic: str, abs: bool, seed, generator,
                  return_output: bool):
    """SmoothGrad's noisy copies, reduced by ``statistic``: "mean" (of ``|g|`` or ``g``),
    "squared" (mean of ``g**2``) or "var" (variance of ``|g|`` or ``g``)."""
    check_positive_int(samples, "samples")
    check_positive_int(batch_size, "batch_size")
    noise = check_number(noise, "noise")
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        generator = _generator(seed, generator, x)
        target, output = clean_output(model, x, target, return_output)
        sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))

        def noisy(image: Tensor, copy: Tensor) -> Tensor:
            return x[image] + _normal_rows((len(image),) + x.shape[1:], x, generator) * sigma[image, None, None, None]

        def reduce(grads: Tensor, copy: Tensor) -> Tensor:
            if statistic == "squared":
                return grads.square()
            value = grads.abs() if abs else grads
            # both moments from the same pass: [rows, 2, C, H, W]
            return torch.stack((value, value.square()), 1) if statistic == "var" else value

        total = accumulate_gradients(model, x, target, samples, batch_size, noisy, reduce) / samples
        if statistic == "var":
            # E[a^2] - E[a]^2 as Captum; rounding can leave it a hair below zero
            total = (total[:, 1] - total[:, 0].square()).clamp_min_(0)
    return with_output(total, output, return_output)


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


def baseline_batch(baseline, inputs: Tensor) -> Tensor:
    """The baselines of the Shapley-value methods, ``Tensor[B, C, H, W]``: a number (one
    constant image), one image ``[C, H, W]`` / ``[1, C, H, W]``, or a batch of ``B``
    reference images (a distribution to sample from, not one per input) whose shape
    ``[B, 1 or C, 1 or H, 1 or W]`` broadcasts to one input image."""
    if isinstance(baseline, Tensor) and baseline.dim() == 4 and baseline.shape[0] != 1:
        rows = [check_baseline(row, inputs[:1]) for row in baseline]  # each one image
        return torch.cat([row.expand((1,) + inputs.shape[1:]) for row in rows])
    return check_baseline(0.0 if baseline is None else baseline, inputs[:1]).expand((1,) + inputs.shape[1:])


@friendly_arguments
def gradient_shap(
    model: nn.Module,
    inputs: Tensor,
    target,
    baseline: Union[None, float, Tensor] = None,
    samples: int = 5,
    noise: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_output: bool = False,
):
    """GradientSHAP (Lundberg & Lee 2017), as Captum's ``GradientShap``: expected
    gradients on random points between each input and random baselines.

    For each image ``x`` and each of ``samples`` draws: a baseline ``b`` picked uniformly
    from ``baseline``, ``x' = x + N(0, sigma^2)`` with ``sigma = noise * (x.max() -
    x.min())``, ``a ~ U[0, 1)``; the draw contributes ``(x' - b) * grad f(a x' + (1 - a) b)``.
    The result is the mean over draws; its sum approximates ``f(x) - E[f(b)]``.

    Args:
        baseline: ``None`` (zeros), a number, an image ``[C, H, W]``, or a batch of
            reference images ``[B, C, H, W]`` to draw from (Captum's ``baselines``).
        samples: draws per image (Captum's ``n_samples``, >= 1).
        noise: input noise std as a fraction of each image's value range (default 0,
            as Captum's ``stdevs=0``).
        batch_size: points per forward/backward pass; bounds memory.
        seed / generator: make the draws reproducible (default: torch's global
            generator). Drawn in this order: the baseline index of every draw
            (``torch.randint(B, (N * samples,))``, image-major), then every ``a``
            (``torch.rand(N * samples)``), then, when ``noise > 0``, the noise one draw
            at a time as ``randn(C, H, W)`` (image-major), so nothing depends on ``batch_size``.
        return_output: also return the model's output on the clean inputs.

    Returns:
        ``Tensor[N, C, H, W]`` (signed) on the inputs' device (with ``return_output``,
        ``(attributions, output)``). Model in eval mode for the call.
    """
    check_positive_int(samples, "samples")
    check_positive_int(batch_size, "batch_size")
    noise = check_number(noise, "noise")
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        bases = baseline_batch(baseline, x)
        generator = _generator(seed, generator, x)
        target, output = clean_output(model, x, target, return_output)
        draws = x.shape[0] * samples
        picks = torch.randint(len(bases), (draws,), generator=generator, device=x.device)
        alphas = torch.rand(draws, generator=generator, dtype=x.dtype, device=x.device)
        sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
        differences = {}  # (x' - b) of the batch being differentiated, for its combine

        def point(image: Tensor, copy: Tensor) -> Tensor:
            rows = image * samples + copy
            noisy = x[image]
            if noise > 0:
                noisy = noisy + _normal_rows((len(image),) + x.shape[1:], x, generator) * sigma[image, None, None, None]
            base, alpha = bases[picks[rows]], alphas[rows, None, None, None]
            differences["batch"] = noisy - base
            return alpha * noisy + (1 - alpha) * base

        def attribution(grads: Tensor, copy: Tensor) -> Tensor:
            return differences.pop("batch") * grads

        total = accumulate_gradients(model, x, target, samples, batch_size, point, attribution)
    return with_output(total / samples, output, return_output)
