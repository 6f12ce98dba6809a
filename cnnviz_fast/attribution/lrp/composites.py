"""Composites: which rule each layer of a network gets (Zennit's layer-to-rule assignment).

Every composite gives convolutions one rule and fully connected layers another; some give
the input layer (the first convolution or linear layer the forward pass runs) a rule of
its own. In all of them ReLUs and batch norms pass relevance unchanged (batch norms are
merged into the layer before them), and sums of two activations (residual additions) and
average pools split relevance in proportion to their inputs' contributions (Zennit's
``Norm``):

=============================  ===============  ==============  =====================================
composite                      convolutions     linear layers   input layer
=============================  ===============  ==============  =====================================
``epsilon_plus_flat``          z⁺               ε               flat (first conv or linear)
``epsilon_gamma_box``          γ                ε               z^B (first conv)
``epsilon_alpha2_beta1``       α=2, β=1         ε               —
``epsilon_plus``               z⁺               ε               —
``epsilon_alpha2_beta1_flat``  α=2, β=1         ε               flat (first conv or linear)
=============================  ===============  ==============  =====================================
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

from ...core.validation import check_number
from .rules import DEFAULT_STABILIZER, AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus

__all__ = ["COMPOSITES", "RULES", "Composite", "make_rule", "resolve_composite"]

RULES = ("epsilon", "zplus", "alpha_beta", "gamma", "flat", "wsquare", "zbox")
LAYER_KINDS = ("conv", "linear")

RuleSpec = Union[str, Rule]


@dataclass(frozen=True)
class Composite:
    """A layer-to-rule assignment. Rules are :mod:`~cnnviz_fast.attribution.lrp.rules`
    objects or names from :data:`RULES` (then built with the ``epsilon`` / ``gamma`` /
    ``stabilizer`` / bounds of the :func:`lrp` call; ``alpha_beta`` is α=2, β=1).

    Args:
        conv: rule of every convolution.
        linear: rule of every fully connected layer.
        first: rule of the input layer (None: it keeps its kind's rule).
        first_kinds: which layers can be the input layer: ``("conv", "linear")`` (the first
            of either runs ``first``) or ``("conv",)`` (the first convolution).
        stabilizer: ε of the proportional split at sums and average pools.
    """

    conv: RuleSpec
    linear: RuleSpec = "epsilon"
    first: Optional[RuleSpec] = None
    first_kinds: Tuple[str, ...] = LAYER_KINDS
    stabilizer: float = DEFAULT_STABILIZER

    def rule(self, kind: str, first: bool) -> Rule:
        """The rule of a layer of ``kind`` ("conv" / "linear"); ``first``: it is the first
        layer of a kind in :attr:`first_kinds` that the forward pass runs."""
        if first and self.first is not None:
            return self.first
        return self.conv if kind == "conv" else self.linear


_NAMED = {
    "epsilon_plus_flat": dict(conv="zplus", linear="epsilon", first="flat"),
    "epsilon_gamma_box": dict(conv="gamma", linear="epsilon", first="zbox", first_kinds=("conv",)),
    "epsilon_alpha2_beta1": dict(conv="alpha_beta", linear="epsilon"),
    "epsilon_plus": dict(conv="zplus", linear="epsilon"),
    "epsilon_alpha2_beta1_flat": dict(conv="alpha_beta", linear="epsilon", first="flat"),
}
COMPOSITES = tuple(_NAMED)


def make_rule(spec: RuleSpec, argument: str, epsilon: float, gamma: float, stabilizer: float,
              low=None, high=None) -> Rule:
    """A rule object from a name (with these settings) or a rule object (a ZBox without
    bounds gets ``low`` / ``high``)."""
    if isinstance(spec, ZBox):
        if spec.low is None or spec.high is None:
            return replace(spec, low=spec.low if spec.low is not None else low,
                           high=spec.high if spec.high is not None else high)
        return spec
    if isinstance(spec, Rule):
        return spec
    if not isinstance(spec, str) or spec not in RULES:
        raise ValueError(f"{argument}: unknown rule {spec!r}; rules: {', '.join(RULES)} (or a rule object from "
                         "cnnviz_fast.attribution.lrp.rules)")
    if spec == "epsilon":
        return Epsilon(epsilon)
    if spec == "zplus":
        return ZPlus(stabilizer)
    if spec == "alpha_beta":
        return AlphaBeta(2.0, 1.0, stabilizer)
    if spec == "gamma":
        return Gamma(gamma, stabilizer)
    if spec == "flat":
        return Flat(stabilizer)
    if spec == "wsquare":
        return WSquare(stabilizer)
    return ZBox(low, high, stabilizer)


def resolve_composite(composite, epsilon: float, gamma: float, stabilizer: float, low=None, high=None) -> Composite:
    """``composite`` (a name from :data:`COMPOSITES` or a :class:`Composite`) with every rule
    built; a ``zbox`` rule gets the bounds ``low`` / ``high`` (tensors, resolved by the caller)."""
    epsilon, gamma = check_number(epsilon, "epsilon"), check_number(gamma, "gamma")
    stabilizer = check_number(stabilizer, "stabilizer")
    if isinstance(composite, str):
        if composite not in _NAMED:
            raise ValueError(f"composite: unknown composite {composite!r}; composites: {', '.join(COMPOSITES)} "
                             "(or a cnnviz_fast.attribution.lrp.Composite)")
        composite = Composite(stabilizer=stabilizer, **_NAMED[composite])
    elif not isinstance(composite, Composite):
        raise ValueError(f"composite must be a name ({', '.join(COMPOSITES)}) or a Composite, "
                         f"got {type(composite).__name__}")
    kinds = composite.first_kinds
    if not kinds or not set(kinds) <= set(LAYER_KINDS):
        raise ValueError(f"composite.first_kinds must be a non-empty subset of {LAYER_KINDS}, got {kinds!r}")
    check_number(composite.stabilizer, "composite.stabilizer")
    settings = dict(epsilon=epsilon, gamma=gamma, stabilizer=stabilizer, low=low, high=high)
    return replace(
        composite,
        conv=make_rule(composite.conv, "composite.conv", **settings),
        linear=make_rule(composite.linear, "composite.linear", **settings),
        first=None if composite.first is None else make_rule(composite.first, "composite.first", **settings),
    )


def needs_bounds(composite) -> bool:
    """Whether ``composite`` (a name or a Composite, before :func:`resolve_composite`) has a
    z^B rule whose bounds the call must supply."""
    if isinstance(composite, str):
        return _NAMED.get(composite, {}).get("first") == "zbox"
    if not isinstance(composite, Composite):
        return False
    specs = (composite.conv, composite.linear, composite.first)
    return any(s == "zbox" or (isinstance(s, ZBox) and (s.low is None or s.high is None)) for s in specs)
