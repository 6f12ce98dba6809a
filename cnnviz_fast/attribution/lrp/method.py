"""``lrp``: layer-wise relevance propagation in one forward + one backward pass."""
from __future__ import annotations

from dataclasses import replace
from typing import Tuple, Union

import torch
from torch import Tensor, nn

from ...core import autograd_on, model_guard
from ...core.arguments import friendly_arguments
from ...core.validation import check_choice
from .._backprop import check_interceptable, input_gradients, prepare_inputs, with_output
from .composites import Composite, needs_bounds, resolve_composite
from .interception import NONLINEAR_OPTIONS, relevance_rules
from .rules import DEFAULT_STABILIZER, ZBox

__all__ = ["lrp"]

Bound = Union[None, float, Tensor]


@friendly_arguments
def lrp(
    model: nn.Module,
    inputs: Tensor,
    target,
    composite: Union[str, Composite] = "epsilon_plus_flat",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    stabilizer: float = DEFAULT_STABILIZER,
    low: Bound = None,
    high: Bound = None,
    normalize=None,
    nonlinear: str = "raise",
    return_output: bool = False,
):
    """Layer-wise relevance propagation (Bach et al. 2015) with Zennit's composites.

    The relevance of the target score (the one-hot of the target at the output, as Zennit's
    ``attr_output``) is propagated to the inputs layer by layer: convolutions and linear
    layers by their composite's rule (see :mod:`~cnnviz_fast.attribution.lrp.composites`
    and :mod:`~cnnviz_fast.attribution.lrp.rules`), rectifiers pass it unchanged, batch
    norms are merged into the layer before them, residual sums and average pools split it in
    proportion to their inputs. Every ReLU spelling is covered (module, functional, Tensor
    method, in place; ReLU6, Hardtanh(0, t), clamp(min=0)). Canonization happens on the calls
    of the forward pass, so the model is never modified (nothing to restore, even when the
    call raises). A ``torch.compile``'d model is explained through its eager original.

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron`, a callable
            ``output -> Tensor[N]`` or ``"predicted"``.
        composite: ``"epsilon_plus_flat"`` (default), ``"epsilon_gamma_box"``,
            ``"epsilon_alpha2_beta1"``, ``"epsilon_plus"``, ``"epsilon_alpha2_beta1_flat"``,
            or a :class:`~cnnviz_fast.attribution.lrp.Composite` of your own rules.
        epsilon: ε of the epsilon rule (fully connected layers).
        gamma: γ of the gamma rule.
        stabilizer: the small ε every other rule adds to its denominators (Zennit's).
        low, high: bounds of the inputs for the z^B rule (``epsilon_gamma_box``'s input
            layer): numbers or tensors broadcastable to ``inputs`` (e.g. ``[1, C, 1, 1]``).
            Default: ``normalize.pixel_range`` when ``normalize`` is given (the model inputs
            that pixels 0 and 1 map to), else each image's per-channel minimum and maximum.
        normalize: a :class:`~cnnviz_fast.core.preprocess.Normalize` whose pixel range gives
            ``low`` / ``high``.
        nonlinear: what a non-rectifying activation (SiLU, GELU, ELU, LeakyReLU...) does:
            ``"raise"`` (default, a ``ValueError`` naming it), ``"pass"`` (relevance passes
            through it unchanged, Zennit's ``Pass`` rule) or ``"gradient"`` (relevance times
            the activation's derivative, its plain gradient).
        return_output: also return the model's output from the same forward pass.

    Returns:
        ``Tensor[N, C, H, W]`` relevance (signed; an image's relevance sums to about 1, the
        target's output relevance, less what biases and stabilizers absorb) on the inputs'
        device; with ``return_output``, ``(relevance, output)``. Equals Zennit's
        ``Gradient`` attributor with the same composite and its ``ResNetCanonizer`` /
        ``SequentialMergeBatchNorm`` canonizers on ReLU networks (to ~1e-5 where batch
        norms are merged: Zennit's merged batch norm keeps computing ``x / sqrt(1 + eps)``,
        ours keeps the model's own forward values).

    Raises:
        ValueError: an unknown composite or rule; a network the composite cannot canonize
            (a batch norm not right after a convolution / linear layer, layer / group
            norm); an activation that is not a rectifier (unless ``nonlinear`` allows it); a
            layer LRP has no rule for (``matmul`` on activations, transposed convolution).
    """
    check_choice(nonlinear, NONLINEAR_OPTIONS, "nonlinear")
    check_interceptable(model, "LRP")
    # a torch.compile'd module runs its eager original: the rules replace calls of the forward
    # pass with autograd Functions that keep state for the backward, which dynamo cannot trace
    model = model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model
    with model_guard(model), autograd_on():
        x = prepare_inputs(inputs, target, model=model)
        bounds = _bounds(low, high, normalize, x) if needs_bounds(composite) else (None, None)
        rules = _checked_bounds(resolve_composite(composite, epsilon, gamma, stabilizer, *bounds), x)
        with relevance_rules(model, rules, nonlinear):
            relevance, _, output = input_gradients(model, x, target, keep_output=return_output)
    return with_output(relevance, output, return_output)


def _bound(value, argument: str, x: Tensor) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"{argument} must be a number or a Tensor broadcastable to the inputs {tuple(x.shape)}, "
                         f"got {type(value).__name__}")
    bound = torch.as_tensor(value).to(device=x.device, dtype=x.dtype)
    try:
        fits = bound.dim() <= 4 and torch.broadcast_shapes(bound.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{argument} must be broadcastable to the inputs {tuple(x.shape)}, got shape "
                         f"{tuple(bound.shape)}")
    if not bool(torch.isfinite(bound).all()):
        raise ValueError(f"{argument} contains NaN or infinite values")
    return bound.reshape((1,) * (4 - bound.dim()) + tuple(bound.shape))


def _bounds(low: Bound, high: Bound, normalize, x: Tensor) -> Tuple[Tensor, Tensor]:
    """The z^B bounds ``[1 or N, 1 or C, 1 or H, 1 or W]``: given, from ``normalize``, or each
    image's per-channel range."""
    if normalize is not None and (low is None or high is None):
        if not hasattr(normalize, "pixel_range"):
            raise ValueError(f"normalize must be a cnnviz_fast Normalize (with pixel_range), got "
                             f"{type(normalize).__name__}")
        pixel_low, pixel_high = normalize.pixel_range(x)
        low = pixel_low if low is None else low
        high = pixel_high if high is None else high
    low = x.amin(dim=(2, 3), keepdim=True) if low is None else _bound(low, "low", x)
    high = x.amax(dim=(2, 3), keepdim=True) if high is None else _bound(high, "high", x)
    if bool((low > high).any()):
        raise ValueError("low, high: low must not exceed high")
    return low, high


def _checked_bounds(composite: Composite, x: Tensor) -> Composite:
    """Bounds of z^B rules given in the composite itself, checked like ``low`` / ``high``."""
    def check(rule):
        if not isinstance(rule, ZBox):
            return rule
        if rule.low is None or rule.high is None:
            raise ValueError("composite: a zbox rule needs low and high")
        low, high = _bound(rule.low, "low", x), _bound(rule.high, "high", x)
        if bool((low > high).any()):
            raise ValueError("low, high: low must not exceed high")
        return replace(rule, low=low, high=high)
    return replace(composite, conv=check(composite.conv), linear=check(composite.linear),
                   first=None if composite.first is None else check(composite.first))
