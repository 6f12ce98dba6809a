"""cnnviz_fast: fast methods for visualizing and understanding CNNs."""
from . import pictures, zoo
from .core import Neuron, Normalize, model_guard
from .pictures import heatmap_overlay, image_grid, save_png, to_pil

__version__ = "0.1.0"
