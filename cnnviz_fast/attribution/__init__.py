"""Which pixels matter: attribution methods. Every function takes ``model`` and
``inputs: Tensor[N, C, H, W]`` and the same ``target`` (see :mod:`cnnviz_fast.core.targets`)."""
from .baselines import random_attribution
from .gradcam import grad_cam, guided_grad_cam
from .cams import (CAM_METHODS, cams, eigen_cam, eigen_grad_cam, grad_cam_elementwise, grad_cam_plus_plus, hires_cam,
                   layer_cam, xgrad_cam)
from .deep_lift import deeplift, deeplift_shap
from .fullgrad import full_grad
from .gradients import (
    gradient_shap, gradient_x_input, integrated_gradients, saliency, smoothgrad, smoothgrad_sq, vargrad,
)
from .guided import deconvnet, guided_backprop
from .lrp import lrp
from .occlusion import occlusion
from .perturbation import (
    ablation_cam, feature_ablation, grid_segments, kernel_shap, lime, rise, score_cam, shapley_sampling, slic_segments,
)
from .segmentation import saliency_to_mask

__all__ = [
    "ablation_cam", "rise", "score_cam",
    "deconvnet", "grad_cam", "gradient_x_input", "guided_backprop", "guided_grad_cam", "integrated_gradients",
    "occlusion", "random_attribution", "saliency", "saliency_to_mask", "smoothgrad",
    "deeplift", "deeplift_shap", "gradient_shap", "smoothgrad_sq", "vargrad",
    "feature_ablation", "grid_segments", "kernel_shap", "lime", "shapley_sampling", "slic_segments",
    # CAM family
    "CAM_METHODS", "cams", "eigen_cam", "eigen_grad_cam", "full_grad", "grad_cam_elementwise", "grad_cam_plus_plus",
    "hires_cam", "layer_cam", "xgrad_cam",
    "lrp",
]
