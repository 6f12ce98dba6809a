"""Argument checks of the public ops (:mod:`cnnviz_fast.ops`).

Each check raises ``ValueError`` / ``TypeError`` naming the argument and returns the
argument normalised (pairs as tuples, ``count`` resolved, baselines as tensors, ...), so the
kernels and the references receive checked arguments and never check again. The ops
layer keeps its own checks: it must not import :mod:`cnnviz_fast.core`.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference

IntPair = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- #
# scalars and tensors
# --------------------------------------------------------------------------- #
def pair(value: IntPair, name: str) -> Tuple[int, int]:
    """An int or a pair of ints, both positive, as a tuple."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        result = (value, value)
    else:
        try:
            result = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(result) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {len(result)} values")
    if result[0] <= 0 or result[1] <= 0:
        raise ValueError(f"{name} must be positive, got {result}")
    return result


def index(value, name: str) -> int:
    """An int (anything with ``__index__``, not a bool)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def floating(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def images(x: Tensor) -> Tuple[int, int]:
    """A floating ``Tensor[N, C, H, W]`` with a non-empty image plane -> ``(H, W)``."""
    floating(x, "images")
    if x.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor [N, C, H, W], got {x.dim()}-D")
    H, W = x.shape[2], x.shape[3]
    if H == 0 or W == 0:
        raise ValueError(f"images must have a non-empty image plane, got H={H}, W={W}")
    return H, W


def baseline(value, images: Tensor) -> Tensor:
    """Scalar -> 0-dim tensor; tensor -> cast to images' dtype, checked broadcastable and on
    the images' device."""
    if isinstance(value, Tensor):
        if value.device != images.device:
            raise ValueError(f"baseline must be on the same device as images ({images.device}), got {value.device}")
        bad = ValueError(
            f"baseline must be broadcastable to images {tuple(images.shape)}, got {tuple(value.shape)}"
        )
        if value.dim() > images.dim():
            raise bad
        try:
            if torch.broadcast_shapes(value.shape, images.shape) != images.shape:
                raise bad
        except RuntimeError:
            raise bad from None
        return value.to(images.dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        if images.dtype.is_floating_point and math.isfinite(value) and abs(value) > torch.finfo(images.dtype).max:
            raise ValueError(f"baseline must be representable in the images' dtype {images.dtype}, got {value!r}")
        # torch.full, not torch.tensor: no host-to-device copy and stream sync on a GPU
        return torch.full((), value, dtype=images.dtype, device=images.device)
    raise TypeError(f"baseline must be a number or a Tensor, got {type(value).__name__}")


# --------------------------------------------------------------------------- #
# occlusion
# --------------------------------------------------------------------------- #
def occlusion_geometry(H: int, W: int, window: IntPair, stride: IntPair):
    """-> (window pair, stride pair); the window must fit in the ``H x W`` image."""
    kh, kw = pair(window, "window")
    stride = pair(stride, "stride")
    if H <= 0 or W <= 0:
        raise ValueError(f"image size (H, W) must be positive, got ({H}, {W})")
    if kh > H or kw > W:
        raise ValueError(f"window must fit in the image: window ({kh}, {kw}) > image ({H}, {W})")
    return (kh, kw), stride


def occlude_args(x: Tensor, window, stride, value, first, count):
    """-> (window, stride, baseline tensor, first, count)."""
    H, W = images(x)
    window, stride = occlusion_geometry(H, W, window, stride)
    rows, cols = reference.occlusion_grid(H, W, window, stride)
    first = index(first, "first")
    if first < 0:
        raise ValueError(f"first must be a non-negative int, got {first!r}")
    if count is None:
        count = rows * cols - first
    count = index(count, "count")
    if count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if first + count > rows * cols:
        raise ValueError(
            f"first + count must be <= the number of window positions {rows}x{cols}={rows * cols}, "
            f"got first={first}, count={count}"
        )
    return window, stride, baseline(value, x), first, count


def accumulate_args(deltas: Tensor, H, W, window, stride):
    """-> (H, W, window, stride)."""
    floating(deltas, "deltas")
    if deltas.dim() != 2:
        raise ValueError(f"deltas must be a 2-D tensor [N, P], got {deltas.dim()}-D")
    for name, v in (("H", H), ("W", W)):
        if index(v, name) <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    H, W = int(H), int(W)
    window_pair, stride_pair = occlusion_geometry(H, W, window, stride)
    rows, cols = reference.occlusion_grid(H, W, window_pair, stride_pair)
    if deltas.shape[1] != rows * cols:
        raise ValueError(
            f"deltas must have P = rows*cols = {rows}*{cols} = {rows * cols} columns for "
            f"H={H}, W={W}, window={window}, stride={stride}; got P={deltas.shape[1]}"
        )
    return H, W, window_pair, stride_pair


# --------------------------------------------------------------------------- #
# guided ReLU
# --------------------------------------------------------------------------- #
def mode(value) -> str:
    if value not in reference.GUIDED_RELU_MODES:
        raise ValueError(f"mode must be one of {reference.GUIDED_RELU_MODES}, got {value!r}")
    return value


def upper(value) -> Optional[float]:
    """``upper`` as a float, or None for a plain ReLU (``+inf`` means no bound too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"upper must be None or a number > 0, got {value!r}")
    if not value > 0:  # also NaN
        raise ValueError(f"upper must be None or a number > 0, got {value!r}")
    return None if math.isinf(value) else float(value)


# --------------------------------------------------------------------------- #
# Gram matrices
# --------------------------------------------------------------------------- #
def features(f: Tensor) -> Tuple[int, int, int]:
    """A floating ``Tensor[N, C, *spatial]`` with at least one position -> ``(N, C, S)``."""
    floating(f, "features")
    if f.dim() < 2:
        raise ValueError(f"features must be a tensor [N, C, *spatial], got {f.dim()}-D")
    N, C = f.shape[0], f.shape[1]
    S = math.prod(f.shape[2:])
    if S == 0:
        raise ValueError(f"features must have at least one spatial position, got shape {tuple(f.shape)}")
    return N, C, S


def target_gram(f: Tensor, target: Tensor) -> None:
    floating(target, "target_gram")
    N, C = f.shape[0], f.shape[1]
    if tuple(target.shape) not in ((N, C, C), (C, C)):
        raise ValueError(
            f"target_gram must have shape [N, C, C] = [{N}, {C}, {C}] or [C, C] = [{C}, {C}], "
            f"got {list(target.shape)}"
        )
    if target.device != f.device:
        raise ValueError(f"target_gram must be on the features' device ({f.device}), got {target.device}")
    if target.dtype != f.dtype:
        raise ValueError(f"target_gram must have the features' dtype {f.dtype}, got {target.dtype}")


def gram_weight(weight) -> float:
    """A layer's loss weight as a float: a finite real number (not a string or a bool)."""
    if isinstance(weight, Tensor) and weight.numel() == 1 and not weight.is_meta:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number (or a list of one per layer), got {weight!r}")
    return float(weight)


def gram_loss_layers(f, targets, weights) -> List[Tuple[Tensor, Tensor, float]]:
    """``gram_loss``'s arguments (one tensor or one list per argument) -> checked
    ``(features, target_gram, weight)`` per layer."""
    if not isinstance(f, (list, tuple)):
        layers = [(f, targets, weights)]
    else:
        if not isinstance(targets, (list, tuple)) or len(targets) != len(f):
            raise ValueError("target_gram must be a list with one target per features tensor")
        if isinstance(weights, (list, tuple)):
            if len(weights) != len(f):
                raise ValueError(f"weight must have one value per layer ({len(f)}), got {len(weights)}")
        else:
            weights = [weights] * len(f)
        if len(f) == 0:
            raise ValueError("features must contain at least one tensor")
        layers = list(zip(f, targets, weights))
    checked = []
    for layer_features, layer_target, layer_weight in layers:
        layer_weight = gram_weight(layer_weight)
        features(layer_features)
        target_gram(layer_features, layer_target)
        checked.append((layer_features, layer_target, layer_weight))
    return checked


# --------------------------------------------------------------------------- #
# progressive (rank-ordered) masking
# --------------------------------------------------------------------------- #
def progressive_geometry(H: int, W: int, patch: IntPair) -> Tuple[int, int]:
    """-> the patch pair; the image size must be positive."""
    patch = pair(patch, "patch")
    if H <= 0 or W <= 0:
        raise ValueError(f"image size (H, W) must be positive, got ({H}, {W})")
    return patch


def ranks(order: Tensor, cells: int) -> Tensor:
    """``order`` checked (integer ``[N, cells]``, a permutation per row) -> its ranks."""
    if not isinstance(order, Tensor):
        raise TypeError(f"order must be a Tensor[N, cells], got {type(order).__name__}")
    if order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
        raise TypeError(f"order must be an integer tensor, got {order.dtype}")
    if order.dim() != 2 or order.shape[1] != cells:
        raise ValueError(f"order must have shape [N, {cells}] (one index per cell), got {tuple(order.shape)}")
    # value checks read the data: skipped while torch.compile traces (the kernels only compare ranks)
    checking = not torch.compiler.is_compiling()
    if checking and order.numel() and (int(order.min()) < 0 or int(order.max()) >= cells):
        raise ValueError(f"order must hold cell indices in [0, {cells}), got values outside")
    result = reference.ranks_from_order(order, cells)
    if checking and result.numel() and int(result.min()) < 0:
        raise ValueError(f"order must hold a permutation of 0..{cells - 1} per image (an index repeats)")
    return result


def counts(values, cells: int) -> List[int]:
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"counts must be a 1-D integer tensor or a sequence of ints, got {values!r}")
        values = values.tolist()
    try:
        values = [index(c, "counts") for c in values]
    except TypeError:
        raise TypeError(f"counts must be a sequence of ints, got {values!r}") from None
    bad = [c for c in values if not 0 <= c <= cells]
    if bad:
        raise ValueError(f"counts must lie in [0, {cells}] (the number of cells), got {bad}")
    return values


