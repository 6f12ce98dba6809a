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
``lil_matrix`` entry list per neighbour offset) with the unknowns numbered in a nested
dissection order of the pixel grid (lines of pixels that split it in halves, recursively,
numbered last), which the sparse LU (SuperLU, as pytorch-grad-cam's ``spsolve``) keeps in
symmetric mode: far less fill than its default column ordering on these grid graphs. The
grid is cut into 8 x 8 boxes by those lines; a box (or block of 2 x 2 boxes) whose pixels
are all removed leaves the system, its interior a fixed linear map of its ring of line
pixels (a Schur complement computed once per box size), so SuperLU factorises about half
the unknowns of a large removed region (the same solution to rounding). The
systems of all percentiles and images are solved in threads (SuperLU releases the GIL),
the noise drawn afterwards in pytorch-grad-cam's order, and the clean and imputed images
share channels-last forward passes.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core import model_guard
from ..core.layout import run_in_fast_layout
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


# Side of the boxes the pixel grid is cut into (one line of pixels between neighbouring
# boxes): the interior of a box (or 2 x 2 block of boxes) whose pixels are all removed is
# condensed out of the system by a precomputed Schur complement (see :func:`_system`). With
# single boxes only, 8 measured fastest of 6 / 8 / 10 / 12 / 16 at 224 x 224 (the interior's
# 49 pixels against its 32-pixel ring); the 2 x 2 blocks took 8% more off the solves.
BOX = 8


@functools.lru_cache(maxsize=16)
def _dissection_order(H: int, W: int) -> np.ndarray:
    """Nested dissection order of an ``H x W`` pixel grid (8-neighbour stencil): each
    rectangle is split across its longer side by one line of pixels, its two halves come
    first (recursively), the separating line last; rectangles of at most 16 pixels in
    row-major order. ``int64[H * W]``, a permutation of the flat pixel indices."""
    pieces = []
    stack = [(0, H, 0, W, False)]  # (y0, y1, x0, x1, separator?) in reverse emission order
    while stack:
        y0, y1, x0, x1, separator = stack.pop()
        h, w = y1 - y0, x1 - x0
        if h <= 0 or w <= 0:
            continue
        if separator or h * w <= 16 or (h < 3 and w < 3):
            pieces.append((np.arange(y0, y1)[:, None] * W + np.arange(x0, x1)[None, :]).ravel())
        elif h >= w:
            m = (y0 + y1) // 2
            stack += [(m, m + 1, x0, x1, True), (m + 1, y1, x0, x1, False), (y0, m, x0, x1, False)]
        else:
            m = (x0 + x1) // 2
            stack += [(y0, y1, m, m + 1, True), (y0, y1, m + 1, x1, False), (y0, y1, x0, m, False)]
    return np.concatenate(pieces)


@dataclass(frozen=True)
class _Boxes:
    """Inner boxes of one size ``s``: ``interior`` ``[B, (s-1)^2]`` / ``ring`` ``[B, 4 s]``, the
    flat pixel indices of each box and of the line pixels around it; ``T`` ``[4 s, (s-1)^2]``:
    an interior's imputed values from its ring's (``ring values @ T``); ``G`` ``[4 s, 4 s]``:
    what the interior adds to its ring's equations (the Schur complement term)."""

    interior: np.ndarray
    ring: np.ndarray
    T: np.ndarray
    G: np.ndarray


@dataclass(frozen=True)
class _Grid:
    """The box structure of an ``H x W`` grid cut by lines of pixels at rows and columns
    ``b * box - 1`` (b >= 1): box b spans rows ``b * box .. b * box + box - 2`` (the last one
    up to the border). ``order``: all pixels in a nested dissection order whose separators
    are these lines (box interiors first, each in :func:`_dissection_order`). ``boxes``: the
    inner boxes (touching no border), ``pairs``: the 2 x 2 blocks of them (boxes 2i+1, 2i+2
    on each axis) with the lines between them, ``pair_of``: each box's block in ``pairs``
    (-1: none)."""

    order: np.ndarray
    boxes: _Boxes
    pairs: _Boxes
    pair_of: np.ndarray


def _span(b0: int, b1: int, boxes: int, size: int, box: int) -> np.ndarray:
    """Pixel rows (or columns) of boxes ``b0 .. b1 - 1``, without the line closing the last."""
    return np.arange(b0 * box, size if b1 == boxes else b1 * box - 1)


def _inner_boxes(W: int, tops: np.ndarray, lefts: np.ndarray, side: int) -> _Boxes:
    """The ``(side - 2)^2`` boxes whose ring's top-left pixel is at ``tops x lefts``."""
    patch = np.arange(side)
    on_ring = np.zeros((side, side), dtype=bool)
    on_ring[[0, -1]] = on_ring[:, [0, -1]] = True
    inner_local, ring_local = np.flatnonzero(~on_ring), np.flatnonzero(on_ring)
    corner = (tops[:, None] * W + lefts[None, :]).ravel()
    pixels = corner[:, None] + (patch[:, None] * W + patch[None, :]).ravel()[None, :]
    # the patch's stencil: every interior pixel has its 8 neighbours inside the patch
    M = np.zeros((side * side, side * side))
    py, px = np.divmod(np.arange(side * side), side)
    for dy, dx, weight in NEIGHBOURS:
        y, x = py + dy, px + dx
        valid = (y >= 0) & (y < side) & (x >= 0) & (x < side)
        M[np.flatnonzero(valid), (y * side + x)[valid]] = weight
    M[inner_local, inner_local] = -1.0  # the full weights' sum
    A_ii, A_ir = M[np.ix_(inner_local, inner_local)], M[np.ix_(inner_local, ring_local)]
    T = -np.linalg.solve(A_ii, A_ir)
    G = M[np.ix_(ring_local, inner_local)] @ T
    return _Boxes(pixels[:, inner_local], pixels[:, ring_local], np.ascontiguousarray(T.T), (G + G.T) / 2)


@functools.lru_cache(maxsize=8)
def _grid(H: int, W: int, box: int) -> _Grid:
    ny, nx = -(-H // box), -(-W // box)
    pieces = []

    def middle(b0, b1):  # the split, on a line between two pairs (odd index) when one is near
        m = (b0 + b1) // 2
        if m % 2 == 0 and b1 - b0 > 2:
            m = m + 1 if m + 1 < b1 else m - 1
        return m

    def emit(by0, by1, bx0, bx1):  # the pixels of boxes [by0, by1) x [bx0, bx1), separators last
        if by1 - by0 == 1 and bx1 - bx0 == 1:
            ys, xs = _span(by0, by1, ny, H, box), _span(bx0, bx1, nx, W, box)
            local = _dissection_order(ys.size, xs.size)
            pieces.append((ys[local // xs.size] * W + xs[local % xs.size]))
        elif by1 - by0 >= bx1 - bx0:
            m = middle(by0, by1)
            emit(by0, m, bx0, bx1)
            emit(m, by1, bx0, bx1)
            pieces.append((m * box - 1) * W + _span(bx0, bx1, nx, W, box))
        else:
            m = middle(bx0, bx1)
            emit(by0, by1, bx0, m)
            emit(by0, by1, m, bx1)
            pieces.append(_span(by0, by1, ny, H, box) * W + (m * box - 1))

    emit(0, ny, 0, nx)
    by, bx = np.arange(1, ny - 1), np.arange(1, nx - 1)  # inner boxes (no border pixel in them or their ring)
    boxes = _inner_boxes(W, by * box - 1, bx * box - 1, box + 1)
    py, px = by[(by % 2 == 1) & (by + 1 < ny - 1)], bx[(bx % 2 == 1) & (bx + 1 < nx - 1)]
    pairs = _inner_boxes(W, py * box - 1, px * box - 1, 2 * box + 1)
    pair_y = np.where(np.isin(by - (by + 1) % 2, py), np.searchsorted(py, by - (by + 1) % 2), -1)
    pair_x = np.where(np.isin(bx - (bx + 1) % 2, px), np.searchsorted(px, bx - (bx + 1) % 2), -1)
    pair_of = np.where((pair_y[:, None] >= 0) & (pair_x[None, :] >= 0), pair_y[:, None] * px.size + pair_x[None, :], -1)
    return _Grid(np.concatenate(pieces), boxes, pairs, pair_of.ravel())


def _system(keep: np.ndarray, image: np.ndarray, box: int):
    """The imputation system of one image for ``keep`` ``bool[H, W]`` (False: impute) and
    ``image`` ``[C, H, W]`` float64: ``(A csc [u, u], b [u, C], unknown [u], condensed)``.
    Unknown i is pixel ``unknown[i]``, in the grid's nested dissection order.

    The interiors of inner boxes (and 2 x 2 blocks of them) with every pixel removed are not
    unknowns (``box=0``: none is): each is the fixed linear map ``T`` of its ring's values,
    so it only adds ``G`` (the same for every box of a size) to its ring pixels' equations,
    on the unknown ones' columns and, times the known ones' values, to the right-hand side.
    The system left is the exact Schur complement of the full one, symmetric and diagonally
    dominant like it, and far cheaper to factorise (a box is one dense block there, not a
    sparse sub-grid). ``condensed``: ``[(_Boxes, indices of the condensed ones)]`` (None
    without)."""
    from scipy.sparse import coo_matrix  # scipy comes with scikit-learn / scikit-image

    H, W = keep.shape
    C = image.shape[0]
    flat_keep = keep.ravel()
    values = image.reshape(C, -1)
    unknown_pixel = ~flat_keep
    condensed = grid = None
    if box:
        grid = _grid(H, W, box)
        # removed blocks of 2 x 2 boxes first, then removed boxes outside them
        full_pairs = np.flatnonzero(unknown_pixel[grid.pairs.interior].all(1))
        full_boxes = np.flatnonzero(unknown_pixel[grid.boxes.interior].all(1)
                                    & ~np.isin(grid.pair_of, full_pairs))
        condensed = [(grid.pairs, full_pairs), (grid.boxes, full_boxes)]
        condensed = [(kind, at) for kind, at in condensed if at.size] or None
        if condensed is not None:
            unknown_pixel = unknown_pixel.copy()
            for kind, at in condensed:
                unknown_pixel[kind.interior[at]] = False
    order = grid.order if grid is not None else _dissection_order(H, W)
    unknown = order[unknown_pixel[order]]
    u = unknown.size
    index = np.full(H * W, -1, dtype=np.int64)
    index[unknown] = np.arange(u)
    ys, xs = np.divmod(unknown, W)
    b = np.zeros((u, C))
    diagonal = np.zeros(u)
    rows, cols, data = [], [], []
    for dy, dx, weight in NEIGHBOURS:
        y, x = ys + dy, xs + dx
        valid = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        at = np.flatnonzero(valid)
        neighbour = y[valid] * W + x[valid]
        diagonal[at] -= weight
        known = flat_keep[neighbour]
        b[at[known]] -= weight * values[:, neighbour[known]].T
        column = index[neighbour]
        coupled = column >= 0  # an unknown of the system (not a condensed interior)
        rows.append(at[coupled])
        cols.append(column[coupled])
        data.append(np.full(int(coupled.sum()), weight))
    rows.append(np.arange(u))
    cols.append(np.arange(u))
    data.append(diagonal)
    for kind, which in condensed or ():
        ring = kind.ring[which]  # [F, R]
        at = index[ring]
        both = (at[:, :, None] >= 0) & (at[:, None, :] >= 0)
        rows.append(np.broadcast_to(at[:, :, None], both.shape)[both])
        cols.append(np.broadcast_to(at[:, None, :], both.shape)[both])
        data.append(np.broadcast_to(kind.G, both.shape)[both])
        known_values = values[:, ring] * flat_keep[ring]  # [C, F, R]
        # the ring's equations' known part (G is symmetric); einsum, not a BLAS call that would
        # start threads on the core the other solver thread holds
        moved = np.einsum("cfr,rs->cfs", known_values, kind.G)
        target = at >= 0
        for c in range(C):
            b[:, c] -= np.bincount(at[target], weights=moved[c][target], minlength=u)
    A = coo_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(u, u)).tocsc()
    return A, b, unknown, condensed


def _solved(keep: np.ndarray, image: np.ndarray, box: Optional[int] = None) -> np.ndarray:
    """The imputed pixels' values: ``float64[C, removed]`` in raster order of the pixels
    where ``keep`` is False (``image`` ``[C, H, W]`` float64)."""
    from scipy.sparse.linalg import splu, spsolve

    C, H, W = image.shape
    box = BOX if box is None else box
    A, b, unknown, condensed = _system(keep, image, box)
    # the unknowns come in nested dissection order: SuperLU keeps it (NATURAL) and, the
    # system being symmetric and diagonally dominant, pivots on the diagonal
    try:
        solution = splu(A, permc_spec="NATURAL", diag_pivot_thresh=0.0, options=dict(SymmetricMode=True)).solve(b)
    except RuntimeError:  # singular (a region with no kept pixel): spsolve's answer, as the anchor's
        A, b, unknown, condensed = _system(keep, image, 0)
        solution = spsolve(A, b).reshape(unknown.size, C)
    full = image.reshape(C, -1).copy()
    full[:, unknown] = solution.T
    for kind, which in condensed or ():
        full[:, kind.interior[which]] = np.einsum("cfr,ri->cfi", full[:, kind.ring[which]], kind.T)
    return full[:, ~keep.ravel()]


def _interpolated(image: Tensor, keep: np.ndarray, out: Optional[Tensor] = None,
                  box: Optional[int] = None) -> Tensor:
    """``image`` ``[C, H, W]`` (float32, CPU) with the pixels where ``keep`` is False replaced
    by the linear interpolation of their neighbours (no noise): ``Tensor[C, H * W]`` (written
    into ``out`` when given)."""
    C = image.shape[0]
    if out is None:
        out = torch.empty((C, keep.size), dtype=torch.float32)
    out.copy_(image.reshape(C, -1))
    if keep.all():
        return out
    out.numpy()[:, ~keep.ravel()] = _solved(keep, image.numpy().astype(np.float64), box)  # rounded to float32
    return out


def _add_noise(out: Tensor, keep: np.ndarray, noise: float, generator: Optional[torch.Generator]) -> Tensor:
    """``noise * randn(C, removed)`` added to the removed pixels of ``out`` ``[C, H * W]``, in
    raster order (pytorch-grad-cam's draw)."""
    if noise and not keep.all():
        removed = np.flatnonzero(~keep.ravel())
        draw = torch.randn((out.shape[0], removed.size), generator=generator)
        out.numpy()[:, removed] += (noise * draw).numpy()  # float32 sums, as torch's; numpy indexes faster
    return out


def noisy_linear_imputation(image: Tensor, keep: Tensor, noise: float = 0.01,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """``image`` ``[C, H, W]`` with the pixels where ``keep`` ``[H, W]`` is False replaced by
    the linear interpolation of their neighbours plus ``noise * randn`` (drawn as
    ``randn(C, removed)`` from ``generator``, the global one by default). float32 out."""
    C, H, W = image.shape
    keep_np = keep.detach().cpu().numpy().astype(bool)
    out = _interpolated(image.detach().float().cpu(), keep_np)
    return _add_noise(out, keep_np, noise, generator).reshape(C, H, W).to(image.device)


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
    inputs = checked_copy(inputs, model)
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
    pixels = inputs.detach().float().cpu()
    jobs = []  # (image, keep) in pytorch-grad-cam's order: order, percentile, image
    for order in ("lerf", "morf"):
        for p in percentiles:
            for n in range(N):
                values = 1 - maps_np[n] if order == "lerf" else maps_np[n]
                jobs.append((n, _thresholded(values, p).numpy()))
    # one batch: the clean images, then the imputed ones, written in place
    batch = torch.empty((N + len(jobs), C, H * W), dtype=torch.float32)
    batch[:N] = pixels.reshape(N, C, -1)
    imputed = batch[N:]
    workers = min(len(jobs), max(1, torch.get_num_threads()))
    # the solves in parallel, largest first (the threads finish together); the noise in order
    largest_first = sorted(range(len(jobs)), key=lambda j: -int((~jobs[j][1]).sum()))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda j: _interpolated(pixels[jobs[j][0]], jobs[j][1], imputed[j]), largest_first))
    for j, (_, keep) in enumerate(jobs):
        _add_noise(imputed[j], keep, noise, generator)
    P = len(percentiles)
    with model_guard(model), torch.no_grad():
        target = resolve(model, inputs, target)
        batch = batch.view(-1, C, H, W).to(device=inputs.device, dtype=inputs.dtype)
        if inputs.dtype != torch.float32:  # the clean rows as given, not rounded through float32
            batch[:N] = inputs
        image_of_row = torch.arange(N, device=inputs.device).repeat(2 * P + 1)
        out = torch.empty(batch.shape[0], dtype=torch.float64, device=inputs.device)
        for r0 in range(0, batch.shape[0], batch_size):
            r1 = min(batch.shape[0], r0 + batch_size)
            rows_tgt = rows_target(target, image_of_row[r0:r1], 1)
            out[r0:r1] = run_in_fast_layout(model, batch[r0:r1],
                                            lambda b: scores(model, b, rows_tgt, probability)).double()
    change = out[N:].view(2, P, N) - out[:N][None, None]
    return Road(percentiles, change[1].t().contiguous(), change[0].t().contiguous())
