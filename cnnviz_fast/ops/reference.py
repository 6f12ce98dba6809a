"""Pure-PyTorch reference implementations of the ``cnnviz`` operators: the math only.

They are the fallback when the compiled extension ``cnnviz_fast._C`` is missing
(or ``CNNVIZ_FORCE_REFERENCE=1``) and the oracle the kernels are tested against.
Every function here takes the same arguments as its public counterpart in
:mod:`cnnviz_fast.ops` and returns the same result, but does not check them: the public
ops check once (:mod:`cnnviz_fast.ops._checks`) and then call the kernel or this code.
Gradients come from autograd (``guided_relu`` uses an ``autograd.Function`` for its
modified backward).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

IntPair = Union[int, Sequence[int]]

GUIDED_RELU_MODES = ("guided", "deconvnet", "plain")
MASK_MODES = ("deletion", "insertion")


def _as_pair(value: IntPair) -> Tuple[int, int]:
    # the public ops pass checked tuples; test oracles may pass a plain int
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _as_tensor(baseline, images: Tensor) -> Tensor:
    return torch.as_tensor(baseline, dtype=images.dtype, device=images.device)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- #
# occlusion
# --------------------------------------------------------------------------- #
def occlusion_grid(H: int, W: int, window: IntPair, stride: IntPair) -> Tuple[int, int]:
    """Number of window positions ``(rows, cols)``: ``rows = ceil((H - kh) / sh) + 1``."""
    kh, kw = _as_pair(window)
    sh, sw = _as_pair(stride)
    return -(-(H - kh) // sh) + 1, -(-(W - kw) // sw) + 1


def occlusion_window_bounds(
    H: int, W: int, window: IntPair, stride: IntPair, first: int = 0, count: int = None,
    device=None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clipped half-open bounds ``(r0, r1, c0, c1)`` (int64 tensors of length ``count``)
    of window positions ``first .. first+count-1`` (row-major: ``i = p // cols``)."""
    kh, kw = _as_pair(window)
    sh, sw = _as_pair(stride)
    rows, cols = occlusion_grid(H, W, (kh, kw), (sh, sw))
    if count is None:
        count = rows * cols - first
    p = torch.arange(first, first + count, device=device, dtype=torch.int64)
    r0 = torch.div(p, cols, rounding_mode="floor") * sh
    c0 = torch.remainder(p, cols) * sw
    # with stride > window the last window may start past the border (it is then empty)
    return r0.clamp_max(H), (r0 + kh).clamp_max(H), c0.clamp_max(W), (c0 + kw).clamp_max(W)


def occlusion_masks(
    H: int, W: int, window: IntPair, stride: IntPair, first: int = 0, count: int = None,
    device=None,
) -> Tensor:
    """Boolean masks ``Tensor[count, H, W]``, True inside window ``first + k``."""
    r0, r1, c0, c1 = occlusion_window_bounds(H, W, window, stride, first, count, device)
    hh = torch.arange(H, device=device)
    ww = torch.arange(W, device=device)
    rmask = (hh[None, :] >= r0[:, None]) & (hh[None, :] < r1[:, None])
    cmask = (ww[None, :] >= c0[:, None]) & (ww[None, :] < c1[:, None])
    return rmask[:, :, None] & cmask[:, None, :]


