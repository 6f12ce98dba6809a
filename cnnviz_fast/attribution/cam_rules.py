"""How each CAM turns a layer's activations and gradients into one map per image.

Every rule takes ``A = Tensor[N, K, h, w]`` (activations) and ``G`` (d score / d A, same
shape; None for Eigen-CAM, which needs no gradient) and returns the map before its final
ReLU, ``Tensor[N, h, w]``. With ``eigen_smooth`` the rules that sum channels at the end
project onto the first principal component instead (pytorch-grad-cam's option of that name).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CAM_RULES", "GRADIENT_FREE", "first_component"]


def first_component(maps: Tensor) -> Tensor:
    """Each image's ``[K, h, w]`` stack projected onto its first principal component:
    ``Tensor[N, K, h, w] -> Tensor[N, h, w]``.

    The ``h*w`` positions are the samples and the ``K`` channels the features, centred per
    channel (NaNs read as 0); the projection is ``M v`` with ``v`` the top right singular
    vector of the centred ``M = [h*w, K]``. A singular vector's sign is arbitrary (LAPACK
    builds differ: MKL and OpenBLAS disagree on about half of all matrices), and after the
    CAM's ReLU the sign decides between a map and its complement. It is fixed here: each
    map is oriented so that its largest magnitude is positive (``|max| >= |min|``), the
    sign correction pytorch-grad-cam applies in its Seg-Eigen-CAM
    (``get_2d_projection_with_sign_correction``). Its ``EigenCAM`` keeps LAPACK's sign.
    """
    n, k, h, w = maps.shape
    work = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()  # no half-precision SVD
    matrix = work.flatten(2).transpose(1, 2)
    matrix = torch.where(matrix.isnan(), torch.zeros((), dtype=matrix.dtype, device=matrix.device), matrix)
    matrix = matrix - matrix.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    projection = torch.bmm(matrix, vh[:, 0, :, None])[:, :, 0]   # [N, h*w]
    low, high = projection.aminmax(dim=1)
    projection = torch.where((-low > high)[:, None], -projection, projection)
    return projection.reshape(n, h, w).to(maps.dtype)


def _channels(weighted: Tensor, eigen_smooth: bool) -> Tensor:
    return first_component(weighted) if eigen_smooth else weighted.sum(dim=1)


def _weighted(weights: Tensor, activations: Tensor, eigen_smooth: bool) -> Tensor:
    if eigen_smooth:
        return first_component(weights[:, :, None, None] * activations)
    # sum_k w_k A_k as one batched matrix product ([N, 1, K] @ [N, K, h*w])
    n, k, h, w = activations.shape
    return torch.bmm(weights[:, None, :], activations.reshape(n, k, h * w)).reshape(n, h, w)


def _grad_cam(a: Tensor, g: Tensor, eigen_smooth: bool) -> Tensor:
    return _weighted(g.mean(dim=(2, 3)), a, eigen_smooth)


def _grad_cam_plus_plus(a: Tensor, g: Tensor, eigen_smooth: bool) -> Tensor:
    # Chattopadhay et al. 2018, eq. 19 with exp(score) derivatives: alpha = g^2 / (2 g^2 + sum(A) g^3)
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * (g2 * g) + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros((), dtype=alpha.dtype, device=alpha.device))
    return _weighted((F.relu(g) * alpha).sum(dim=(2, 3)), a, eigen_smooth)


def _xgrad_cam(a: Tensor, g: Tensor, eigen_smooth: bool) -> Tensor:
    # Fu et al. 2020: w_k = sum_ij (A_k(i,j) / sum A_k) dS/dA_k(i,j)
    weights = (g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + 1e-7)
    return _weighted(weights, a, eigen_smooth)


def _hires_cam(a: Tensor, g: Tensor, eigen_smooth: bool) -> Tensor:
    return _channels(g * a, eigen_smooth)


def _layer_cam(a: Tensor, g: Tensor, eigen_smooth: bool) -> Tensor:
    return _channels(F.relu(g) * a, eigen_smooth)


def _grad_cam_elementwise(a: Tensor, g: Tensor, eigen_smooth: bool) -> Tensor:
    return _channels(F.relu(g * a), eigen_smooth)


def _eigen_cam(a: Tensor, g: Optional[Tensor], eigen_smooth: bool) -> Tensor:
    return first_component(a)


def _eigen_grad_cam(a: Tensor, g: Tensor, eigen_smooth: bool) -> Tensor:
    return first_component(g * a)


Rule = Callable[[Tensor, Optional[Tensor], bool], Tensor]

# name -> rule; the names are those of the public functions
CAM_RULES: Dict[str, Rule] = {
    "grad_cam": _grad_cam,
    "grad_cam_plus_plus": _grad_cam_plus_plus,
    "xgrad_cam": _xgrad_cam,
    "hires_cam": _hires_cam,
    "layer_cam": _layer_cam,
    "grad_cam_elementwise": _grad_cam_elementwise,
    "eigen_cam": _eigen_cam,
    "eigen_grad_cam": _eigen_grad_cam,
}
GRADIENT_FREE = frozenset({"eigen_cam"})
