"""Receptive fields: which input pixels a unit of a layer can see.

Computed analytically from one probe forward pass. A ``TorchFunctionMode`` sees every
torch operation (also functional ones such as ``out + identity`` or ``F.relu``, which
module hooks miss) and carries, for each tensor, the geometry of its units' receptive
fields along H and W: unit ``i`` sees input pixels ``[offset + i*stride, offset +
i*stride + size)``. Convolutions, poolings and padding transform the geometry;
elementwise ops (ReLU, batch norm, residual additions, channel concatenation, …) take
the union over their inputs, so a residual block gets the larger extent of its branches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core import forward_to_layers, get_layer, model_guard
from ..core.validation import is_int, model_device_dtype


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of the units of one layer, in input pixels, per axis ``(h, w)``.

    Unit ``(y, x)`` of the layer's output sees the input box ``rows [offset[0] + y*stride[0],
    … + size[0])``, ``cols [offset[1] + x*stride[1], … + size[1])``: ``offset`` is the
    input coordinate of the **top-left** pixel of unit (0, 0)'s field (negative where it
    reaches into zero padding); :attr:`center` gives its centre. A layer whose units see
    the whole input (a Linear layer after a flatten, or a global pooling) has
    ``size == input_size``, ``stride == (0, 0)`` and ``offset == (0, 0)``.
    ``output_size`` is the layer's spatial output size ``(h, w)`` (``(1, 1)`` for a
    non-spatial output ``[N, D]``).
    """

    size: Tuple[int, int]
    stride: Tuple[int, int]
    offset: Tuple[int, int]
    input_size: Tuple[int, int]
    output_size: Tuple[int, int]

    @property
    def center(self) -> Tuple[float, float]:
        """Input coordinate of the centre of unit (0, 0)'s field."""
        return tuple(o + (s - 1) / 2 for o, s in zip(self.offset, self.size))

    def box(self, y: int, x: int) -> Tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of unit ``(y, x)``'s field (bottom/right exclusive),
        not clipped to the image."""
        top = self.offset[0] + y * self.stride[0]
        left = self.offset[1] + x * self.stride[1]
        return top, left, top + self.size[0], left + self.size[1]

    def clipped_box(self, y: int, x: int) -> Tuple[int, int, int, int]:
        """:meth:`box` clipped to the input image."""
        top, left, bottom, right = self.box(y, x)
        height, width = self.input_size
        return max(top, 0), max(left, 0), min(bottom, height), min(right, width)


# Per-axis geometry of a tensor's units: (size, stride, offset).
_Axis = Tuple[int, int, int]
_GLOBAL = "global"            # every unit depends on the whole input
_UNSUPPORTED = "unsupported"  # spatial layout changed by an op we cannot model


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1])) if len(value) else (0, 0)
    return int(value), int(value)


def _argument(args, kwargs, position, name, default):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _window(geometry, kernel, stride, padding, dilation):
    """Geometry after a sliding window (convolution or pooling) along H and W."""
    out = []
    for (size, jump, offset), k, s, p, d in zip(geometry, kernel, stride, padding, dilation):
        out.append((size + d * (k - 1) * jump, jump * s, offset - p * jump))
    return tuple(out)


def _conv_rule(args, kwargs):
    weight = _argument(args, kwargs, 1, "weight", None)
    kernel = tuple(weight.shape[-2:])
    stride = _pair(_argument(args, kwargs, 3, "stride", 1))
    padding = _argument(args, kwargs, 4, "padding", 0)
    dilation = _pair(_argument(args, kwargs, 5, "dilation", 1))
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # PyTorch puts the odd extra pixel at the end
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return kernel, stride, _pair(padding), dilation


def _pool_rule(args, kwargs):
    kernel = _pair(_argument(args, kwargs, 1, "kernel_size", None))
    stride = _argument(args, kwargs, 2, "stride", None)
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    padding = _pair(_argument(args, kwargs, 3, "padding", 0))
    return kernel, stride, padding


def _max_pool_rule(args, kwargs):
    kernel, stride, padding = _pool_rule(args, kwargs)
    return kernel, stride, padding, _pair(_argument(args, kwargs, 4, "dilation", 1))


def _avg_pool_rule(args, kwargs):
    kernel, stride, padding = _pool_rule(args, kwargs)
    return kernel, stride, padding, (1, 1)


def _adaptive_rule(args, kwargs, in_size):
    out_size = _argument(args, kwargs, 1, "output_size", None)
    out_size = _pair(out_size)
    out_size = tuple(i if o is None else o for o, i in zip(out_size, in_size))
    if any(i % o for i, o in zip(in_size, out_size)):
        return None  # windows of unequal sizes: not a single affine geometry
    kernel = tuple(i // o for i, o in zip(in_size, out_size))
    return kernel, kernel, (0, 0), (1, 1)


_WINDOW_RULES = {
    torch.conv2d: _conv_rule,
    F.max_pool2d: _max_pool_rule, torch.max_pool2d: _max_pool_rule,
    F.max_pool2d_with_indices: _max_pool_rule,
    F.avg_pool2d: _avg_pool_rule,
}
_ADAPTIVE = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _GeometryTracer(TorchFunctionMode):
    """Attach a receptive-field geometry to every tensor computed from the probe input."""

    def __init__(self, probe: torch.Tensor):
        super().__init__()
        # id -> (tensor, geometry); the tensor is kept alive so its id stays unique.
        self.geometry: Dict[int, tuple] = {id(probe): (probe, ((1, 1, 0), (1, 1, 0)))}
        self.unsupported: list = []

    def of(self, tensor):
        entry = self.geometry.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        sources = [t for t in _tensors((args, kwargs)) if self.of(t) is not None]
        outputs = [t for t in _tensors(result)]
        if not sources or not outputs:
            return result
        geometry = self._propagate(func, args, kwargs, sources, outputs[0])
        for tensor in outputs:
            self.geometry[id(tensor)] = (tensor, geometry)
        return result

    def _propagate(self, func, args, kwargs, sources, output):
        name = getattr(func, "__name__", repr(func))
        geometries = [self.of(t) for t in sources]
        if _UNSUPPORTED in geometries:
            return _UNSUPPORTED
        if _GLOBAL in geometries:
            return _GLOBAL
        if output.dim() < 3:
            return _GLOBAL  # flatten, global reductions, linear layers: the whole input
        first = sources[0]
        if func in _WINDOW_RULES and self.of(args[0]) is not None:
            kernel, stride, padding, dilation = _WINDOW_RULES[func](args, kwargs)
            return _window(self.of(args[0]), kernel, stride, padding, dilation)
        if func in _ADAPTIVE:
            rule = _adaptive_rule(args, kwargs, tuple(first.shape[-2:]))
            if rule is None:
                self.unsupported.append(f"{name} with an output size that does not divide the input")
                return _UNSUPPORTED
            return _window(self.of(first), *rule)
        if func is F.pad and first is args[0]:
            pad = list(_argument(args, kwargs, 1, "pad", ())) + [0, 0, 0, 0]
            (hs, hj, ho), (ws, wj, wo) = self.of(first)
            return (hs, hj, ho - pad[2] * hj), (ws, wj, wo - pad[0] * wj)
        if all(tuple(t.shape[-2:]) == tuple(output.shape[-2:]) and t.dim() >= 3 for t in sources):
            return _union(geometries, name)
        self.unsupported.append(name)
        return _UNSUPPORTED


def _union(geometries, name):
    """Elementwise combination: the smallest field containing every input's field."""
    axes = []
    for axis in zip(*geometries):
        strides = {jump for _, jump, _ in axis}
        if len(strides) > 1:
            raise ValueError(f"cannot compute a receptive field through {name}: its inputs have "
                             f"different strides {sorted(strides)}")
        start = min(offset for _, _, offset in axis)
        end = max(offset + size for size, _, offset in axis)
        axes.append((end - start, strides.pop(), start))
    return tuple(axes)


