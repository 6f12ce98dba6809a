"""Pure-PyTorch reference implementations of the ``cnnviz`` operators.

They are the fallback when the compiled extension ``cnnviz_fast._C`` is missing
(or ``CNNVIZ_FORCE_REFERENCE=1``) and the oracle the kernels are tested against.
Every function here takes the same arguments as its public counterpart in
:mod:`cnnviz_fast.ops` and returns the same result; gradients come from autograd
(``guided_relu`` uses an ``autograd.Function`` for its modified backward).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "GUIDED_RELU_MODES",
    "occlusion_grid",
    "occlusion_window_bounds",
    "occlusion_masks",
    "occlude",
    "occlusion_accumulate",
    "guided_relu",
    "guided_relu_backward",
    "gram",
    "gram_loss",
]

IntPair = Union[int, Sequence[int]]

GUIDED_RELU_MODES = ("guided", "deconvnet", "plain")


# --------------------------------------------------------------------------- #
# argument helpers (shared with the dispatching wrappers in __init__.py)
# --------------------------------------------------------------------------- #
def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {len(pair)} values")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {pair}")
    return pair


def _index(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_floating(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


# --------------------------------------------------------------------------- #
# occlusion
# --------------------------------------------------------------------------- #
def occlusion_grid(H: int, W: int, window: IntPair, stride: IntPair) -> Tuple[int, int]:
    """Number of window positions ``(rows, cols)`` of Captum's occlusion grid.

    ``rows = ceil((H - kh) / sh) + 1``, ``cols = ceil((W - kw) / sw) + 1``; the last
    window of a row/column may stick out of the image and is clipped at the border.
    """
    kh, kw = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    if H <= 0 or W <= 0:
        raise ValueError(f"image size (H, W) must be positive, got ({H}, {W})")
    if kh > H or kw > W:
        raise ValueError(f"window must fit in the image: window ({kh}, {kw}) > image ({H}, {W})")
    return -(-(H - kh) // sh) + 1, -(-(W - kw) // sw) + 1


def occlusion_window_bounds(
    H: int, W: int, window: IntPair, stride: IntPair, first: int = 0, count: int = None,
    device=None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clipped half-open bounds ``(r0, r1, c0, c1)`` (int64 tensors of length ``count``)
    of window positions ``first .. first+count-1`` (row-major: ``i = p // cols``)."""
    kh, kw = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
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


def _check_occlude_args(images, window, stride, first, count):
    _check_floating(images, "images")
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor [N, C, H, W], got {images.dim()}-D")
    H, W = images.shape[2], images.shape[3]
    if H == 0 or W == 0:
        raise ValueError(f"images must have a non-empty image plane, got H={H}, W={W}")
    rows, cols = occlusion_grid(H, W, window, stride)
    first = _index(first, "first")
    if first < 0:
        raise ValueError(f"first must be a non-negative int, got {first!r}")
    if count is None:
        count = rows * cols - first
    count = _index(count, "count")
    if count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if first + count > rows * cols:
        raise ValueError(
            f"first + count must be <= the number of window positions {rows}x{cols}={rows * cols}, "
            f"got first={first}, count={count}"
        )
    return count


def _baseline_tensor(baseline, images: Tensor) -> Tensor:
    """Scalar -> 0-dim tensor; tensor -> cast to images' dtype/device, checked broadcastable."""
    if isinstance(baseline, Tensor):
        if baseline.device != images.device:
            raise ValueError(
                f"baseline must be on the same device as images ({images.device}), got {baseline.device}"
            )
        try:
            if torch.broadcast_shapes(baseline.shape, images.shape) != images.shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"baseline must be broadcastable to images {tuple(images.shape)}, got {tuple(baseline.shape)}"
            ) from None
        if baseline.dim() > images.dim():
            raise ValueError(
                f"baseline must be broadcastable to images {tuple(images.shape)}, got {tuple(baseline.shape)}"
            )
        return baseline.to(images.dtype)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.tensor(float(baseline), dtype=images.dtype, device=images.device)
    raise TypeError(f"baseline must be a number or a Tensor, got {type(baseline).__name__}")


