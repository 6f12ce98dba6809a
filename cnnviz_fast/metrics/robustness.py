"""Infidelity and max-sensitivity, with Captum's definitions (Yeh et al. 2019).

Both follow ``captum.metrics.infidelity`` / ``sensitivity_max`` step for step (the same
perturbation calls on the same repeated batches, so seeded perturbations give the same
values), with this package's ``model, inputs, target`` arguments. Infidelity computes the
clean scores once instead of once per batch.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core import model_guard
from ..core.targets import target_scores
from ..core.model_state import check_model
from ..core.validation import check_number, check_positive_int
from ._common import checked_copy, resolve, rows_target

__all__ = ["infidelity", "sensitivity_max", "uniform_noise"]


def _chunks(n_samples: int, n_images: int, batch_size: Optional[int]):
    """Samples per batch, as Captum's ``_divide_and_aggregate_metrics`` splits them."""
    per = n_samples if batch_size is None else min(max(batch_size // n_images, 1), n_samples)
    done = 0
    while done < n_samples:
        m = min(per, n_samples - done)
        yield m
        done += m


def _check_perturbation(model, inputs, n_perturb_samples, batch_size, perturb_func) -> Tensor:
    """The arguments infidelity and sensitivity_max share; returns the inputs' private copy."""
    check_model(model)
    inputs = checked_copy(inputs, model)
    check_positive_int(n_perturb_samples, "n_perturb_samples", minimum=1)
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size", minimum=1)
    if not callable(perturb_func):
        raise ValueError(f"perturb_func must be callable, got {type(perturb_func).__name__}")
    return inputs


def infidelity(
    model: nn.Module,
    inputs: Tensor,
    target,
    attributions: Tensor,
    perturb_func: Callable,
    n_perturb_samples: int = 10,
    baselines=None,
    batch_size: Optional[int] = None,
    normalize: bool = False,
) -> Tensor:
    """Infidelity ``E_I[(I . attributions - (f(x) - f(x - I)))^2]`` per image (Captum's).

    Args:
        model, inputs, target: as in the attribution methods; ``f`` is the target's raw score
            (a class's logit, a callable's or Neuron's value); ``"predicted"`` is resolved on
            the clean inputs.
        attributions: ``Tensor`` of the inputs' shape.
        perturb_func: ``perturb_func(x) -> (perturbations I, perturbed inputs)`` (or
            ``perturb_func(x, baselines)`` when ``baselines`` is given), called on the inputs
            repeated ``repeat_interleave``-wise, exactly as Captum calls it (Captum's
            ``infidelity_perturb_func_decorator`` functions work as they are).
        n_perturb_samples: perturbations per image.
        baselines: passed to ``perturb_func`` (per-image tensors are repeated like the inputs).
        batch_size: at most this many perturbed inputs per forward (Captum's
            ``max_examples_per_batch``); None: all at once.
        normalize: scale the attributions by the optimal ``beta`` first (Captum's ``normalize``).

    Returns:
        ``Tensor[N]``. The model runs in eval mode and is restored afterwards (Captum runs it
        in whatever mode it is in: pass an eval-mode model to compare).
    """
    inputs = _check_perturbation(model, inputs, n_perturb_samples, batch_size, perturb_func)
    if not isinstance(attributions, Tensor) or attributions.shape != inputs.shape:
        raise ValueError(f"attributions must be a Tensor of the inputs' shape {tuple(inputs.shape)}, got "
                         f"{tuple(getattr(attributions, 'shape', ())) or type(attributions).__name__}")
    if not bool(torch.isfinite(attributions).all()):
        raise ValueError("attributions contains NaN or infinite values")
    N = inputs.shape[0]
    image_ids = torch.arange(N, device=inputs.device)
    sums = None
    with model_guard(model), torch.no_grad():
        target = resolve(model, inputs, target)
        clean = target_scores(model, inputs.clone(), target)  # a model may write into its input
        for m in _chunks(n_perturb_samples, N, batch_size):
            x = inputs.repeat_interleave(m, 0)
            if baselines is None:
                perturbations, perturbed = _pair(perturb_func(x))
            else:
                b = baselines
                if isinstance(b, Tensor) and b.dim() > 0 and b.shape[0] == N and N > 1:
                    b = b.repeat_interleave(m, 0)
                perturbations, perturbed = _pair(perturb_func(x, b))
            if isinstance(perturbations, (tuple, list)):
                (perturbations,), (perturbed,) = perturbations, perturbed
            f_perturbed = target_scores(model, perturbed, rows_target(target, image_ids, m))
            diffs = (clean.repeat_interleave(m) - f_perturbed).view(N, m)
            dots = (attributions.repeat_interleave(m, 0) * perturbations).view(N * m, -1).sum(1).view(N, m)
            if normalize:
                terms = (dots.pow(2).sum(1), (dots * diffs).sum(1), diffs.pow(2).sum(1))
            else:
                terms = ((dots - diffs).pow(2).sum(1),)
            sums = terms if sums is None else tuple(a + t for a, t in zip(sums, terms))
    if normalize:
        a2, ab, b2 = sums
        beta = torch.where(a2 == 0, ab, ab / torch.where(a2 == 0, torch.ones_like(a2), a2))
        value = beta * beta * a2 - 2 * beta * ab + b2
    else:
        value = sums[0]
    return value / n_perturb_samples


def _pair(result):
    """``perturb_func``'s ``(perturbations, perturbed inputs)``, checked."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = f"a {type(result).__name__}" + (f" of {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise ValueError(f"perturb_func must return (perturbations, perturbed inputs), got {got}")
    return result


def uniform_noise(inputs: Tensor, radius: float = 0.02) -> Tensor:
    """Captum's default perturbation for ``sensitivity_max``: ``inputs + U(-radius, radius)``
    (float32 noise from the global CPU generator, so ``torch.manual_seed`` reproduces Captum's)."""
    check_number(radius, "radius")
    return inputs + torch.empty(inputs.size(), dtype=torch.float32).uniform_(-radius, radius).to(inputs.device)


def sensitivity_max(
    model: nn.Module,
    inputs: Tensor,
    target,
    method: Callable,
    perturb_radius: float = 0.02,
    n_perturb_samples: int = 10,
    perturb_func: Callable = uniform_noise,
    norm_ord="fro",
    batch_size: Optional[int] = None,
    **method_kwargs,
) -> Tensor:
    """Max-sensitivity ``max_I ||E(x + I) - E(x)|| / ||E(x)||`` per image (Captum's ``sensitivity_max``).

    Args:
        model, inputs, target: as in the attribution methods (``"predicted"``: the clean
            inputs' classes are explained for every perturbed copy).
        method: an attribution method ``method(model, inputs, target, **method_kwargs)``, e.g.
            :func:`cnnviz_fast.saliency`.
        perturb_radius, perturb_func: ``perturb_func(x, perturb_radius)`` (or ``perturb_func(x)``)
            -> perturbed ``x``; default :func:`uniform_noise`.
        n_perturb_samples: perturbations per image; ``norm_ord``: ``torch.norm``'s ``p``.
        batch_size: at most this many perturbed inputs per call of ``method`` (Captum's
            ``max_examples_per_batch``).

    Returns:
        ``Tensor[N]``; a zero map counts as norm 1 (as in Captum).
    """
    inputs = _check_perturbation(model, inputs, n_perturb_samples, batch_size, perturb_func)
    if not callable(method):
        raise ValueError(f"method must be callable (model, inputs, target) -> maps, got {type(method).__name__}")
    check_number(perturb_radius, "perturb_radius")
    if not (norm_ord == "fro" or (isinstance(norm_ord, (int, float)) and not isinstance(norm_ord, bool)
                                  and norm_ord == norm_ord)):
        raise ValueError(f"norm_ord must be 'fro' or a number (torch.norm's p, inf included), got {norm_ord!r}")
    takes_radius = len(inspect.signature(perturb_func).parameters) > 1
    N = inputs.shape[0]
    image_ids = torch.arange(N, device=inputs.device)
    with model_guard(model):
        target = resolve(model, inputs, target)
    with torch.no_grad():
        clean = method(model, inputs, target, **method_kwargs).detach()
        clean_norm = torch.norm(clean.reshape(N, -1), p=norm_ord, dim=1, keepdim=True)
        clean_norm = torch.where(clean_norm == 0, torch.ones_like(clean_norm), clean_norm)
    best = None
    for m in _chunks(n_perturb_samples, N, batch_size):
        with torch.no_grad():
            x = inputs.repeat_interleave(m, 0)
            perturbed = perturb_func(x, perturb_radius) if takes_radius else perturb_func(x)
        maps = method(model, perturbed, rows_target(target, image_ids, m), **method_kwargs).detach()
        with torch.no_grad():
            diff = (clean.repeat_interleave(m, 0) - maps).reshape(N * m, -1)
            sens = torch.norm(diff, p=norm_ord, dim=1, keepdim=True) / clean_norm.repeat_interleave(m, 0)
            sens = sens.view(N, m).max(1).values
        best = sens if best is None else torch.max(best, sens)
    return best