def occlude(
    images: Tensor, window: IntPair, stride: IntPair, baseline=0.0, first: int = 0, count: int = None
) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.occlude` (``torch.where`` over window masks)."""
    N, C, H, W = images.shape
    masks = occlusion_masks(H, W, window, stride, first, count, images.device)
    base = _as_tensor(baseline, images).expand(N, C, H, W)
    return torch.where(masks[None, :, None], base[:, None], images[:, None]).contiguous()


def occlusion_cover_counts(H: int, W: int, window: IntPair, stride: IntPair, device=None) -> Tensor:
    """``Tensor[H, W]`` (int64): how many windows of the grid cover each pixel (separable)."""
    kh, kw = _as_pair(window)
    sh, sw = _as_pair(stride)
    rows, cols = occlusion_grid(H, W, (kh, kw), (sh, sw))
    r0 = torch.arange(rows, device=device) * sh
    c0 = torch.arange(cols, device=device) * sw
    hh = torch.arange(H, device=device)
    ww = torch.arange(W, device=device)
    rc = ((hh[:, None] >= r0[None]) & (hh[:, None] < r0[None] + kh)).sum(1)
    cc = ((ww[:, None] >= c0[None]) & (ww[:, None] < c0[None] + kw)).sum(1)
    return rc[:, None] * cc[None, :]


def occlusion_accumulate(deltas: Tensor, H: int, W: int, window: IntPair, stride: IntPair) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.occlusion_accumulate` (difference array via
    ``index_add`` + two ``cumsum``; accumulation in float32, float64 for float64)."""
    acc = opmath_dtype(deltas.dtype)
    N = deltas.shape[0]
    r0, r1, c0, c1 = occlusion_window_bounds(H, W, window, stride, device=deltas.device)
    d = deltas.to(acc)
    W1 = W + 1
    diff = torch.zeros(N, (H + 1) * W1, dtype=acc, device=deltas.device)
    diff = diff.index_add(1, r0 * W1 + c0, d)
    diff = diff.index_add(1, r0 * W1 + c1, -d)
    diff = diff.index_add(1, r1 * W1 + c0, -d)
    diff = diff.index_add(1, r1 * W1 + c1, d)
    s = diff.view(N, H + 1, W1).cumsum(1).cumsum(2)[:, :H, :W]
    cnt = occlusion_cover_counts(H, W, window, stride, deltas.device).to(acc)
    out = torch.where(cnt > 0, s / cnt.clamp_min(1), torch.zeros((), dtype=acc, device=deltas.device))
    return out.to(deltas.dtype)


# --------------------------------------------------------------------------- #
# guided ReLU
# --------------------------------------------------------------------------- #
def _bound(upper: float, dtype: torch.dtype) -> float:
    # the bound as the tensor's dtype holds it (the kernels convert it the same way)
    return torch.tensor(upper, dtype=dtype).item()


def guided_relu_backward(grad: Tensor, out: Tensor, mode: str, upper: Optional[float] = None) -> Tensor:
    """The modified backward from the saved output: the linear range is ``0 < out < upper``
    (``out > 0`` iff ``input > 0``; ``out == upper`` iff ``input >= upper``)."""
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    below = True if upper is None or math.isinf(upper) else out < _bound(upper, out.dtype)
    if mode == "plain":
        return torch.where((out > 0) & below, grad, zero)
    if mode == "guided":
        return torch.where((out > 0) & below & (grad > 0), grad, zero)
    return torch.where(below & (grad > 0), grad, zero)  # deconvnet


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, mode: str, upper: Optional[float]) -> Tensor:
        return torch.relu(x) if upper is None else x.clamp(0, _bound(upper, x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mode, ctx.upper = inputs[1], inputs[2]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        return guided_relu_backward(grad, out, ctx.mode, ctx.upper), None, None


def guided_relu(x: Tensor, mode: str = "guided", upper: Optional[float] = None) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.guided_relu`."""
    return _GuidedReLU.apply(x, mode, upper)


# --------------------------------------------------------------------------- #
# Gram matrices
# --------------------------------------------------------------------------- #
def gram(features: Tensor) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.gram`: ``bmm(F, F^T) / S`` in float32/64 (upper
    triangle mirrored)."""
    N, C, S = features.shape[0], features.shape[1], math.prod(features.shape[2:])
    f = features.reshape(N, C, S).to(opmath_dtype(features.dtype))
    g = torch.bmm(f, f.transpose(1, 2))
    g = torch.triu(g) + torch.triu(g, 1).transpose(1, 2)  # exactly symmetric, like the kernels
    return (g / S).to(features.dtype)


def gram_loss_one(features: Tensor, target: Tensor, weight: float) -> Tensor:
    """One layer's ``weight * mean((G - T)^2)``."""
    N, C, S = features.shape[0], features.shape[1], math.prod(features.shape[2:])
    acc = opmath_dtype(features.dtype)
    if N == 0:
        return (features.sum() * 0 + target.sum() * 0).to(features.dtype)
    f = features.reshape(N, C, S).to(acc)
    g = torch.bmm(f, f.transpose(1, 2)) / S
    d = g - target.to(acc)
    return (weight * d.pow(2).mean()).to(features.dtype)


def gram_loss(features, target_gram, weight=1.0) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.gram_loss`: ``weight * mean((G - T)^2)``, summed
    over layers for lists."""
    if not isinstance(features, (list, tuple)):
        return gram_loss_one(features, target_gram, float(weight))
    weights = weight if isinstance(weight, (list, tuple)) else [weight] * len(features)
    total = None
    for f, t, w in zip(features, target_gram, weights):
        loss = gram_loss_one(f, t, float(w))
        total = loss if total is None else total + loss
    return total


# --------------------------------------------------------------------------- #
# progressive (rank-ordered) masking: deletion / insertion curves
# --------------------------------------------------------------------------- #
def progressive_grid(H: int, W: int, patch: IntPair = 1) -> Tuple[int, int]:
    """Cells ``(rows, cols)`` of the ranking grid: ``rows = ceil(H / ph)``."""
    ph, pw = _as_pair(patch)
    return -(-H // ph), -(-W // pw)


def ranks_from_order(order: Tensor, cells: int) -> Tensor:
    """``order[n]`` (cell indices, most important first) -> ``ranks[n, cell]`` (int64, 0 =
    most important; -1 for a cell missing from the row)."""
    order = order.long()
    ranks = torch.full_like(order, -1)
    return ranks.scatter_(1, order, torch.arange(cells, device=order.device).expand_as(order))


def progressive_baseline_mask(ranks: Tensor, counts, H: int, W: int, patch, insertion: bool) -> Tensor:
    """``Tensor[N, K, H, W]`` (bool): True where step k shows the baseline."""
    ph, pw = _as_pair(patch)
    rows, cols = progressive_grid(H, W, (ph, pw))
    hh = torch.arange(H, device=ranks.device) // ph
    ww = torch.arange(W, device=ranks.device) // pw
    pixel_rank = ranks[:, hh[:, None] * cols + ww[None, :]]  # [N, H, W]
    counts = torch.as_tensor(counts, dtype=torch.long, device=ranks.device).reshape(-1)
    top = pixel_rank[:, None] < counts[None, :, None, None]
    return top != insertion


def progressive_mask(images: Tensor, order: Tensor, counts, baseline=0.0, mode: str = "deletion", patch: IntPair = 1) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.progressive_mask` (``torch.where`` over K masks)."""
    H, W = images.shape[2:]
    ranks = ranks_from_order(order, math.prod(progressive_grid(H, W, patch)))
    return progressive_mask_ranks(images, ranks, counts, baseline, patch, mode == "insertion")