def occlude(
    images: Tensor, window: IntPair, stride: IntPair, baseline=0.0, first: int = 0, count: int = None
) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.occlude` (``torch.where`` over window masks)."""
    count = _check_occlude_args(images, window, stride, first, count)
    base = _baseline_tensor(baseline, images)
    N, C, H, W = images.shape
    masks = occlusion_masks(H, W, window, stride, first, count, images.device)
    base = base.expand(N, C, H, W)
    return torch.where(masks[None, :, None], base[:, None], images[:, None]).contiguous()


def _check_accumulate_args(deltas, H, W, window, stride):
    _check_floating(deltas, "deltas")
    if deltas.dim() != 2:
        raise ValueError(f"deltas must be a 2-D tensor [N, P], got {deltas.dim()}-D")
    for name, v in (("H", H), ("W", W)):
        if _index(v, name) <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    rows, cols = occlusion_grid(H, W, window, stride)
    if deltas.shape[1] != rows * cols:
        raise ValueError(
            f"deltas must have P = rows*cols = {rows}*{cols} = {rows * cols} columns for "
            f"H={H}, W={W}, window={window}, stride={stride}; got P={deltas.shape[1]}"
        )


def occlusion_cover_counts(H: int, W: int, window: IntPair, stride: IntPair, device=None) -> Tensor:
    """``Tensor[H, W]`` (int64): how many windows of the grid cover each pixel (separable)."""
    kh, kw = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
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
    _check_accumulate_args(deltas, H, W, window, stride)
    acc = _opmath_dtype(deltas.dtype)
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
def _check_mode(mode) -> None:
    if mode not in GUIDED_RELU_MODES:
        raise ValueError(f"mode must be one of {GUIDED_RELU_MODES}, got {mode!r}")


def _check_upper(upper) -> Optional[float]:
    """``upper`` as a float, or None for a plain ReLU (``+inf`` means no bound too)."""
    if upper is None:
        return None
    if isinstance(upper, bool) or not isinstance(upper, (int, float)):
        raise TypeError(f"upper must be None or a number > 0, got {upper!r}")
    if not upper > 0:  # also NaN
        raise ValueError(f"upper must be None or a number > 0, got {upper!r}")
    return None if math.isinf(upper) else float(upper)


def _bound(upper: float, dtype: torch.dtype) -> float:
    # the bound as the tensor's dtype holds it (the kernels convert it the same way)
    return torch.tensor(upper, dtype=dtype).item()


def guided_relu_backward(grad: Tensor, out: Tensor, mode: str, upper: Optional[float] = None) -> Tensor:
    """The modified backward from the saved output: the linear range is ``0 < out < upper``
    (``out > 0`` iff ``input > 0``; ``out == upper`` iff ``input >= upper``)."""
    _check_mode(mode)
    upper = _check_upper(upper)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    below = True if upper is None else out < _bound(upper, out.dtype)
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
    _check_floating(x, "x")
    _check_mode(mode)
    return _GuidedReLU.apply(x, mode, _check_upper(upper))


# --------------------------------------------------------------------------- #
# Gram matrices
# --------------------------------------------------------------------------- #
def _check_features(features: Tensor) -> Tuple[int, int, int]:
    _check_floating(features, "features")
    if features.dim() < 2:
        raise ValueError(f"features must be a tensor [N, C, *spatial], got {features.dim()}-D")
    N, C = features.shape[0], features.shape[1]
    S = math.prod(features.shape[2:])
    if S == 0:
        raise ValueError(f"features must have at least one spatial position, got shape {tuple(features.shape)}")
    return N, C, S


def gram(features: Tensor) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.gram`: ``bmm(F, F^T) / S`` in float32/64 (upper
    triangle mirrored)."""
    N, C, S = _check_features(features)
    f = features.reshape(N, C, S).to(_opmath_dtype(features.dtype))
    g = torch.bmm(f, f.transpose(1, 2))
    g = torch.triu(g) + torch.triu(g, 1).transpose(1, 2)  # exactly symmetric, like the kernels
    return (g / S).to(features.dtype)


def _check_target(features: Tensor, target: Tensor) -> None:
    _check_floating(target, "target_gram")
    N, C = features.shape[0], features.shape[1]
    if tuple(target.shape) not in ((N, C, C), (C, C)):
        raise ValueError(
            f"target_gram must have shape [N, C, C] = [{N}, {C}, {C}] or [C, C] = [{C}, {C}], "
            f"got {list(target.shape)}"
        )
    if target.device != features.device:
        raise ValueError(f"target_gram must be on the features' device ({features.device}), got {target.device}")


def _gram_loss_one(features: Tensor, target: Tensor, weight: float) -> Tensor:
    N, C, S = _check_features(features)
    _check_target(features, target)
    acc = _opmath_dtype(features.dtype)
    if N == 0:
        return (features.sum() * 0 + target.sum() * 0).to(features.dtype)
    f = features.reshape(N, C, S).to(acc)
    g = torch.bmm(f, f.transpose(1, 2)) / S
    d = g - target.to(acc)
    return (weight * d.pow(2).mean()).to(features.dtype)


def gram_loss(features, target_gram, weight=1.0) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.gram_loss`: ``weight * mean((G - T)^2)``."""
    if isinstance(features, (list, tuple)):
        return _sum_layers(_gram_loss_one, features, target_gram, weight)
    return _gram_loss_one(features, target_gram, gram_weight(weight))


