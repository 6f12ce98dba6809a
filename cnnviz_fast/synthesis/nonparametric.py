"""Texture synthesis without a network, the traditional approach the Gram-matrix synthesis is
compared with: non-parametric sampling (Efros & Leung 1999, :func:`texture_efros_leung`) and
image quilting (Efros & Freeman 2001, :func:`texture_quilt`).

Both copy pixels of the source: each new pixel (or patch) is drawn at random among the
source neighbourhoods whose error against what is already synthesized lies within
``(1 + tolerance)`` of the best one. Errors against every source position are computed at
once on the source's device (CPU or CUDA) by expanding ``||a - b||² = a² - 2ab + b²``: the
``a²`` terms are box sums of the squared source, ``ab`` a convolution (quilting) or a matrix
product over unfolded windows (Efros–Leung). Every random draw comes from one CPU
``torch.Generator`` seeded by ``seed``: a seed gives the same texture on every run.

:func:`nearest_patch_distance` and :func:`shuffled_tiles` measure the result: how far each
patch of a texture is from its nearest source patch, and a baseline image of shuffled source
tiles to compare with.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.validation import check_int, check_number, is_int
from ._common import make_generator

Size = Union[int, Tuple[int, int]]

__all__ = ["nearest_patch_distance", "shuffled_tiles", "texture_efros_leung", "texture_quilt"]


# --- arguments ------------------------------------------------------------------------------

def _check_source(source, argument: str = "source") -> Tensor:
    """``Tensor[C, h, w]`` or ``[1, C, h, w]`` of pixels in [0, 1] → a float ``[C, h, w]``
    copy (float64 stays float64, other dtypes compute in float32)."""
    if not isinstance(source, Tensor):
        raise ValueError(f"{argument} must be a Tensor[C, h, w] or [1, C, h, w] of pixels, got "
                         f"{type(source).__name__}")
    if source.dim() == 4 and source.shape[0] == 1:
        source = source[0]
    if source.dim() != 3:
        raise ValueError(f"{argument} must be a Tensor[C, h, w] or [1, C, h, w] (one image), got shape "
                         f"{tuple(source.shape)}")
    if not source.is_floating_point():
        raise ValueError(f"{argument} must be a floating-point tensor of pixels in [0, 1], got {source.dtype}")
    if source.is_meta:
        raise ValueError(f"{argument} is a meta tensor (shape only, no values); pass a tensor with data")
    if source.numel() == 0:
        raise ValueError(f"{argument} must hold pixels, got shape {tuple(source.shape)}")
    if not bool(torch.isfinite(source).all()) or bool((source < 0).any()) or bool((source > 1).any()):
        raise ValueError(f"{argument} must be finite pixels in [0, 1], got values in "
                         f"[{float(source.min()):.3g}, {float(source.max()):.3g}]")
    dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    return source.detach().to(dtype).contiguous()


def _check_size(size) -> Tuple[int, int]:
    pair = (size, size) if is_int(size) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(is_int(v) and v >= 1 for v in pair):
        raise ValueError(f"size must be an int >= 1 or a pair (H, W) of them, got {size!r}")
    return pair


def _pick_among(candidates: Tensor, generator: torch.Generator) -> Tensor:
    """For each row of the boolean ``candidates [B, P]`` (at least one True per row), the
    column of one True chosen uniformly: a draw ``k`` per row on the CPU generator, then the
    k-th True found on the candidates' device (the same draws on every device)."""
    counts = candidates.sum(1)
    draws = torch.rand(candidates.shape[0], generator=generator, dtype=torch.float64)
    k = (draws.to(candidates.device) * counts).long().clamp_max(counts - 1)
    ranks = candidates.cumsum(1) - 1
    return (candidates & (ranks == k[:, None])).int().argmax(1)


def _within(errors: Tensor, tolerance: float, scale: Tensor) -> Tensor:
    """Positions whose error ``[B, P]`` is within ``(1 + tolerance)`` of each row's best.
    A floor of 1e-5 × ``scale [B, 1]`` (the template's own b² term, the size of the terms
    that cancel in a² - 2ab + b²) absorbs float32 rounding, so exact matches tie with each
    other however they rounded."""
    best = errors.min(1, keepdim=True)[0]
    return errors <= best * (1 + tolerance) + 1e-5 * scale + 1e-12