def progressive_mask_ranks(images: Tensor, ranks: Tensor, counts, baseline, patch: IntPair, insertion: bool) -> Tensor:
    """:func:`progressive_mask` from the ranks (the compiled op's arguments)."""
    N, C, H, W = images.shape
    at_base = progressive_baseline_mask(ranks, counts, H, W, patch, insertion)
    base = _as_tensor(baseline, images).expand(N, C, H, W)
    return torch.where(at_base[:, :, None], base[:, None], images[:, None]).contiguous()


# --------------------------------------------------------------------------- #
# RISE masks (Petsiuk et al. 2018) from a seed
# --------------------------------------------------------------------------- #
_U32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    # x * c mod 2^32 for x in [0, 2^32) held in int64, without signed overflow
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _U32


def hash32(x: Tensor) -> Tensor:
    """Chris Wellons' lowbias32 on int64 tensors holding 32-bit words (as in csrc/ops/common/rise_math.h)."""
    x = x & _U32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rise_geometry(H: int, W: int, grid, p: float):
    """``(gh, gw, cell_h, cell_w, up_h, up_w, threshold)`` of the masks (see :func:`rise_masks`)."""
    gh, gw = _as_pair(grid)
    cell_h, cell_w = -(-H // gh), -(-W // gw)
    return gh, gw, cell_h, cell_w, (gh + 1) * cell_h, (gw + 1) * cell_w, math.ceil(p * 16777216.0)


def _mask_keys(seed: int, first: int, count: int, device) -> Tensor:
    s = seed & 0xFFFFFFFFFFFFFFFF
    k0 = hash32(torch.tensor((s & _U32) ^ int(hash32(torch.tensor((s >> 32) ^ 0x9E3779B9))), dtype=torch.long))
    m = torch.arange(first, first + count, device=device, dtype=torch.long)
    return hash32(k0.to(device) ^ hash32(m + 0x85EBCA6B))


def _words(keys: Tensor, j: Tensor) -> Tensor:
    return hash32(keys[:, None] + _mul32(j[None, :] & _U32, 0x9E3779B9))


def rise_grids_and_shifts(seed: int, grid, p: float, H: int, W: int, first: int, count: int, device=None):
    """The random draws of masks ``first .. first+count-1``: ``(cells Tensor[count, gh, gw]
    (bool, on with probability p), dy Tensor[count] in [0, cell_h), dx Tensor[count] in
    [0, cell_w))``, each a counter-based hash of (seed, mask index, cell)."""
    gh, gw, cell_h, cell_w, _, _, threshold = rise_geometry(H, W, grid, p)
    keys = _mask_keys(seed, first, count, device)
    words = _words(keys, torch.arange(gh * gw + 2, device=device, dtype=torch.long))
    cells = (words[:, :gh * gw] >> 8) < threshold
    return cells.view(count, gh, gw), words[:, gh * gw] % cell_h, words[:, gh * gw + 1] % cell_w


def _taps(i: Tensor, n: int, up: int):
    num = (2 * i + 1) * n - up
    den = 2 * up
    q = torch.div(num, den, rounding_mode="floor")
    w1 = num - q * den

    def mirror(j):
        if n == 1:
            return torch.zeros_like(j)
        return torch.where(j < 0, -j, torch.where(j >= n, 2 * (n - 1) - j, j))
    return mirror(q), mirror(q + 1), den - w1, w1


def rise_masks(seed: int, grid, p: float, H: int, W: int, first: int = 0, count: int = 1,
               dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """RISE masks ``first .. first+count-1`` as ``Tensor[count, H, W]`` (materialised: the
    oracle of the kernels, which never store them).

    Mask m: the ``gh x gw`` grid of :func:`rise_grids_and_shifts` resized bilinearly to
    ``((gh + 1) * cell_h, (gw + 1) * cell_w)`` with ``cell = ceil(size / grid)`` (half-pixel
    centres, mirrored border: scikit-image's ``resize(order=1, mode="reflect")`` of the
    paper's code) and cropped at ``(dy, dx)``. Values are exact integer ratios rounded once
    (through float32 for float32 / float16 / bfloat16)."""
    gh, gw, cell_h, cell_w, up_h, up_w, _ = rise_geometry(H, W, grid, p)
    cells, dy, dx = rise_grids_and_shifts(seed, grid, p, H, W, first, count, device)
    y0, y1, wy0, wy1 = _taps(torch.arange(H, device=device)[None, :] + dy[:, None], gh, up_h)  # [count, H]
    x0, x1, wx0, wx1 = _taps(torch.arange(W, device=device)[None, :] + dx[:, None], gw, up_w)  # [count, W]
    m = torch.arange(count, device=device)[:, None, None]
    num = torch.zeros(count, H, W, dtype=torch.long, device=device)
    for ys, wy in ((y0, wy0), (y1, wy1)):
        for xs, wx in ((x0, wx0), (x1, wx1)):
            on = cells[m, ys[:, :, None], xs[:, None, :]]
            num = num + on * (wy[:, :, None] * wx[:, None, :])
    value = num.double() / float(4 * up_h * up_w)
    return value.to(opmath_dtype(dtype)).to(dtype)


def rise_mask(images: Tensor, seed: int, grid, p: float, first: int = 0, count: int = 1) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.rise_mask`: ``images[:, None] * masks[None, :, None]``."""
    N, C, H, W = images.shape
    masks = rise_masks(seed, grid, p, H, W, first, count, images.dtype, images.device)
    return (images[:, None] * masks[None, :, None]).contiguous()


def rise_accumulate(scores: Tensor, H: int, W: int, seed: int, grid, p: float, first: int = 0,
                    chunk: int = 64) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.rise_accumulate`: ``scores @ masks`` in chunks of masks."""
    N, count = scores.shape
    acc = opmath_dtype(scores.dtype)
    out = torch.zeros(N, H * W, dtype=acc, device=scores.device)
    s = scores.to(acc)
    for k0 in range(0, count, chunk):
        k1 = min(count, k0 + chunk)
        masks = rise_masks(seed, grid, p, H, W, first + k0, k1 - k0, acc, scores.device)
        out = out + s[:, k0:k1] @ masks.view(k1 - k0, H * W)
    return out.view(N, H, W).to(scores.dtype)


# --------------------------------------------------------------------------- #
# segment masking: coalitions of segments kept, the rest set to the baseline
# --------------------------------------------------------------------------- #
def output_layout(images: Tensor) -> torch.memory_format:
    """The masking ops' output layout: channels-last for channels-last images (an image that
    is both, e.g. C = 1, counts as contiguous), else contiguous."""
    if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def segment_keep_mask(segments: Tensor, keep: Tensor, rows: Tensor) -> Tensor:
    """``Tensor[R, H, W]`` (bool): True where row r shows the image (``keep[r, id]`` of the
    pixel's segment id in image ``rows[r]``); ids outside ``[0, K)`` show the baseline."""
    ids = segments[rows]  # [R, H, W]
    K = keep.shape[1]
    if K == 0:
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    kept = keep.gather(1, ids.clamp(0, K - 1).flatten(1)).view(ids.shape)
    return kept & (ids >= 0) & (ids < K)


def segment_mask(images: Tensor, segments: Tensor, keep: Tensor, rows: Tensor, baseline) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.segment_mask` (a gather and a ``torch.where``)."""
    N, C, H, W = images.shape
    kept = segment_keep_mask(segments, keep, rows)[:, None]
    base = _as_tensor(baseline, images)
    base = base.reshape(()) if base.numel() == 1 else base.expand(N, C, H, W)[rows]
    return torch.where(kept, images[rows], base).contiguous(memory_format=output_layout(images))
