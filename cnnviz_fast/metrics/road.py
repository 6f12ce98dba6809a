"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods").

For each percentile p, the pixels a map ranks most relevant (MoRF: those at or above the
p-th percentile of the map) or least relevant (LeRF: those at or below the (100 - p)-th)
are removed and filled by *noisy linear imputation*: each removed pixel equals the weighted
mean of its 8 neighbours (weights 1/6 on the sides, 1/12 on the diagonals, renormalised at
the border), a sparse linear system solved per image and percentile, plus Gaussian noise
(std ``noise``). The score change of the imputed image against the clean one, averaged over
the percentiles, is the metric; a faithful map makes MoRF drop fast and LeRF slowly
(``combined = (LeRF - MoRF) / 2``, higher is better).

Equal to pytorch-grad-cam's ``ROADMostRelevantFirstAverage``,
``ROADLeastRelevantFirstAverage`` and ``ROADCombined`` on the same maps and targets. The
systems are assembled in a few vectorised array operations (pytorch-grad-cam fills a
``lil_matrix`` entry list per neighbour offset, most of its run time) and solved by the
same sparse LU (SuperLU); the imputed images of all percentiles share forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core import model_guard
from ..core.model_state import check_model
from ..core.validation import check_number, check_positive_int
from ._common import check_maps, checked_copy, resolve, rows_target, scores

__all__ = ["Road", "road", "noisy_linear_imputation", "PERCENTILES"]

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
# (row offset, column offset, weight) of the 8 neighbours in the imputation
NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12), (0, -1, 1 / 6), (-1, -1, 1 / 12),
              (1, 0, 1 / 6), (-1, 0, 1 / 6))


@dataclass
class Road:
    """ROAD scores. ``morf`` / ``lerf``: ``Tensor[N, P]`` float64, the target's score on the
    imputed image minus its score on the clean one, at each of the ``percentiles``."""

    percentiles: tuple
    morf: Tensor
    lerf: Tensor

    @property
    def morf_mean(self) -> Tensor:
        """``Tensor[N]``: MoRF averaged over the percentiles (lower is better)."""
        return self.morf.mean(1)

    @property
    def lerf_mean(self) -> Tensor:
        """``Tensor[N]``: LeRF averaged over the percentiles (higher is better)."""
        return self.lerf.mean(1)

    @property
    def combined(self) -> Tensor:
        """``Tensor[N]``: ``(LeRF - MoRF) / 2`` (higher is better)."""
        return (self.lerf_mean - self.morf_mean) / 2


def _system(keep: np.ndarray, image: np.ndarray):
    """The imputation system of one image: ``(A csc [u, u], b [u, C], unknown indices [u])``
    for ``keep`` ``bool[H, W]`` (False: impute) and ``image`` ``[C, H, W]``."""
    from scipy.sparse import coo_matrix  # scipy comes with scikit-learn / scikit-image

    H, W = keep.shape
    flat_keep = keep.ravel()
    unknown = np.flatnonzero(~flat_keep)
    u = unknown.size
    index = np.full(H * W, -1, dtype=np.int64)
    index[unknown] = np.arange(u)
    ys, xs = np.divmod(unknown, W)
    values = image.reshape(image.shape[0], -1)
    b = np.zeros((u, image.shape[0]))
    diagonal = np.zeros(u)
    rows, cols, data = [], [], []
    for dy, dx, weight in NEIGHBOURS:
        y, x = ys + dy, xs + dx
        valid = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        at = np.flatnonzero(valid)
        neighbour = y[valid] * W + x[valid]
        known = flat_keep[neighbour]
        diagonal[at] -= weight
        b[at[known]] -= weight * values[:, neighbour[known]].T
        rows.append(at[~known])
        cols.append(index[neighbour[~known]])
        data.append(np.full(int((~known).sum()), weight))
    rows.append(np.arange(u))
    cols.append(np.arange(u))
    data.append(diagonal)
    A = coo_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(u, u)).tocsc()
    return A, b, unknown