# --- image quilting --------------------------------------------------------------------------

class _StripErrors:
    """SSD between a template ``[C, a, b]`` and the source window at every patch position,
    for templates cut from a patch at offset ``(dy, dx)``: ``[rows, cols]``. The source's
    box sums of squares are computed once per template shape."""

    def __init__(self, pixels: Tensor, patch: int):
        self.pixels, self.patch = pixels, patch
        self.rows, self.cols = pixels.shape[1] - patch + 1, pixels.shape[2] - patch + 1
        self.squares = pixels.square().sum(0)[None, None]
        self.box = {}

    def __call__(self, template: Tensor, dy: int = 0, dx: int = 0) -> Tensor:
        a, b = template.shape[1:]
        if (a, b) not in self.box:
            self.box[a, b] = F.avg_pool2d(self.squares, (a, b), stride=1)[0, 0] * (a * b)
        cross = F.conv2d(self.pixels[None], template[None])[0, 0]
        window = (slice(dy, dy + self.rows), slice(dx, dx + self.cols))
        return (self.box[a, b] - 2 * cross)[window] + template.square().sum()


def _min_cut(error: np.ndarray) -> np.ndarray:
    """The minimum-error path from top to bottom through ``error [rows, width]`` (each
    step moves at most one column): the path's column in each row (dynamic programming)."""
    rows, width = error.shape
    total = error.copy()
    for r in range(1, rows):
        above = total[r - 1]
        left = np.concatenate(([np.inf], above[:-1]))
        right = np.concatenate((above[1:], [np.inf]))
        total[r] += np.minimum(np.minimum(left, above), right)
    path = np.empty(rows, dtype=np.int64)
    path[-1] = int(np.argmin(total[-1]))
    for r in range(rows - 2, -1, -1):
        c = path[r + 1]
        low = max(c - 1, 0)
        path[r] = low + int(np.argmin(total[r, low:c + 2]))
    return path


def _cut_mask(old: Tensor, new: Tensor, overlap: int) -> Tensor:
    """``[p, p]`` bool, True where the new patch is kept: right of the minimum-error vertical
    cut through the left ``overlap`` columns of ``old`` vs ``new`` ``[C, p, p]``."""
    error = (old[:, :, :overlap] - new[:, :, :overlap]).square().sum(0).double().cpu().numpy()
    path = torch.from_numpy(_min_cut(error)).to(old.device)
    return torch.arange(old.shape[2], device=old.device)[None, :] >= path[:, None]