def gram_weight(weight) -> float:
    """A layer's loss weight as a float: a finite real number (not a string or a bool)."""
    if isinstance(weight, Tensor) and weight.numel() == 1 and not weight.is_meta:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number (or a list of one per layer), got {weight!r}")
    return float(weight)


def _sum_layers(fn, features, targets, weights) -> Tensor:
    if not isinstance(targets, (list, tuple)) or len(targets) != len(features):
        raise ValueError("target_gram must be a list with one target per features tensor")
    if isinstance(weights, (list, tuple)):
        if len(weights) != len(features):
            raise ValueError(f"weight must have one value per layer ({len(features)}), got {len(weights)}")
    else:
        weights = [weights] * len(features)
    if len(features) == 0:
        raise ValueError("features must contain at least one tensor")
    total = None
    for f, t, w in zip(features, targets, weights):
        loss = fn(f, t, gram_weight(w))
        total = loss if total is None else total + loss
    return total


# --------------------------------------------------------------------------- #
# progressive (rank-ordered) masking: deletion / insertion curves
# --------------------------------------------------------------------------- #
__all__ += ["MASK_MODES", "progressive_grid", "ranks_from_order", "progressive_baseline_mask", "progressive_mask"]

MASK_MODES = ("deletion", "insertion")


def progressive_grid(H: int, W: int, patch: IntPair = 1) -> Tuple[int, int]:
    """Cells ``(rows, cols)`` of the ranking grid: ``ph x pw`` patches, ``rows = ceil(H / ph)``
    (the last row / column of patches is clipped at the border)."""
    ph, pw = _pair(patch, "patch")
    if H <= 0 or W <= 0:
        raise ValueError(f"image size (H, W) must be positive, got ({H}, {W})")
    return -(-H // ph), -(-W // pw)


def ranks_from_order(order: Tensor, cells: int) -> Tensor:
    """``order[n]`` (cell indices, most important first) -> ``ranks[n, cell]`` (int64, 0 =
    most important). Raises ValueError unless each row is a permutation of ``0..cells-1``."""
    if not isinstance(order, Tensor):
        raise TypeError(f"order must be a Tensor[N, cells], got {type(order).__name__}")
    if order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
        raise TypeError(f"order must be an integer tensor, got {order.dtype}")
    if order.dim() != 2 or order.shape[1] != cells:
        raise ValueError(f"order must have shape [N, {cells}] (one index per cell), got {tuple(order.shape)}")
    order = order.long()
    # value checks read the data: skipped while torch.compile traces (the kernels only compare ranks)
    checking = not torch.compiler.is_compiling()
    if checking and order.numel() and (int(order.min()) < 0 or int(order.max()) >= cells):
        raise ValueError(f"order must hold cell indices in [0, {cells}), got values outside")
    ranks = torch.full_like(order, -1)
    ranks.scatter_(1, order, torch.arange(cells, device=order.device).expand_as(order))
    if checking and ranks.numel() and int(ranks.min()) < 0:
        raise ValueError(f"order must hold a permutation of 0..{cells - 1} per image (an index repeats)")
    return ranks


def _check_counts(counts, cells: int):
    if isinstance(counts, Tensor):
        if counts.dim() != 1 or counts.is_floating_point() or counts.dtype == torch.bool:
            raise ValueError(f"counts must be a 1-D integer tensor or a sequence of ints, got {counts!r}")
        counts = counts.tolist()
    try:
        counts = [_index(c, "counts") for c in counts]
    except TypeError:
        raise TypeError(f"counts must be a sequence of ints, got {counts!r}") from None
    bad = [c for c in counts if not 0 <= c <= cells]
    if bad:
        raise ValueError(f"counts must lie in [0, {cells}] (the number of cells), got {bad}")
    return counts


def _check_progressive_args(images, order, counts, mode, patch):
    """-> (ranks, counts list, patch pair, insertion flag)."""
    _check_floating(images, "images")
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor [N, C, H, W], got {images.dim()}-D")
    N, _, H, W = images.shape
    if H == 0 or W == 0:
        raise ValueError(f"images must have a non-empty image plane, got H={H}, W={W}")
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    patch = _pair(patch, "patch")
    rows, cols = progressive_grid(H, W, patch)
    ranks = ranks_from_order(order, rows * cols)
    if ranks.shape[0] != N:
        raise ValueError(f"order must have one row per image ({N}), got {ranks.shape[0]}")
    if ranks.device != images.device:
        raise ValueError(f"order must be on the images' device {images.device}, got {ranks.device}")
    return ranks, _check_counts(counts, rows * cols), patch, mode == "insertion"


def progressive_baseline_mask(ranks: Tensor, counts, H: int, W: int, patch, insertion: bool) -> Tensor:
    """``Tensor[N, K, H, W]`` (bool): True where step k shows the baseline."""
    ph, pw = _pair(patch, "patch")
    rows, cols = progressive_grid(H, W, (ph, pw))
    hh = torch.arange(H, device=ranks.device) // ph
    ww = torch.arange(W, device=ranks.device) // pw
    pixel_rank = ranks[:, hh[:, None] * cols + ww[None, :]]  # [N, H, W]
    counts = torch.as_tensor(counts, dtype=torch.long, device=ranks.device).reshape(-1)
    top = pixel_rank[:, None] < counts[None, :, None, None]
    return top != insertion


def progressive_mask(images: Tensor, order: Tensor, counts, baseline=0.0, mode: str = "deletion", patch: IntPair = 1) -> Tensor:
    """Reference for :func:`cnnviz_fast.ops.progressive_mask` (``torch.where`` over K masks)."""
    ranks, counts, patch, insertion = _check_progressive_args(images, order, counts, mode, patch)
    base = _baseline_tensor(baseline, images)
    N, C, H, W = images.shape
    at_base = progressive_baseline_mask(ranks, counts, H, W, patch, insertion)
    return torch.where(at_base[:, :, None], base.expand(N, C, H, W)[:, None], images[:, None]).contiguous()
