"""Layer-wise relevance propagation: :func:`lrp`, its rules and composites (Zennit's).

    relevance = lrp(model, x, target)                                   # EpsilonPlusFlat
    relevance = lrp(model, x, target, "epsilon_gamma_box", normalize=IMAGENET_NORMALIZE)
    relevance = lrp(model, x, target, Composite(conv=Gamma(0.5), linear="epsilon", first="wsquare"))
"""
from .composites import COMPOSITES, RULES, Composite
from .method import lrp
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus

__all__ = ["AlphaBeta", "COMPOSITES", "Composite", "Epsilon", "Flat", "Gamma", "RULES", "Rule", "WSquare", "ZBox",
           "ZPlus", "lrp"]
