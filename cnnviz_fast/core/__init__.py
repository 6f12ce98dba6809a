"""Mechanisms shared by every method: layer lookup and capture, target selection,
model-state protection, input checks and preprocessing."""
from .grad_mode import autograd_on
from .layers import capture_layers, forward_to_layers, get_layer, layer_names
from .model_state import model_guard
from .preprocess import Normalize
from .targets import Neuron, expand_target, target_layer, target_scores
from .validation import check_images

__all__ = [
    "Neuron", "autograd_on", "Normalize", "capture_layers", "check_images", "expand_target",
    "forward_to_layers", "get_layer", "layer_names", "model_guard", "target_layer",
    "target_scores",
]
