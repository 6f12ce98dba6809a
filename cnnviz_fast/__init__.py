"""cnnviz_fast: fast methods for visualizing and understanding CNNs."""
from . import ops
from .core import Neuron, model_guard

__version__ = "0.1.0"
