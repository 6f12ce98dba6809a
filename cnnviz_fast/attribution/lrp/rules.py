"""LRP rules for linear layers (convolutions and fully connected layers).

A rule maps the relevance ``R`` at a layer's output ``Tensor[N, C_out, ...]`` to the
relevance at its input ``x``: ``z`` is the layer evaluated with modified parameters (and
inputs), ``s = R / stab(z)`` and the result is ``x ⊙ Wᵀ s`` summed over the modified terms
(Bach et al. 2015; Montavon et al. 2017, 2019). ``stab(z) = z + eps * sign(z)`` with
``sign(0) = +1``, as in Zennit. ``W+ = max(W, 0)``, ``W- = min(W, 0)``, likewise for
inputs and biases. Negative inputs get the generalised terms Zennit uses (``x-`` paired with
the opposite weights); a layer whose input has no negative entry (after a ReLU) skips them,
which changes nothing but the cost.

The rules, by name (as in Zennit, whose values they reproduce):

- ``epsilon`` — ``z = W x + b``: the layer's own output, read from the forward pass.
- ``zplus`` — ``z = W+ x+ + W- x- + b+``.
- ``alpha_beta`` — ``alpha * R+ - beta * R-`` with the positive / negative parts of ``z``
  (``alpha - beta = 1``).
- ``gamma`` — ``W + gamma W+`` for units with a positive output, ``W + gamma W-`` for units
  with a negative one.
- ``flat`` — all weights 1, inputs 1, no bias: relevance spread uniformly over each
  receptive field.
- ``wsquare`` — weights ``W²`` (bias ``b²``), inputs 1.
- ``zbox`` — ``z = W x - W+ l - W- h`` for inputs bounded by ``l <= x <= h`` (the input layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ...core.validation import check_number
from .layers import LinearCall

__all__ = ["AlphaBeta", "Epsilon", "Flat", "Gamma", "Rule", "WSquare", "ZBox", "ZPlus", "stabilize"]

DEFAULT_STABILIZER = 1e-6


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + epsilon * sign(z)``, ``sign(0) = +1``: a denominator that is never 0.

    Computed as ``z + copysign(epsilon, z)`` (two passes instead of four), which differs only
    at ``z = -0.0`` (``-epsilon``). That never changes a relevance: a ``-0.0`` sum has only
    zero terms, so the numerators it divides are zero."""
    return torch.copysign(torch.tensor(epsilon, dtype=z.dtype, device=z.device), z).add_(z)


def _relevance_over(relevance: Tensor, z: Tensor, epsilon: Optional[float]) -> Tensor:
    """``relevance / stab(z)``, written into ``z`` (a temporary of the rule). ``epsilon``
    None: ``z`` already holds ``z + eps`` (a denominator that is never negative, whose
    stabilizer went into the bias of the convolution that computed it)."""
    denominator = z if epsilon is None else stabilize(z, epsilon)
    if denominator.shape == relevance.shape:
        return torch.div(relevance, denominator, out=denominator)
    return relevance / denominator


def _plus(bias: Optional[Tensor], epsilon: float, like: Tensor) -> Tensor:
    """``bias + epsilon`` (``epsilon`` alone without a bias) for a layer whose output is
    never negative: ``stab(z) = z + epsilon`` there (``sign(0) = +1``), and the layer adds
    its bias anyway, so the stabilizer costs nothing (one rounding of ``z + eps`` away from
    adding it after the layer)."""
    if bias is None:
        return torch.full((like.shape[0],), epsilon, dtype=like.dtype, device=like.device)
    return bias + epsilon


