"""KernelSHAP (Lundberg & Lee 2017) and LIME (Ribeiro et al. 2016) over segments: a linear
surrogate fitted to the scores of sampled coalitions of segments.

Each image gets its own coalitions ``BoolTensor[S, K_n]`` (``True``: the segment keeps the
input, ``False``: the baseline), scored in shared passes, weighted, and fitted by
scikit-learn on float32 arrays as Captum fits them (KernelSHAP: ``LinearRegression``, the
Shapley kernel in the sampling and weight 10^6 on the empty and full coalitions; LIME:
``Lasso(alpha=0.01)``, an exponential kernel on the cosine distance between the input and
the perturbed input). The coefficients, painted on the segments, are the attributions.

Sampling follows Captum's draws on the same generator (per image, in order): LIME one
``bernoulli(0.5)`` vector per sample; KernelSHAP the full and the empty coalition, then per
sample a size from the Shapley kernel's distribution and a random subset of that size (the
top values of a ``randn`` vector); after each image, the draws of Captum's fit (its
DataLoader's seed, its linear layer's initialisation). With ``seed`` the draws come from a fresh generator,
equal to Captum's under ``torch.manual_seed(seed)``; ``coalitions=`` (and ``weights=``) feed
given ones.
"""
from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ...core import model_guard
from ...core.arguments import friendly_arguments
from ...core.targets import Target, check_target
from ...core.validation import check_choice, check_images, check_model_inputs, check_number, check_positive_int
from .._backprop import with_output
from ._engine import SegmentScorer, paint
from .segments import Segments, resolve_baseline, resolve_segments

__all__ = ["kernel_shap", "lime", "kernel_shap_coalitions", "lime_coalitions", "REGRESSIONS"]

# weight of the empty and the full coalition in KernelSHAP's fit (Captum's "infinite" weight)
FULL_WEIGHT = 1e6
REGRESSIONS = ("linear", "lasso", "ridge")


