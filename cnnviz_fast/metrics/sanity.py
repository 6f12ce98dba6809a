"""Sanity checks for saliency maps (Adebayo et al. 2018): model parameter randomization.

The layers of a deep copy of the model are re-initialised, from the output layer down
(``"cascading"``: the randomization accumulates) or one at a time (``"independent"``),
and each randomized model's maps are compared with the original maps by Spearman rank
correlation and SSIM. A method whose maps barely change when the weights they claim to
explain are destroyed is flagged. The user's model is never modified.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core import autograd_on, model_guard
from ..core.layers import get_layer
from ..core.model_state import check_model
from ..core.validation import check_finite, check_int, check_number, check_positive_number
from ._common import checked_copy, resolve

__all__ = ["Randomization", "model_randomization", "spearman", "ssim"]


@dataclass
class Randomization:
    """``layers[i]``: the layer re-initialised at step i (cascading: with all before it);
    ``spearman``, ``ssim``: ``Tensor[L, N]`` similarity of each image's map to the original;
    ``unchanged``: True when the maps stay similar (mean Spearman >= ``threshold``) at every
    step, i.e. the method fails the check."""

    layers: List[str]
    spearman: Tensor
    ssim: Tensor
    mode: str
    threshold: float
    unchanged: bool


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank) of each row of ``x`` ``[N, D]``, float64."""
    N, D = x.shape
    values, order = x.sort(dim=1, stable=True)
    out = torch.empty(N, D, dtype=torch.float64, device=x.device)
    for n in range(N):
        _, inverse, counts = torch.unique_consecutive(values[n], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        mean_rank = ends - (counts.double() + 1) / 2  # mean of positions start..end-1
        out[n, order[n]] = mean_rank[inverse]
    return out


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps (flattened), ``Tensor[N]`` float64
    (scipy's ``spearmanr``: average ranks for ties; 0 where a map is constant)."""
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"maps must have the same shape [N, ...], got {tuple(a.shape)} and {tuple(b.shape)}")
    check_finite(a, "maps a")
    check_finite(b, "maps b")
    ra, rb = _ranks(a.flatten(1)), _ranks(b.flatten(1))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.pow(2).sum(1) * rb.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def _gaussian(size: int, sigma: float, like: Tensor) -> Tensor:
    x = torch.arange(size, dtype=torch.float64, device=like.device) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, sigma: float = 1.5) -> Tensor:
    """Structural similarity of each pair of 2-D maps ``[N, H, W]``, ``Tensor[N]`` float64.

    Each map is min-max normalised to [0, 1] first (data range 1); Gaussian window of
    ``sigma`` truncated at 3.5 sigma (11 x 11 for 1.5, smaller for small maps), mean over
    the valid positions: skimage's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=1)``.
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"maps must have the same shape [N, H, W], got {tuple(a.shape)} and {tuple(b.shape)}")
    check_positive_number(sigma, "sigma")
    check_finite(a, "maps a")
    check_finite(b, "maps b")

    def norm(x):
        x = x.double()
        lo = x.flatten(1).min(1).values[:, None, None]
        hi = x.flatten(1).max(1).values[:, None, None]
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-300), torch.zeros_like(x))

    a, b = norm(a)[:, None], norm(b)[:, None]
    size = min(2 * int(3.5 * sigma + 0.5) + 1, a.shape[2], a.shape[3])
    size -= 1 - size % 2  # odd
    g = _gaussian(size, sigma, a)

    def blur(x):
        x = nn.functional.conv2d(x, g.view(1, 1, size, 1))
        return nn.functional.conv2d(x, g.view(1, 1, 1, size))

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def _parameter_layers(model: nn.Module) -> List[str]:
    """Names of the modules holding parameters of their own, in registration order."""
    return [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]


@torch.no_grad()
def _reinitialise(module: nn.Module) -> None:
    """Fresh random weights: ``reset_parameters()`` where a module has it, else a normal draw
    with each parameter's own standard deviation."""
    for m in module.modules():
        if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
        else:
            for p in m.parameters(recurse=False):
                p.normal_(0.0, float(p.std()) if p.numel() > 1 else 1.0)


def _as_2d(maps: Tensor, absolute: bool) -> Tensor:
    maps = maps.detach()
    if absolute:
        maps = maps.abs()
    return maps.sum(1) if maps.dim() == 4 else maps


def model_randomization(
    model: nn.Module,
    inputs: Tensor,
    target,
    method: Callable,
    mode: str = "cascading",
    layers: Optional[Sequence[str]] = None,
    absolute: bool = True,
    threshold: float = 0.5,
    seed: int = 0,
    **method_kwargs,
) -> Randomization:
    """Model parameter randomization test (Adebayo et al. 2018) of an attribution method.

    Args:
        model, inputs, target: as in the attribution methods (``"predicted"``: the original
            model's classes, kept for every randomized model).
        method: ``method(model, inputs, target, **method_kwargs) -> maps`` (e.g.
            :func:`cnnviz_fast.saliency`); maps ``[N, C, H, W]`` are summed over channels.
        mode: ``"cascading"`` (re-initialise ``layers`` from the last one down, cumulatively)
            or ``"independent"`` (one layer at a time, the others original).
        layers: module names; default: every module with parameters of its own, in
            registration order (cascading runs them in reverse).
        absolute: compare ``|maps|`` (the paper's default comparison).
        threshold: ``unchanged`` is set when the mean Spearman correlation stays
            >= ``threshold`` at every step.
        seed: seeds the re-initialisation (the caller's random state is left as it was).

    Returns:
        :class:`Randomization`. The randomized models are deep copies of ``model``.
    """
    check_model(model)
    inputs = checked_copy(inputs, model)
    check_number(threshold, "threshold", minimum=-1.0, maximum=1.0)  # a Spearman correlation
    check_int(seed, "seed")
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    if not callable(method):
        raise ValueError(f"method must be callable (model, inputs, target) -> maps, got {type(method).__name__}")
    names = list(layers) if layers is not None else _parameter_layers(model)
    if not names:
        raise ValueError("layers is empty: the model has no module with parameters to randomize")
    for name in names:
        get_layer(model, name, argument="layers")  # ValueError naming the layer when it does not exist
    if mode == "cascading":
        names = names[::-1]
    with model_guard(model):
        target = resolve(model, inputs, target)
    original = _as_2d(method(model, inputs, target, **method_kwargs), absolute)
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    rho, sim = [], []
    # outside the caller's inference_mode: copies made there would hold inference tensors,
    # which the method's backward pass cannot use
    with autograd_on(), torch.random.fork_rng(devices=devices):
        randomized = copy.deepcopy(model)
        for step, name in enumerate(names):
            if mode == "independent":
                randomized = copy.deepcopy(model)
            torch.manual_seed(seed + step)
            _reinitialise(randomized.get_submodule(name))
            maps = _as_2d(method(randomized, inputs, target, **method_kwargs), absolute)
            rho.append(spearman(original, maps))
            sim.append(ssim(original, maps))
    rho, sim = torch.stack(rho), torch.stack(sim)
    unchanged = bool((rho.mean(1) >= threshold).all())
    return Randomization(names, rho, sim, mode, threshold, unchanged)
