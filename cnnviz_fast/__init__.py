"""cnnviz_fast: fast methods for visualizing and understanding CNNs.

Every method is declared once in :mod:`cnnviz_fast.registry`; the functions below are the
public API (``__all__``), with the same arguments in every method: ``model``, the data,
``layer`` where the method has one (a dotted name or the module), ``target``, options.
"""
from . import attribution, features, loading, metrics, pictures, registry, synthesis, zoo
from .attribution import *  # noqa: F401,F403  (each suite's __all__ is the public API)
from .core import Neuron, Normalize, model_guard
from .explainer import Explainer, Explanation
from .features import *  # noqa: F401,F403
from .loading import load_images, load_model
from .pictures import heatmap_overlay, image_grid, save_png, to_pil
from .registry import get_method, method_names
from .synthesis import *  # noqa: F401,F403

from .version import __version__

__all__ = sorted({
    *attribution.__all__, *features.__all__, *synthesis.__all__,
    "Explainer", "Explanation", "Neuron", "Normalize", "model_guard", "load_images", "load_model",
    "heatmap_overlay", "image_grid", "save_png", "to_pil", "get_method", "method_names",
    "attribution", "features", "loading", "metrics", "pictures", "registry", "synthesis", "zoo",
})
