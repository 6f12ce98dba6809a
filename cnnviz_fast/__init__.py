"""cnnviz_fast: fast methods for visualizing and understanding CNNs."""
from . import pictures, zoo
from .attribution import *  # noqa: F401,F403  (each suite's __all__ is the public API)
from .core import Neuron, Normalize, model_guard
from .explainer import Explainer, Explanation
from .features import *  # noqa: F401,F403
from .pictures import heatmap_overlay, image_grid, save_png, to_pil
from .synthesis import *  # noqa: F401,F403

__version__ = "0.1.0"
