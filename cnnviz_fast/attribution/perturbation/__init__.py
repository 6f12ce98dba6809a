"""The perturbation family beyond occlusion: attributions from the scores of masked or
ablated copies of the inputs (or of a layer's activations), in bounded batches.

Segment-based methods (one value per segment of a label map: user-given, a grid or SLIC
superpixels, see :mod:`.segments`): :func:`feature_ablation`, :func:`shapley_sampling`,
:func:`kernel_shap`, :func:`lime`. Mask-based: :func:`rise` (masks made from a seed inside
the kernel), :func:`score_cam`, :func:`ablation_cam` (the network's prefix runs once).
"""
from .ablation_cam import ablation_cam
from .feature_ablation import feature_ablation
from .rise import rise
from .score_cam import score_cam
from .segments import gaussian_blur, grid_segments, parse_segments, slic_segments
from .shapley import draw_permutations, shapley_sampling
from .surrogate import kernel_shap, kernel_shap_coalitions, lime, lime_coalitions

__all__ = [
    "ablation_cam", "draw_permutations", "feature_ablation", "gaussian_blur", "grid_segments", "kernel_shap",
    "kernel_shap_coalitions", "lime", "lime_coalitions", "parse_segments", "rise", "score_cam", "shapley_sampling",
    "slic_segments",
]
