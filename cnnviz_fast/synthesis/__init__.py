"""Images by gradient ascent: one optimisation engine (:func:`optimize`) over an image
parameterization with composable priors, and every synthesis method as an objective on it.

Methods (all take pixels in [0, 1] and a ``normalize`` mapping pixels to model inputs,
run the model in eval mode and leave it as it was):
:func:`visualize_class`, :func:`visualize_neuron`, :func:`adversarial`,
:func:`invert_features`, :func:`deep_dream`, :func:`synthesize_texture`,
:func:`style_transfer`; fast feed-forward style transfer: :func:`stylize` (one forward pass
of a :class:`StyleNetwork` trained by :func:`train_style_network`); texture synthesis without
a network: :func:`texture_quilt` (Efros & Freeman 2001), :func:`texture_efros_leung` (Efros &
Leung 1999; the measures of a texture, ``nearest_patch_distance`` and ``shuffled_tiles``,
are imported from :mod:`.nonparametric`).
"""
from .adversarial import AdversarialResult, adversarial
from .dream import deep_dream
from .engine import Objective, SynthesisResult, optimize
from .fast_style import StyleNetwork, StyleTraining, stylize, train_style_network
from .inversion import InversionResult, invert_features
from .nonparametric import texture_efros_leung, texture_quilt
from .parameterization import FourierImage, PixelImage  # noqa: F401
from .regularizers import (  # noqa: F401  (building blocks)
    AlphaNorm, Blur, ClipSmallContribution, ClipSmallNorm, Decay, Jitter, L2, RandomAffine,
    TotalVariation,
)
from .style import style_transfer, synthesize_texture
from .visualize import Prior, visualize_class, visualize_neuron

# The public API (re-exported by cnnviz_fast). The building blocks (parameterizations,
# penalties, step operations, transforms) are imported from cnnviz_fast.synthesis.
__all__ = [
    "AdversarialResult", "InversionResult", "Objective", "Prior", "SynthesisResult", "adversarial", "deep_dream",
    "invert_features", "optimize", "style_transfer", "synthesize_texture", "visualize_class",
    "visualize_neuron",
    # fast feed-forward style transfer
    "StyleNetwork", "StyleTraining", "stylize", "train_style_network",
    # texture synthesis without a network
    "texture_efros_leung", "texture_quilt",
]