def _generator(seed: Optional[int]) -> Optional[torch.Generator]:
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def kernel_shap_coalitions(features: int, samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``BoolTensor[samples, features]``: the full coalition, the empty one, then coalitions
    whose size k follows the Shapley kernel's distribution ``p(k) ~ (M - 1) / (k (M - k))``,
    drawn as Captum's KernelShap draws them (same generator calls, same order)."""
    rows = [torch.ones(1, features, dtype=torch.bool), torch.zeros(1, features, dtype=torch.bool)]
    if features > 1:
        sizes = torch.arange(features, dtype=torch.float)
        probs = torch.tensor(features - 1) / (sizes * (features - sizes))
        probs[0] = 0.0
        probs = probs / probs.sum(-1, keepdim=True)  # as torch.distributions.Categorical normalises
    for _ in range(samples - 2):
        if features == 1:
            rows.append(torch.ones(1, 1, dtype=torch.bool))
            continue
        k = torch.multinomial(probs.reshape(1, -1), 1, True, generator=generator).reshape(())
        values = torch.randn(1, features, generator=generator)
        threshold = torch.kthvalue(values, features - int(k)).values.item()
        rows.append(values > threshold)
    return torch.cat(rows)[:samples]


def lime_coalitions(features: int, samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``BoolTensor[samples, features]``: each segment kept with probability 1/2, one
    ``torch.bernoulli`` vector per sample (Captum Lime's default sampling)."""
    half = torch.full((1, features), 0.5)
    return torch.cat([torch.bernoulli(half, generator=generator) for _ in range(samples)]).bool()


def _skip_fit_draws(features: int, generator: Optional[torch.Generator]) -> None:
    """Captum's fit of each image draws from the same generator: its DataLoader's iterator one
    int64 seed, then the ``nn.Linear(features, 1)`` it builds for the coefficients its default
    initialisation (``features`` + 1 uniform values). Draw as many, so that the next image's
    coalitions stay aligned with Captum's."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    torch.empty(1, features).uniform_(generator=generator)
    torch.empty(1).uniform_(generator=generator)


def _check_given(coalitions, K: List[int], argument: str) -> List[Tensor]:
    """One table per image from ``coalitions``: a ``[S, K]`` 0/1 tensor for every image, or a
    list of ``[S_n, K_n]`` tensors."""
    given = list(coalitions) if isinstance(coalitions, (list, tuple)) else [coalitions] * len(K)
    if len(given) != len(K):
        raise ValueError(f"{argument} must be one tensor [S, K] or one per image ({len(K)}), got {len(given)}")
    tables = []
    for n, (table, k) in enumerate(zip(given, K)):
        table = torch.as_tensor(table)
        if table.dim() != 2 or table.shape[1] != k or table.shape[0] < 1:
            raise ValueError(f"{argument}: image {n} needs a [samples, {k}] table (one column per segment), got "
                             f"{tuple(table.shape)}")
        if table.is_floating_point() and not bool(((table == 0) | (table == 1)).all()):
            raise ValueError(f"{argument} must hold 0 / 1 values")
        tables.append(table.bool().cpu())
    return tables


def _fit(regression: str, alpha: float, X: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Coefficients of the weighted linear fit, float32 in and out as Captum's scikit-learn
    wrapper does."""
    from sklearn import linear_model  # optional dependency: only the surrogate methods need it

    if regression == "linear":
        fit = linear_model.LinearRegression()
    elif regression == "lasso":
        fit = linear_model.Lasso(alpha=alpha)
    else:
        fit = linear_model.Ridge(alpha=alpha)
    x_np = X.float().cpu().numpy()
    fit.fit(x_np, y.float().cpu().numpy(), sample_weight=w.float().cpu().numpy())
    return torch.from_numpy(np.asarray(fit.coef_, dtype=np.float32).reshape(-1))


def _surrogate(model, inputs, target, segments, baseline, samples, seed, coalitions, weights, batch_size,
               memory_budget, return_output, method: str, regression: str, alpha: float, kernel_width: float):
    with model_guard(model), torch.no_grad():
        check_images(inputs)
        check_model_inputs(model, inputs)
        N, C = inputs.shape[:2]
        check_target(target, N)
        check_choice(regression, REGRESSIONS, "regression")
        alpha = check_number(alpha, "alpha")
        kernel_width = check_number(kernel_width, "kernel_width")
        if kernel_width == 0:
            raise ValueError("kernel_width must be > 0, got 0")
        segments = resolve_segments(segments, inputs)
        base = resolve_baseline(baseline, inputs)
        K = [int(s.max()) + 1 for s in segments]
        if coalitions is None:
            check_positive_int(samples, "samples")
            generator = _generator(seed)
            draw = kernel_shap_coalitions if method == "kernel_shap" else lime_coalitions
            tables = []
            for k in K:
                tables.append(draw(k, samples, generator))
                _skip_fit_draws(k, generator)
        else:
            tables = _check_given(coalitions, K, "coalitions")
        given_weights = None
        if weights is not None:
            given_weights = [torch.as_tensor(w, dtype=torch.float32).flatten().cpu() for w in
                             (weights if isinstance(weights, (list, tuple)) else [weights] * N)]
            if len(given_weights) != N or any(w.numel() != t.shape[0] for w, t in zip(given_weights, tables)):
                raise ValueError("weights must hold one weight per coalition (a Tensor[S], or one per image)")
            if any(not bool(torch.isfinite(w).all()) or bool((w < 0).any()) for w in given_weights):
                raise ValueError("weights must be finite and >= 0")
        scorer = SegmentScorer(model, inputs.detach(), target, base, segments, batch_size, memory_budget,
                               keep_output=return_output)
        device = inputs.device
        # the full coalition is the input itself: its score comes from the clean pass
        full = [t.all(1) for t in tables]
        scored = [t[~f].to(device) for t, f in zip(tables, full)]
        similarity: List[List[Tensor]] = [[] for _ in range(N)]
        make_rows = scorer.table_maker(scored)

        def make(n: int, r0: int, r1: int) -> Tensor:
            rows = make_rows(n, r0, r1)
            x = inputs[n].detach().flatten().float()
            similarity[n].append(torch.nn.functional.cosine_similarity(x[None], rows.flatten(1).float(), dim=1,
                                                                       eps=1e-8))
            return rows

        # LIME's similarities need each image's rows; otherwise a pass is built in one op call
        lime_similarity = method == "lime" and given_weights is None
        scores = scorer.run([t.shape[0] for t in scored], make if lime_similarity else make_rows)
        values = []
        for n in range(N):
            y = torch.empty(tables[n].shape[0], dtype=torch.float32)
            y[full[n]] = scorer.clean[n].float().cpu()
            y[~full[n]] = scores[n].float().cpu()
            if given_weights is not None:
                w = given_weights[n]
            elif method == "kernel_shap":
                size = tables[n].sum(1)
                w = torch.where((size == 0) | (size == K[n]), FULL_WEIGHT, 1.0).float()
            else:
                cos = torch.ones(tables[n].shape[0], dtype=torch.float32)
                if similarity[n]:
                    cos[~full[n]] = torch.cat(similarity[n]).float().cpu()
                distance = 1 - cos.double()
                w = torch.exp(-distance ** 2 / (2 * kernel_width ** 2)).float()
            values.append(_fit(regression, alpha, tables[n].float(), y, w).to(device))
        attributions = paint(segments, values, C, scorer.clean.dtype)
        return with_output(attributions, scorer.output, return_output)


@friendly_arguments
def kernel_shap(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    segments: Segments = "slic:100",
    baseline: Union[float, Tensor, str] = 0.0,
    samples: int = 200,
    seed: Optional[int] = None,
    coalitions=None,
    weights=None,
    regression: str = "linear",
    alpha: float = 0.01,
    batch_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    return_output: bool = False,
):
    """KernelSHAP over segments: the coefficients of a linear fit of the target score on
    ``samples`` coalitions drawn from the Shapley kernel.

    Equal to ``captum.attr.KernelShap(model).attribute(x_n, target=..., baselines=...,
    feature_mask=segments[n], n_samples=samples)`` for each image n given the same
    coalitions: the same ``seed`` (Captum's draws under ``torch.manual_seed(seed)``, images
    in order), or ``coalitions=``. Captum fits one model per image too; on a batch it counts
    the features over the whole batch's mask, so compare image by image.

    Args:
        segments, baseline, batch_size, memory_budget, return_output: as in
            :func:`~cnnviz_fast.attribution.perturbation.feature_ablation`.
        samples: coalitions per image (the first two: all segments kept, none kept).
        seed: draw the coalitions from a generator seeded so (default: the global one).
        coalitions: ``[S, K]`` 0/1 (or bool) for every image, or a list of ``[S_n, K_n]``.
        weights: the fit's sample weights (``Tensor[S]`` or one per image); default:
            10^6 for the empty and the full coalition, 1 otherwise.
        regression: ``"linear"`` (default, as Captum), ``"lasso"`` or ``"ridge"`` with ``alpha``.

    Returns:
        ``Tensor[N, C, H, W]`` (``(attributions, output)`` with ``return_output``).
    """
    return _surrogate(model, inputs, target, segments, baseline, samples, seed, coalitions, weights, batch_size,
                      memory_budget, return_output, "kernel_shap", regression, alpha, 1.0)


@friendly_arguments
def lime(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    segments: Segments = "slic:100",
    baseline: Union[float, Tensor, str] = 0.0,
    samples: int = 200,
    seed: Optional[int] = None,
    coalitions=None,
    weights=None,
    regression: str = "lasso",
    alpha: float = 0.01,
    kernel_width: float = 1.0,
    batch_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    return_output: bool = False,
):
    """LIME over segments: the coefficients of a weighted sparse linear fit (Lasso) of the
    target score on ``samples`` random coalitions (each segment kept with probability 1/2).

    Equal to ``captum.attr.Lime(model).attribute(x_n, target=..., baselines=...,
    feature_mask=segments[n], n_samples=samples)`` for each image n given the same
    coalitions (``seed`` or ``coalitions=``; see :func:`kernel_shap`). Weights: ``exp(-d^2 /
    (2 kernel_width^2))`` with d the cosine distance between the input and the perturbed
    input (Captum's default similarity), unless ``weights`` are given.

    Args: as :func:`kernel_shap`; ``regression`` defaults to ``"lasso"`` (``alpha=0.01``).
    """
    return _surrogate(model, inputs, target, segments, baseline, samples, seed, coalitions, weights, batch_size,
                      memory_budget, return_output, "lime", regression, alpha, kernel_width)

