"""The perturbation family: attributions from the scores of masked copies of the inputs.

Segment-based methods (one value per segment of a label map: user-given, a grid or SLIC
superpixels, see :mod:`.segments`): :func:`feature_ablation`, :func:`shapley_sampling`,
:func:`kernel_shap`, :func:`lime`.
"""
from .feature_ablation import feature_ablation
from .segments import gaussian_blur, grid_segments, parse_segments, slic_segments
from .shapley import draw_permutations, shapley_sampling
from .surrogate import kernel_shap, kernel_shap_coalitions, lime, lime_coalitions

__all__ = [
    "draw_permutations", "feature_ablation", "gaussian_blur", "grid_segments", "kernel_shap",
    "kernel_shap_coalitions", "lime", "lime_coalitions", "parse_segments", "shapley_sampling", "slic_segments",
]