def texture_quilt(source: Tensor, size: Size, patch: Optional[int] = None, overlap: Optional[int] = None,
                  seed: Optional[int] = 0, tolerance: float = 0.1) -> Tensor:
    """A new texture of ``size`` by image quilting (Efros & Freeman 2001).

    Square patches of the source are placed in raster order, each overlapping its left and
    upper neighbours by ``overlap`` pixels. Each patch is drawn at random among the source
    positions whose squared error over the overlap lies within ``(1 + tolerance)`` of the
    best, and joined along the minimum-error boundary cut (dynamic programming) through
    each overlap.

    Args:
        source: pixels in [0, 1], ``Tensor[C, h, w]`` or ``[1, C, h, w]`` (on CPU or CUDA:
            the work runs on its device).
        size: ``H`` or ``(H, W)`` of the new texture (any size; larger than the source is
            the usual case).
        patch: side of the square patches (default ``min(h, w) // 4``, at least 3 and at
            most 48): larger than the texture's elements.
        overlap: pixels shared with the neighbours, ``0 <= overlap < patch`` (default
            ``patch // 6``, at least 1, as in the paper); 0 places random patches side by
            side (the paper's baseline).
        seed: the random draws (first patch, choice among candidates); None: a fresh seed.
        tolerance: candidates lie within ``(1 + tolerance)`` of the best overlap error.

    Returns:
        ``Tensor[1, C, H, W]`` on the source's device, every pixel copied from the source
        (float32, or float64 for a float64 source). 256 px from a 128 px source (patch 32):
        0.2 s on one CPU core (benchmarks/bench_texture.py).
    """
    pixels = _check_source(source)
    height, width = _check_size(size)
    c, h, w = pixels.shape
    if patch is None:
        patch = max(3, min(48, min(h, w) // 4, min(h, w)))
    check_int(patch, "patch", minimum=1)
    if patch > min(h, w):
        raise ValueError(f"patch must be at most the source's side {min(h, w)} (source {h}×{w}), got {patch}")
    if overlap is None:
        overlap = max(1, patch // 6) if patch > 1 else 0
    check_int(overlap, "overlap", minimum=0)
    if overlap >= patch:
        raise ValueError(f"overlap must be smaller than patch={patch}, got {overlap}")
    check_number(tolerance, "tolerance")
    generator = make_generator(seed)

    step = patch - overlap
    blocks_y = max(1, math.ceil((height - overlap) / step))
    blocks_x = max(1, math.ceil((width - overlap) / step))
    canvas = pixels.new_zeros(c, blocks_y * step + overlap, blocks_x * step + overlap)
    strip_error = _StripErrors(pixels, patch)
    rows, cols = strip_error.rows, strip_error.cols  # patch positions in the source
    for by in range(blocks_y):
        for bx in range(blocks_x):
            y, x = by * step, bx * step
            old = canvas[:, y:y + patch, x:x + patch]
            left, top = bx > 0 and overlap > 0, by > 0 and overlap > 0
            if left or top:
                errors = pixels.new_zeros(rows, cols)
                if top:
                    errors += strip_error(old[:, :overlap, :])
                if left:  # below the top strip when there is one: the corner counted once
                    below = overlap if top else 0
                    errors += strip_error(old[:, below:, :overlap], dy=below)
                scale = old[:, :, :overlap].square().sum() + old[:, :overlap, :].square().sum()
                chosen = int(_pick_among(_within(errors.reshape(1, -1), tolerance, scale.reshape(1, 1)), generator))
            else:  # nothing to match: a position drawn uniformly
                chosen = int(torch.randint(rows * cols, (1,), generator=generator))
            py, px = divmod(chosen, cols)
            new = pixels[:, py:py + patch, px:px + patch]
            keep_new = torch.ones(patch, patch, dtype=torch.bool, device=pixels.device)
            if left:
                keep_new &= _cut_mask(old, new, overlap)
            if top:  # the same cut on the transposed patches: a horizontal path
                keep_new &= _cut_mask(old.transpose(1, 2), new.transpose(1, 2), overlap).T
            canvas[:, y:y + patch, x:x + patch] = torch.where(keep_new, new, old)
    return canvas[None, :, :height, :width].contiguous()


# --- non-parametric sampling (Efros & Leung) ------------------------------------------------

def texture_efros_leung(source: Tensor, size: Size, window: Size = 11, seed: Optional[int] = 0,
                        tolerance: float = 0.1, batch: int = 64) -> Tensor:
    """A new texture of ``size`` by non-parametric sampling (Efros & Leung 1999).

    The texture grows outwards from a random 3×3 seed patch of the source placed in the
    centre. Each step takes up to ``batch`` unfilled pixels on the boundary of the filled
    region, those with the most filled neighbours first (ties in random order), and gives
    each the centre pixel of a source window drawn at random among those whose
    Gaussian-weighted squared error over the pixel's filled neighbours (σ = side / 6.4)
    lies within ``(1 + tolerance)`` of the best. One step matches ``batch`` neighbourhoods
    against every source window in one matrix product; ``batch=1`` is the paper's
    pixel-by-pixel order, larger batches trade a little of it for speed (pixels of one
    step do not see each other).

    Args:
        source: pixels in [0, 1], ``Tensor[C, h, w]`` or ``[1, C, h, w]`` (CPU or CUDA).
        size: ``H`` or ``(H, W)`` of the new texture.
        window: odd side of the neighbourhood, or an ``(h, w)`` pair of them, at most the
            source's sides (larger than the texture's elements; the paper's 5–21).
        seed: the random draws; None: a fresh seed.
        tolerance: candidates lie within ``(1 + tolerance)`` of the best error (the paper's ε).
        batch: pixels filled per step.

    Returns:
        ``Tensor[1, C, H, W]`` on the source's device, every pixel copied from the source.
        Time grows with ``H·W`` × the source's windows; on one core of a shared AMD EPYC:
        0.35 s for 64 px and 1.9 s for 128 px from a 64 px source, 8 s for 128 px from a
        128 px source (benchmarks/bench_texture.py; ``batch=1``: 14x slower at 64 px).
    """
    pixels = _check_source(source)
    height, width = _check_size(size)
    c, h, w = pixels.shape
    win = (window, window) if is_int(window) else tuple(window) if isinstance(window, (tuple, list)) else ()
    if (len(win) != 2 or not all(is_int(v) and v >= 1 and v % 2 for v in win)
            or win[0] > h or win[1] > w):
        raise ValueError(f"window must be an odd int or an (h, w) pair of odd ints, at most the source's sides "
                         f"{h}×{w}, got {window!r}")
    check_number(tolerance, "tolerance")
    check_int(batch, "batch", minimum=1)
    generator = make_generator(seed)
    device, (wh, ww) = pixels.device, win
    hh, hw, area = wh // 2, ww // 2, wh * ww

    # every source window, flattened: [P, C·area], its squares summed over channels [P, area]
    windows = F.unfold(pixels[None], win)[0].T.contiguous()
    window_squares = windows.square().reshape(-1, c, area).sum(1)
    centres = windows.reshape(-1, c, area)[:, :, area // 2]  # [P, C]
    off_y, off_x = torch.arange(wh, device=device) - hh, torch.arange(ww, device=device) - hw
    gauss_y = torch.exp(-(off_y.to(pixels.dtype) ** 2) / (2 * (wh / 6.4) ** 2))
    gauss_x = torch.exp(-(off_x.to(pixels.dtype) ** 2) / (2 * (ww / 6.4) ** 2))
    gauss = (gauss_y[:, None] * gauss_x[None, :]).reshape(area)
    dy, dx = off_y[:, None].expand(wh, ww).reshape(area), off_x[None, :].expand(wh, ww).reshape(area)

    # the canvas with a margin of unknown pixels, so every window lies inside it
    canvas = pixels.new_zeros(c, height + 2 * hh, width + 2 * hw)
    known = torch.zeros(height + 2 * hh, width + 2 * hw, dtype=torch.bool, device=device)
    seed_h, seed_w = min(3, h, height), min(3, w, width)
    sy = int(torch.randint(h - seed_h + 1, (1,), generator=generator))
    sx = int(torch.randint(w - seed_w + 1, (1,), generator=generator))
    cy, cx = hh + (height - seed_h) // 2, hw + (width - seed_w) // 2
    canvas[:, cy:cy + seed_h, cx:cx + seed_w] = pixels[:, sy:sy + seed_h, sx:sx + seed_w]
    known[cy:cy + seed_h, cx:cx + seed_w] = True
    inside = torch.zeros_like(known)
    inside[hh:hh + height, hw:hw + width] = True
    remaining = height * width - seed_h * seed_w

    while remaining > 0:
        filled = known.to(pixels.dtype)[None, None]
        neighbours = F.avg_pool2d(filled, win, stride=1, padding=(hh, hw))[0, 0]  # share of known pixels
        touching = F.max_pool2d(filled, 3, stride=1, padding=1)[0, 0] > 0
        boundary = (inside & ~known & touching).flatten().nonzero()[:, 0]
        # most known neighbours first; ties in random order (a draw per boundary pixel)
        ties = torch.rand(len(boundary), generator=generator, dtype=torch.float64).to(device)
        key = neighbours.flatten()[boundary].double() * 2 + ties  # shares differ by >= 1/area, ties < 1
        take = boundary[key.topk(min(batch, len(boundary))).indices]
        ys, xs = take // known.shape[1], take % known.shape[1]
        rows, cols = ys[:, None] + dy[None, :], xs[:, None] + dx[None, :]  # [B, area]
        values = canvas[:, rows, cols].permute(1, 0, 2)  # [B, C, area]
        weights = known[rows, cols].to(pixels.dtype) * gauss  # [B, area]
        weighted = (values * weights[:, None, :]).reshape(len(take), -1)  # [B, C·area]
        own = (weighted * values.reshape(len(take), -1)).sum(1, keepdim=True)  # [B, 1]
        errors = weights @ window_squares.T - 2 * weighted @ windows.T + own  # [B, P]
        chosen = _pick_among(_within(errors, tolerance, own), generator)
        canvas[:, ys, xs] = centres[chosen].T
        known[ys, xs] = True
        remaining -= len(take)
    return canvas[None, :, hh:hh + height, hw:hw + width].contiguous()


# --- measuring a texture ----------------------------------------------------------------------

def nearest_patch_distance(image: Tensor, source: Tensor, patch: int = 7, stride: int = 1,
                           chunk: int = 1024) -> Tensor:
    """For each ``patch × patch`` window of ``image`` (every ``stride`` pixels), the mean
    squared difference per value to its nearest window of ``source`` (exact: against
    every source position): ``Tensor[Q]``, Q windows in raster order. Low everywhere
    means every part of the image is a plausible piece of the source.

    ``image`` and ``source``: ``[C, H, W]`` or ``[1, C, H, W]`` with the same C.
    """
    image, source = _check_source(image, "image"), _check_source(source)
    if image.shape[0] != source.shape[0]:
        raise ValueError(f"image has {image.shape[0]} channels but source has {source.shape[0]}")
    check_int(patch, "patch", minimum=1)
    check_int(stride, "stride", minimum=1)
    check_int(chunk, "chunk", minimum=1)
    if patch > min(*image.shape[1:], *source.shape[1:]):
        raise ValueError(f"patch must fit in image {tuple(image.shape[1:])} and source "
                         f"{tuple(source.shape[1:])}, got {patch}")
    queries = F.unfold(image[None].double(), patch, stride=stride)[0].T  # [Q, D]
    keys = F.unfold(source[None].to(image.device).double(), patch)[0].T  # [P, D]
    key_squares = keys.square().sum(1)
    best = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        d = q.square().sum(1, keepdim=True) - 2 * q @ keys.T + key_squares
        best.append(d.min(1)[0].clamp_min(0))
    return torch.cat(best) / queries.shape[1]


def shuffled_tiles(source: Tensor, size: Size, tile: int, seed: Optional[int] = 0) -> Tensor:
    """A baseline texture: the source cut into a grid of ``tile × tile`` tiles, laid out
    side by side in random order (repeating when more are needed) to fill ``size``;
    ``Tensor[1, C, H, W]``. Windows inside a tile match the source exactly, those across
    the seams do not."""
    pixels = _check_source(source)
    height, width = _check_size(size)
    check_int(tile, "tile", minimum=1)
    if tile > min(pixels.shape[1:]):
        raise ValueError(f"tile must be at most the source's side {min(pixels.shape[1:])}, got {tile}")
    generator = make_generator(seed)
    c, h, w = pixels.shape
    grid = pixels[:, :h // tile * tile, :w // tile * tile].reshape(c, h // tile, tile, w // tile, tile)
    tiles = grid.permute(1, 3, 0, 2, 4).reshape(-1, c, tile, tile)
    ny, nx = math.ceil(height / tile), math.ceil(width / tile)
    order = torch.cat([torch.randperm(len(tiles), generator=generator)
                       for _ in range(math.ceil(ny * nx / len(tiles)))])[:ny * nx].to(pixels.device)
    laid = tiles[order].reshape(ny, nx, c, tile, tile).permute(2, 0, 3, 1, 4).reshape(c, ny * tile, nx * tile)
    return laid[None, :, :height, :width].contiguous()