def noisy_linear_imputation(image: Tensor, keep: Tensor, noise: float = 0.01,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """``image`` ``[C, H, W]`` with the pixels where ``keep`` ``[H, W]`` is False replaced by
    the linear interpolation of their neighbours plus ``noise * randn`` (drawn as
    ``randn(C, removed)`` from ``generator``, the global one by default). float32 out."""
    from scipy.sparse.linalg import spsolve

    C, H, W = image.shape
    img = image.detach().float().cpu()
    keep_np = keep.detach().cpu().numpy().astype(bool)
    out = img.clone().reshape(C, -1)
    if keep_np.all():
        return out.reshape(C, H, W).to(image.device)
    A, b, unknown = _system(keep_np, img.numpy())
    solution = torch.as_tensor(spsolve(A, b), dtype=torch.float).reshape(unknown.size, C).t()
    if noise:
        solution = solution + noise * torch.randn(solution.shape, generator=generator)
    out[:, torch.from_numpy(unknown)] = solution
    return out.reshape(C, H, W).to(image.device)


def _thresholded(values: np.ndarray, percentile: float) -> Tensor:
    """Pixels kept at ``percentile``: those strictly below it, compared in the map's float32
    (as pytorch-grad-cam keeps them)."""
    return torch.from_numpy(values) < float(np.percentile(values, percentile))


def road(
    model: nn.Module,
    inputs: Tensor,
    target,
    attributions: Tensor,
    percentiles: Sequence[float] = PERCENTILES,
    noise: float = 0.01,
    seed: Optional[int] = None,
    batch_size: int = 32,
    probability: bool = True,
) -> Road:
    """ROAD (remove and debias) of each image's attribution map, MoRF and LeRF.

    Args:
        model: the classifier; eval mode during the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        target: an int, N ints or ``"predicted"``: the class's softmax probability (its logit
            with ``probability=False``, pytorch-grad-cam's ``ClassifierOutputTarget``; the
            probability is its ``ClassifierOutputSoftmaxTarget``); a callable or Neuron: as is.
        attributions: ``[N, H, W]`` or ``[N, 1 or C, H, W]`` (channels summed) at the inputs' size.
        percentiles: MoRF at p imputes the pixels at or above the map's p-th percentile, LeRF
            those at or below its (100 - p)-th (pytorch-grad-cam's thresholds).
        noise: std of the Gaussian noise added to the imputed pixels (0: none).
        seed: draw the noise from a generator seeded so (default: the global one). The draws
            follow pytorch-grad-cam's ``ROADCombined`` order (LeRF then MoRF, each percentile
            then each image), so under ``torch.manual_seed(s)`` both draw the same noise.
        batch_size: imputed images per forward pass.

    Returns:
        :class:`Road` (``morf``, ``lerf`` ``[N, P]``; ``morf_mean``, ``lerf_mean``, ``combined``).
    """
    check_model(model)
    inputs = checked_copy(inputs)
    maps = check_maps(attributions, inputs, same_size=True)
    percentiles = tuple(percentiles)
    if not percentiles:
        raise ValueError("percentiles must hold at least one value in [0, 100]")
    for p in percentiles:
        check_number(p, "percentiles", 0.0, 100.0)
    noise = check_number(noise, "noise")
    check_positive_int(batch_size, "batch_size")
    N, C, H, W = inputs.shape
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    maps_np = maps.detach().float().cpu().numpy()
    images = []  # (order, percentile index, image) -> imputed image, in pytorch-grad-cam's order
    for order in ("lerf", "morf"):
        for p in percentiles:
            for n in range(N):
                values = 1 - maps_np[n] if order == "lerf" else maps_np[n]
                keep = _thresholded(values, p)
                images.append(noisy_linear_imputation(inputs[n], keep, noise, generator))
    imputed = torch.stack(images).to(inputs.dtype)  # [2 * P * N, C, H, W]
    P = len(percentiles)
    with model_guard(model), torch.no_grad():
        target = resolve(model, inputs, target)
        clean = scores(model, inputs, target, probability).double()
        image_of_row = torch.arange(N, device=inputs.device).repeat(2 * P)
        out = torch.empty(imputed.shape[0], dtype=torch.float64, device=inputs.device)
        for r0 in range(0, imputed.shape[0], batch_size):
            r1 = min(imputed.shape[0], r0 + batch_size)
            rows_tgt = rows_target(target, image_of_row[r0:r1], 1)
            out[r0:r1] = scores(model, imputed[r0:r1], rows_tgt, probability).double()
    change = out.view(2, P, N) - clean[None, None]
    return Road(percentiles, change[1].t().contiguous(), change[0].t().contiguous())