def _input_size(input_size) -> Tuple[int, int, int]:
    size = tuple(input_size) if isinstance(input_size, (tuple, list, torch.Size)) else ()
    if len(size) != 3 or not all(is_int(v) and v >= 1 for v in size):
        raise ValueError(f"input_size must be (channels, height, width) of positive ints, got {input_size!r}")
    return size


def receptive_field(model: nn.Module, input_size: Sequence[int], layer: str) -> ReceptiveField:
    """Exact receptive field of the units of ``layer`` for inputs of ``input_size``.

    Args:
        model: the network (runs one forward pass of a zero image in eval mode, up to
            ``layer``; left as it was).
        input_size: ``(C, H, W)`` of one input.
        layer: dotted module name; its output ``[N, C, h, w]`` (or ``[N, D]``).

    Exact for chains of convolutions (any kernel, stride, padding, dilation), max/average
    pooling, adaptive pooling with an output size dividing the input, ``F.pad``, and
    elementwise ops (activations, normalisation, residual additions, channel
    concatenation): for a residual block it is the larger extent over the branches. Ops
    that rearrange the spatial layout (interpolation, spatial slicing, transposes of H and
    W) raise a ValueError naming the op; flips and rolls are not detected.

    Returns:
        :class:`ReceptiveField` (sizes, strides, top-left offset of unit (0, 0), per axis).
    """
    channels, height, width = _input_size(input_size)
    get_layer(model, layer)
    with model_guard(model):
        device, dtype = model_device_dtype(model)
        probe = torch.zeros(1, channels, height, width, device=device, dtype=dtype)
        tracer = _GeometryTracer(probe)
        with torch.inference_mode(), tracer:
            activation = forward_to_layers(model, probe, [layer])[layer]
        geometry = tracer.of(activation)
    if geometry is None:
        raise ValueError(f"layer {layer!r}: its output is not computed from the input by torch "
                         "operations (no receptive field)")
    if geometry == _UNSUPPORTED:
        raise ValueError(f"layer {layer!r}: cannot compute its receptive field through "
                         f"{', '.join(dict.fromkeys(tracer.unsupported))} (supported: convolutions, "
                         "poolings, padding and elementwise ops)")
    output_size = tuple(activation.shape[-2:]) if activation.dim() >= 3 else (1, 1)
    if geometry == _GLOBAL or activation.dim() < 3:
        return ReceptiveField((height, width), (0, 0), (0, 0), (height, width), output_size)
    (hs, hj, ho), (ws, wj, wo) = geometry
    return ReceptiveField((hs, ws), (hj, wj), (ho, wo), (height, width), output_size)