def _positive(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clamp(min=0)


def _negative(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clamp(max=0)


def _split(x: Tensor, nonnegative: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``(x+, x-)``, ``x-`` None when ``x`` has no negative entry (the usual case after a
    ReLU, which the relevance pass tells the layer (``nonnegative``): its terms are exact
    zeros, so they are skipped)."""
    if nonnegative or bool(x.amin() >= 0):
        return x, None
    return x.clamp(min=0), x.clamp(max=0)


class Rule:
    """Base class: ``relevance(layer, x, R, kept)`` → relevance at ``x``; ``keep(output)``
    stores what the rule needs of the layer's output from the forward pass (None: nothing;
    the output itself is modified in place by the next ReLU, so a copy or a derived tensor
    is kept)."""

    name = "rule"

    def keep(self, output: Tensor) -> Optional[Tensor]:
        return None

    def relevance(self, layer: LinearCall, x: Tensor, relevance: Tensor, kept) -> Tensor:
        raise NotImplementedError


def _stabilizer(value, argument: str) -> float:
    return check_number(value, argument)


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-ε: ``R_in = x ⊙ Wᵀ (R / stab(W x + b))``; ``epsilon=0`` is LRP-0."""

    epsilon: float = 1e-6
    name = "epsilon"

    def __post_init__(self):
        _stabilizer(self.epsilon, "epsilon")

    def keep(self, output):
        return stabilize(output, self.epsilon)

    def relevance(self, layer, x, relevance, kept):
        return layer.transpose(relevance / kept, x, layer.weight).mul_(x)


@dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z⁺ (αβ with α=1, β=0): only positive contributions ``W+ x+ + W- x- + b+``."""

    stabilizer: float = DEFAULT_STABILIZER
    name = "zplus"

    def __post_init__(self):
        _stabilizer(self.stabilizer, "stabilizer")

    def relevance(self, layer, x, relevance, kept):
        weight, bias = layer.weight, layer.bias
        xp, xn = _split(x, layer.nonnegative_input)
        wp = weight.clamp(min=0)
        # z = W+ x+ + W- x- + b+ >= 0: every term is, so stab(z) = z + stabilizer
        z = layer.forward(xp, wp, _plus(_positive(bias), self.stabilizer, wp))
        if xn is not None:
            wn = weight.clamp(max=0)
            z = z + layer.forward(xn, wn, None)
        s = _relevance_over(relevance, z, None)
        result = layer.transpose(s, x, wp).mul_(xp)
        if xn is not None:
            result = result + xn * layer.transpose(s, x, wn)
        return result


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-αβ: ``alpha`` times the relevance of the positive contributions minus ``beta``
    times that of the negative ones; ``alpha - beta`` must be 1 (both >= 0)."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = DEFAULT_STABILIZER
    name = "alpha_beta"

    def __post_init__(self):
        check_number(self.alpha, "alpha")
        check_number(self.beta, "beta")
        _stabilizer(self.stabilizer, "stabilizer")
        if self.alpha - self.beta != 1:
            raise ValueError(f"alpha, beta: alpha - beta must be 1 (relevance is conserved), got alpha={self.alpha}, "
                             f"beta={self.beta}")

    def relevance(self, layer, x, relevance, kept):
        weight, bias = layer.weight, layer.bias
        xp, xn = _split(x, layer.nonnegative_input)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        zp = layer.forward(xp, wp, _plus(_positive(bias), self.stabilizer, wp))  # >= 0, as z+ of ZPlus
        zn = layer.forward(xp, wn, _negative(bias))
        if xn is not None:
            zp = zp + layer.forward(xn, wn, None)
            zn = zn + layer.forward(xn, wp, None)
        sp = _relevance_over(relevance, zp, None)
        sn = _relevance_over(relevance, zn, self.stabilizer)
        positive = layer.transpose(sp, x, wp).mul_(xp)
        negative = layer.transpose(sn, x, wn).mul_(xp)
        if xn is not None:
            positive = positive + xn * layer.transpose(sp, x, wn)
            negative = negative + xn * layer.transpose(sn, x, wp)
        return self.alpha * positive - self.beta * negative


@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-γ (generalised to negative inputs and outputs, as Zennit): units with a positive
    output propagate through ``W + gamma W+`` (bias ``b + gamma b+``), units with a negative
    output through ``W + gamma W-``."""

    gamma: float = 0.25
    stabilizer: float = DEFAULT_STABILIZER
    name = "gamma"

    def __post_init__(self):
        check_number(self.gamma, "gamma")
        _stabilizer(self.stabilizer, "stabilizer")

    def keep(self, output):
        return output > 0, output < 0

    def relevance(self, layer, x, relevance, kept):
        positive_unit, negative_unit = kept
        weight, bias, gamma = layer.weight, layer.bias, self.gamma
        xp, xn = _split(x, layer.nonnegative_input)
        wp, wn = weight + gamma * weight.clamp(min=0), weight + gamma * weight.clamp(max=0)
        bp = None if bias is None else bias + gamma * bias.clamp(min=0)
        bn = None if bias is None else bias + gamma * bias.clamp(max=0)
        zp = layer.forward(xp, wp, bp)
        zn = layer.forward(xp, wn, bn)
        if xn is not None:
            zp = zp + layer.forward(xn, wn, None)
            zn = zn + layer.forward(xn, wp, None)
        sp = _relevance_over(positive_unit * relevance, zp, self.stabilizer)
        sn = _relevance_over(negative_unit * relevance, zn, self.stabilizer)
        if xn is None:
            return layer.transpose(sp, x, wp).mul_(xp) + layer.transpose(sn, x, wn).mul_(xp)
        return (xp * layer.transpose(sp, x, wp) + xn * layer.transpose(sp, x, wn)
                + xp * layer.transpose(sn, x, wn) + xn * layer.transpose(sn, x, wp))


@dataclass(frozen=True)
class Flat(Rule):
    """LRP-flat: every weight 1, every input 1, no bias (relevance spread uniformly over
    each output unit's receptive field)."""

    stabilizer: float = DEFAULT_STABILIZER
    name = "flat"

    def __post_init__(self):
        _stabilizer(self.stabilizer, "stabilizer")

    def relevance(self, layer, x, relevance, kept):
        ones = torch.ones_like(layer.weight)
        # receptive-field sizes (> 0), the same for every image
        z = layer.forward(torch.ones_like(x[:1]), ones, _plus(None, self.stabilizer, ones))
        return layer.transpose(_relevance_over(relevance, z, None), x, ones)


@dataclass(frozen=True)
class WSquare(Rule):
    """LRP-w²: weights ``W²`` (and bias ``b²``, as Zennit), inputs 1."""

    stabilizer: float = DEFAULT_STABILIZER
    name = "wsquare"

    def __post_init__(self):
        _stabilizer(self.stabilizer, "stabilizer")

    def relevance(self, layer, x, relevance, kept):
        squared = layer.weight ** 2
        bias = None if layer.bias is None else layer.bias ** 2
        z = layer.forward(torch.ones_like(x[:1]), squared, _plus(bias, self.stabilizer, squared))  # >= 0
        return layer.transpose(_relevance_over(relevance, z, None), x, squared)


Bound = Union[None, float, Tensor]


@dataclass(frozen=True)
class ZBox(Rule):
    """LRP-z^B for an input layer whose inputs lie in ``[low, high]`` (numbers, or tensors
    broadcastable to the inputs such as per-channel ``[1, C, 1, 1]``); ``None`` bounds are
    filled in by :func:`~cnnviz_fast.attribution.lrp.lrp` from its ``low`` / ``high`` /
    ``normalize`` arguments."""

    low: Bound = None
    high: Bound = None
    stabilizer: float = DEFAULT_STABILIZER
    name = "zbox"

    def __post_init__(self):
        _stabilizer(self.stabilizer, "stabilizer")

    def keep(self, output):
        return output.clone()

    def relevance(self, layer, x, relevance, kept):
        weight, bias = layer.weight, layer.bias
        low, high = self._bound(self.low, x), self._bound(self.high, x)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        z = kept - (layer.forward(low, wp, _positive(bias)) + layer.forward(high, wn, _negative(bias)))
        s = _relevance_over(relevance, z, self.stabilizer)
        bounded = low * layer.transpose(s, x, wp) + high * layer.transpose(s, x, wn)
        return layer.transpose(s, x, weight).mul_(x) - bounded

    @staticmethod
    def _bound(bound: Tensor, x: Tensor) -> Tensor:
        """``bound`` over the layer's input (batch kept: 1 or N), the layer run once per row."""
        try:
            return bound.to(x).expand(bound.shape[0], *x.shape[1:])
        except RuntimeError:
            raise ValueError(f"composite: the zbox rule's bounds {tuple(bound.shape)} do not fit its layer's input "
                             f"{tuple(x.shape)}; z^B is the rule of the input layer (bounds of the inputs)") from None