def progressive_args(x: Tensor, order, steps, value, mask_mode, patch):
    """-> (ranks, counts list, baseline tensor, mode, patch pair)."""
    H, W = images(x)
    if mask_mode not in reference.MASK_MODES:
        raise ValueError(f"mode must be one of {reference.MASK_MODES}, got {mask_mode!r}")
    patch = progressive_geometry(H, W, patch)
    rows, cols = reference.progressive_grid(H, W, patch)
    order_ranks = ranks(order, rows * cols)
    if order_ranks.shape[0] != x.shape[0]:
        raise ValueError(f"order must have one row per image ({x.shape[0]}), got {order_ranks.shape[0]}")
    if order_ranks.device != x.device:
        raise ValueError(f"order must be on the images' device {x.device}, got {order_ranks.device}")
    return order_ranks, counts(steps, rows * cols), baseline(value, x), mask_mode, patch


# --------------------------------------------------------------------------- #
# RISE masks
# --------------------------------------------------------------------------- #
MAX_RISE_MASKS = 2**31


def seed(value) -> int:
    value = index(value, "seed")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"seed must fit in 64 bits (signed), got {value!r}")
    return value


def probability(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"p must be a number in (0, 1) (the probability of a cell being on), got {value!r}")
    return float(value)


def rise_geometry(H: int, W: int, grid, p, first, count) -> Tuple[Tuple[int, int], float, int, int]:
    """-> (grid pair, p, first, count); the grid must not exceed the image."""
    grid = pair(grid, "grid")
    if H <= 0 or W <= 0:
        raise ValueError(f"image size (H, W) must be positive, got ({H}, {W})")
    if grid[0] > H or grid[1] > W:
        raise ValueError(f"grid {grid} must not exceed the image ({H}, {W})")
    p = probability(p)
    first, count = index(first, "first"), index(count, "count")
    if first < 0:
        raise ValueError(f"first must be a non-negative int, got {first!r}")
    if count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if first + count > MAX_RISE_MASKS:
        raise ValueError(f"first + count must be <= 2^31 (mask indices), got {first + count}")
    return grid, p, first, count


