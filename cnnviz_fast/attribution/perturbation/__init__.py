"""The perturbation family beyond occlusion: methods that explain by running the model on
masked or ablated copies of the inputs (or of a layer's activations), in bounded batches."""
from .ablation_cam import ablation_cam
from .rise import rise
from .score_cam import score_cam

__all__ = ["ablation_cam", "rise", "score_cam"]
