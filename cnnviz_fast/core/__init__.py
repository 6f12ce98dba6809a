"""Mechanisms shared by every method: layer lookup and capture, target selection,
model-state protection, input checks and preprocessing."""
from .grad_mode import autograd_on
from .layers import capture_layers, forward_to_layers, get_layer, layer_name, layer_names
from .model_state import model_guard
from .preprocess import Normalize
from .targets import PREDICTED, Neuron, resolve_target, target_for_rows, target_layer, target_scores
from .validation import check_images

__all__ = [
    "PREDICTED", "Neuron", "Normalize", "autograd_on", "capture_layers", "check_images",
    "forward_to_layers", "get_layer", "layer_name", "layer_names", "model_guard", "resolve_target", "target_for_rows",
    "target_layer",    "target_scores",
]