def rise_mask_args(x: Tensor, seed_value, grid, p, first, count):
    """-> (seed, grid, p, first, count)."""
    H, W = images(x)
    return (seed(seed_value),) + rise_geometry(H, W, grid, p, first, count)


def rise_accumulate_args(scores: Tensor, H, W, seed_value, grid, p, first):
    """-> (H, W, seed, grid, p, first)."""
    floating(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor [N, count], got {scores.dim()}-D")
    for name, v in (("H", H), ("W", W)):
        if index(v, name) <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    grid, p, first, _ = rise_geometry(int(H), int(W), grid, p, first, scores.shape[1])
    return int(H), int(W), seed(seed_value), grid, p, first


# --------------------------------------------------------------------------- #
# segment masking
# --------------------------------------------------------------------------- #
def _integer(t, name: str, shape: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor{shape}, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.long()


def segment_mask_args(x: Tensor, segments, keep, rows, value, check_values: bool = True):
    """-> (segments int64, keep, rows int64, baseline tensor). ``check_values=False`` skips the
    checks that read the data (ids and rows in range: a host sync on a GPU)."""
    H, W = images(x)
    N = x.shape[0]
    segments = _integer(segments, "segments", "[N, H, W]")
    if tuple(segments.shape) != (N, H, W):
        raise ValueError(f"segments must have shape [N, H, W] = {[N, H, W]}, got {list(segments.shape)}")
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        got = keep.dtype if isinstance(keep, Tensor) else type(keep).__name__
        raise TypeError(f"keep must be a bool Tensor[R, K], got {got}")
    if keep.dim() != 2:
        raise ValueError(f"keep must be a 2-D tensor [R, K], got {keep.dim()}-D")
    R, K = keep.shape
    if rows is None:
        if R != N:
            raise ValueError(f"rows must be given unless keep has one row per image ({N}), got {R} rows")
        rows = torch.arange(N, device=x.device)
    rows = _integer(rows, "rows", "[R]")
    if tuple(rows.shape) != (R,):
        raise ValueError(f"rows must have shape [R] = [{R}] (the image of each row of keep), got {list(rows.shape)}")
    for name, t in (("segments", segments), ("keep", keep), ("rows", rows)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on the images' device {x.device}, got {t.device}")
    if check_values and not torch.compiler.is_compiling():
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= N):
            raise ValueError(f"rows must hold image indices in [0, {N}), got values outside")
        if segments.numel() and (int(segments.min()) < 0 or int(segments.max()) >= K):
            raise ValueError(f"segments must hold ids in [0, K) = [0, {K}) (K: keep's columns), got "
                             f"[{int(segments.min())}, {int(segments.max())}]")
    return segments, keep, rows, baseline(value, x)
