"""Incremental occlusion: recompute each layer only where an occluding window changed it.

An occluded image differs from the clean one inside the window only, and each layer's
output only inside that window's projective field. The model is captured once with
``torch.fx.symbolic_trace``; the clean image runs through the graph with every node's
output kept. The capture runs in this thread only (:func:`capture`): other threads see
nothing of it. A batch of window positions then runs node by node, each value being

- a :class:`Patch`: one rectangle per position (same size for all positions of the
  batch, different offsets) holding the recomputed values; outside it the node's
  output equals the clean one;
- a :class:`Full`: the whole output for every position ``[B, ...]``, once the changed
  region covers most of the map (``full_fraction``) or for an operator that has no
  rectangle rule (it runs as usual on the materialized inputs, so unknown operators
  are still computed exactly, just at full cost).

Rectangle rules: convolution (any kernel, stride, padding, dilation, groups), max and
average pooling (as convolutions over a patch gathered with the padding value), constant
padding (``F.pad``, and :func:`~cnnviz_fast.core.padding.pad_same` whose pads follow
the input's size: the rectangle shifts by the top/left pad), batch
norm in eval mode and pointwise activations (applied to the patch), and elementwise
sums/products/concatenation (on the union of the inputs' rectangles). A windowed
operator gathers, for all positions at once, its input patch (changed region plus halo)
with one ``index_select`` from the clean map with the positions' patches appended, and
runs once over the batch of patches without padding.

``field_cap`` (the approximate mode's projective-field threshold) caps every
rectangle at that fraction of the map's height and width: changes outside the cap are
dropped, so deep layers cost a fixed fraction of a full pass.

The rectangles' offsets live on the host whatever the device of the maps: their
arithmetic is a few integers per position, and reading them back from a GPU would stall
it between every two layers. Only the gather indices built from them travel to the device.
"""
from __future__ import annotations

import math
import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ...core.padding import pad_same, same_padding
from ...core.targets import Neuron, Target, select_scores

__all__ = ["IncrementalOcclusion", "FULL_FRACTION", "capture"]

# A windowed layer is computed on the whole map for every position once the changed
# rectangle covers more than this fraction of it: the gather/scatter overhead of a
# patch is no longer worth the saved arithmetic.
FULL_FRACTION = 0.6


# fx keeps its patches as one stack per process: two captures at once would restore each
# other's patches in the wrong order, so captures run one at a time (other calls do not wait).
_CAPTURE_LOCK = threading.Lock()


class _ThreadConfinedTracer(fx.Tracer):
    """``torch.fx.Tracer`` whose capture acts in the capturing thread only.

    While it traces, fx replaces ``nn.Module.__call__`` and ``nn.Module.__getattr__`` for
    the whole process (and wraps ``math`` functions in the globals of every module whose
    forward runs): a module called by another thread at that moment would be recorded
    into this graph, or fail ("module is not installed as a submodule"). Here the
    replaced methods hand every call from another thread straight to the original, and
    the function wrapping is offered to the capturing thread only; fx's remaining
    wrappers (``torch.fx.wrap``) act only on this capture's proxies, which no other
    thread holds. The cost for other threads during a capture: one Python call and a
    thread-id comparison per module call and attribute look-up.
    """

    def __init__(self):
        self._owner: Optional[int] = None  # the capturing thread, while it captures
        self._wrapped_ids: set = set()
        super().__init__()

    @property
    def _autowrap_function_ids(self) -> set:  # read by fx on every module call, from any thread
        return self._wrapped_ids if self._owner in (None, threading.get_ident()) else set()

    @_autowrap_function_ids.setter
    def _autowrap_function_ids(self, ids):
        self._wrapped_ids = set(ids)

    def trace(self, root, concrete_args=None):
        with _CAPTURE_LOCK:
            self._owner = threading.get_ident()
            try:
                return super().trace(root, concrete_args)
            finally:
                self._owner = None

    def call_module(self, m, forward, args, kwargs):
        if self._owner != threading.get_ident():
            return forward(*args, **kwargs)  # nn.Module.__call__ as it was
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._owner != threading.get_ident():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def capture(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, seen by no other thread (:class:`_ThreadConfinedTracer`).
    Raises what tracing raises (data-dependent control flow, unsupported Python)."""
    tracer = _ThreadConfinedTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@dataclass
class Patch:
    """Values of a node inside one rectangle per position: ``data[b]`` holds rows
    ``top[b] .. top[b] + h`` and columns ``left[b] .. left[b] + w`` of position ``b``'s
    map; elsewhere the map equals the clean one."""
    data: Tensor  # [B, C, h, w]
    top: Tensor   # [B] int64, on the host
    left: Tensor  # [B] int64, on the host


@dataclass
class Full:
    """The node's whole output for every position, ``[B, ...]``."""
    data: Any


_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout2d,  # identities in eval mode (the caller runs the model in eval mode)
)
_POINTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.gelu, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.mish, F.softplus, torch.clamp,
    torch.clip, torch.abs, torch.neg, torch.exp,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "contiguous",
    "hardtanh_",
}


def _is_pointwise(node: fx.Node, module: Optional[nn.Module]) -> bool:
    if node.op == "call_module":
        if isinstance(module, nn.BatchNorm2d):  # eval mode with running statistics: per-channel affine
            return module.running_mean is not None and not module.training
        return isinstance(module, _POINTWISE_MODULES)
    if node.op == "call_function":
        if node.target is F.dropout:  # an identity only when not training
            return node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is False
        return node.target in _POINTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _POINTWISE_METHODS


def _mutates_first_arg(node: fx.Node, module: Optional[nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    return node.op == "call_function" and node.kwargs.get("inplace", False) is True


@dataclass
class _Window:
    """A sliding-window operator as a function of its unpadded input patch."""
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]   # top, left (bottom/right padding follows from the output size)
    dilation: Tuple[int, int]
    pad_value: float
    apply: Callable[[Tensor], Tensor]  # runs the operator with zero padding
    macs_per_output: int = 0          # multiply-adds per output element (convolutions)


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _bind(args, kwargs, names, defaults):
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _conv_window(weight, bias, stride, padding, dilation, groups) -> Optional[_Window]:
    kernel = tuple(weight.shape[2:])
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": torch puts the odd pixel of padding at the bottom/right
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    padding = _pair(padding)
    macs = int(weight.shape[1]) * kernel[0] * kernel[1]

    def apply(x):
        return F.conv2d(x, weight, bias, stride, 0, dilation, groups)
    return _Window(kernel, stride, padding, dilation, 0.0, apply, macs)


def _max_pool_window(kernel, stride, padding, dilation, ceil_mode, return_indices) -> Optional[_Window]:
    if return_indices:
        return None
    kernel = _pair(kernel)
    stride = _pair(stride) if stride not in (None, []) else kernel
    padding, dilation = _pair(padding), _pair(dilation)

    def apply(x):  # windows past the bottom/right border read -inf (ceil_mode), as torch ignores them
        return F.max_pool2d(x, kernel, stride, 0, dilation)
    return _Window(kernel, stride, padding, dilation, -math.inf, apply)


def _avg_pool_window(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> Optional[_Window]:
    kernel = _pair(kernel)
    stride = _pair(stride) if stride not in (None, []) else kernel
    padding = _pair(padding)
    # the divisor must not depend on the window's place in the image
    if ceil_mode or divisor_override is not None or (not count_include_pad and padding != (0, 0)):
        return None

    def apply(x):
        return F.avg_pool2d(x, kernel, stride, 0)
    return _Window(kernel, stride, padding, (1, 1), 0.0, apply)


def _window_of(node: fx.Node, module: Optional[nn.Module], args, kwargs) -> Optional[_Window]:
    """The sliding-window description of a conv/pool node, or None."""
    if node.op == "call_module":
        m = module
        if type(m) is nn.Conv2d and m.padding_mode == "zeros":
            return _conv_window(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if type(m) is nn.MaxPool2d:
            return _max_pool_window(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
        if type(m) is nn.AvgPool2d:
            return _avg_pool_window(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                    m.divisor_override)
        return None
    if node.op != "call_function":
        return None
    if node.target is F.conv2d:
        b = _bind(args, kwargs, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                  dict(bias=None, stride=1, padding=0, dilation=1, groups=1))
        if isinstance(b["weight"], Tensor) and (b["bias"] is None or isinstance(b["bias"], Tensor)):
            return _conv_window(b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"], b["groups"])
    if node.target is F.max_pool2d:
        b = _bind(args, kwargs, ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                 "return_indices"],
                  dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False))
        return _max_pool_window(b["kernel_size"], b["stride"], b["padding"], b["dilation"], b["ceil_mode"],
                                b["return_indices"])
    if node.target is F.avg_pool2d:
        b = _bind(args, kwargs, ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override"],
                  dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None))
        return _avg_pool_window(b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"],
                                b["count_include_pad"], b["divisor_override"])
    return None


def _pad_offset(node: fx.Node, args, kwargs) -> Optional[Tuple[int, int]]:
    """``(top, left)``: how far a constant padding of the last two dimensions (``F.pad``
    with non-negative pads, :func:`pad_same`) shifts the map, or None. ``args[0]``: the
    clean input."""
    if node.op != "call_function":
        return None
    if node.target is pad_same:
        b = _bind(args, kwargs, ["x", "kernel_size", "stride", "dilation", "value"], dict(dilation=(1, 1)))
        (top, _), (left, _) = (same_padding(int(n), k, s, d) for n, k, s, d in
                               zip(b["x"].shape[-2:], b["kernel_size"], b["stride"], b["dilation"]))
        return top, left
    if node.target is F.pad:
        b = _bind(args, kwargs, ["input", "pad", "mode", "value"], dict(mode="constant"))
        pads = b["pad"]
        if b["mode"] != "constant" or len(pads) not in (2, 4) or any(not isinstance(p, int) or p < 0 for p in pads):
            return None  # other modes read the map; negative pads crop it
        return (pads[2] if len(pads) == 4 else 0), pads[0]
    return None


def _floor_div(a: Tensor, b: int) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _fit(lo: Tensor, hi: Tensor, n: int, cap: Optional[int]) -> Tuple[Tensor, int]:
    """One rectangle size for all positions covering ``[lo[b], hi[b])`` of a dimension of
    length ``n``, with its start per position kept inside ``[0, n)``; with ``cap`` the size
    is at most ``cap`` (centred on the span, dropping the rest)."""
    lo, hi = lo.clamp(0, n), hi.clamp(0, n)
    length = max(1, int((hi - lo).max()))
    if cap is not None and length > cap:
        start = _floor_div(lo + hi - cap, 2)
        length = cap
    else:
        start = lo
    return torch.minimum(start, torch.full_like(start, n - length)).clamp_min(0), min(length, n)


class IncrementalOcclusion:
    """Occluded-image scores from a traced model, recomputing only what each window changes.

    Use :meth:`build` (None when the model or target cannot run incrementally), then per
    image :meth:`clean` once and :meth:`scores` per batch of window positions.
    """

    def __init__(self, graph: fx.GraphModule, target: Target, end: fx.Node,
                 field_cap: Optional[float] = None, full_fraction: float = FULL_FRACTION):
        self.graph = graph
        self.target = target
        self.end = end
        self.nodes = [n for n in graph.graph.nodes if n.op != "output"]
        self.nodes = self.nodes[:self.nodes.index(end) + 1]
        self.modules = dict(graph.named_modules())
        self.field_cap = field_cap
        self.full_fraction = full_fraction
        self.channels_last = False  # whole-map layers on channels-last maps (chosen by the caller)
        self.macs_clean = 0        # multiply-adds of one clean forward pass (convs and linears)
        self.macs_incremental = 0  # multiply-adds spent by scores() so far
        self.positions = 0         # window positions computed by scores() so far
        self._cache: Dict[fx.Node, Any] = {}
        self._padded: Dict[tuple, Tensor] = {}

    @classmethod
    def build(cls, model: nn.Module, target: Target, **options) -> Optional["IncrementalOcclusion"]:
        """Trace ``model`` (a ``torch.fx.GraphModule``, such as the batch-norm-folded copy, is
        already a capture and is used as it is); None when it cannot be traced or ``target``
        reads a layer that is not a node of the traced graph (then use full recomputation)."""
        if isinstance(model, fx.GraphModule):
            graph = model
        else:
            try:
                graph = capture(model)
            except Exception:  # data-dependent control flow, unsupported Python: not capturable
                return None
        nodes = list(graph.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if not placeholders or any(not n.args for n in placeholders[1:]):
            return None  # more than one required input
        if isinstance(target, Neuron):
            ends = [n for n in nodes if n.op == "call_module" and n.target == target.layer]
            ends = ends or _module_output(nodes, target.layer)
        else:
            output = next(n for n in nodes if n.op == "output")
            ends = [output.args[0]] if isinstance(output.args[0], fx.Node) else []
        if not ends:
            return None
        return cls(graph, target, ends[0], **options)

    # ------------------------------------------------------------------ clean pass
    def clean(self, image: Tensor, baseline: Tensor, target: Target) -> Tensor:
        """Run one clean image ``[1, C, H, W]`` through the graph, keep every node's output,
        and return the score of ``target`` (this image's target) on it (``Tensor[1]``).
        ``baseline``: broadcastable to the image."""
        self.target = target
        self._cache.clear()
        self._padded.clear()
        self.image, self.baseline = image, baseline.expand_as(image)
        self.macs_clean = 0
        for node in self.nodes:
            self._cache[node] = self._run_clean(node, image)
        return self._score(self._cache[self.end])

    def _run_clean(self, node: fx.Node, image: Tensor):
        if node.op == "placeholder":
            return image if node is self.nodes[0] else node.args[0]
        if node.op == "get_attr":
            return _fetch_attr(self.graph, node.target)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self._cache[n])
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if _mutates_first_arg(node, module) and isinstance(args[0], Tensor):
            args = (args[0].clone(),) + tuple(args[1:])  # keep the cached input as it was
        out = _call(node, module, args, kwargs)
        self.macs_clean += _macs(node, module, args, kwargs, out)
        return out

    def _score(self, output) -> Tensor:
        if isinstance(self.target, Neuron):
            return self.target.value(output)
        return select_scores(output, self.target)

    # ------------------------------------------------------------------ occluded passes
    def scores(self, r0: Tensor, r1: Tensor, c0: Tensor, c1: Tensor, labels: Optional[Tensor] = None,
               ids: Optional[Tensor] = None) -> Tensor:
        """Target scores ``Tensor[B]`` of the clean image occluded at windows ``[r0, r1) x
        [c0, c1)`` (int64 tensors ``[B]``; the windows of :func:`occlusion_window_bounds`,
        best on the host). With ``labels`` (a label map ``LongTensor[H, W]``) and ``ids``
        (``LongTensor[B]``), only the pixels of segment ``ids[b]`` take the baseline, the
        window being that segment's bounding box."""
        B = r0.numel()
        r0, r1, c0, c1 = (t.cpu() for t in (r0, r1, c0, c1))
        _, C, H, W = self.image.shape
        kh, kw = int((r1 - r0).max().clamp_min(1)), int((c1 - c0).max().clamp_min(1))
        top, th = _fit(r0, r0 + kh, H, None)
        left, tw = _fit(c0, c0 + kw, W, None)
        rows = top[:, None] + torch.arange(th)
        cols = left[:, None] + torch.arange(tw)
        window = Patch(None, top, left)
        if labels is None:
            inside = (((rows >= r0[:, None]) & (rows < r1[:, None]))[:, :, None]
                      & ((cols >= c0[:, None]) & (cols < c1[:, None]))[:, None, :])
        else:  # the segment's own pixels within its box
            inside = labels[rows[:, :, None], cols[:, None, :]] == ids.cpu()[:, None, None]
        occluded = torch.where(_to_device(inside[:, None], self.image.device),
                               self._gather(self.baseline, None, window, th, tw, 0.0),
                               self._gather(self.image, None, window, th, tw, 0.0))
        values: Dict[fx.Node, Any] = {}
        for node in self.nodes:
            if node.op == "placeholder" and node is self.nodes[0]:
                values[node] = Patch(occluded, top, left)
            elif node.op in ("placeholder", "get_attr") or not _depends_on(node, values):
                values[node] = None  # the clean value (a constant)
            else:
                values[node] = self._run(node, values, B)
        self.positions += B
        out = values[self.end]
        return self._score(self._materialize(self.end, out, B))

    def _run(self, node: fx.Node, values: Dict[fx.Node, Any], B: int):
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if not any(isinstance(values.get(n), Full) for n in node.all_input_nodes):
            patch = self._run_patch(node, module, values)
            if patch is not None:
                return patch
        if node.op == "call_method" and node.target == "size" or (
                node.op == "call_function" and node.target is getattr and node.args[1] == "shape"):
            size = torch.Size((B,) + tuple(self._cache[node.args[0]].shape[1:]))
            dim = node.args[1] if node.op == "call_method" and len(node.args) > 1 else node.kwargs.get("dim")
            return Full(size if dim is None or node.op != "call_method" else size[dim])
        owned = {n for n in node.all_input_nodes if len(n.users) == 1}
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self._full_arg(n, values, B))
        if _mutates_first_arg(node, module) and isinstance(node.args[0], fx.Node) and node.args[0] not in owned:
            args = (args[0].clone(),) + tuple(args[1:])
        out = _call(node, module, args, kwargs)
        self.macs_incremental += _macs(node, module, args, kwargs, out)
        return Full(out)

    def _full_arg(self, node: fx.Node, values, B: int):
        value = values.get(node)
        if value is None:
            return self._cache[node]
        return self._materialize(node, value, B)

    def _materialize(self, node: fx.Node, value, B: int):
        """The whole map ``[B, ...]`` of a node's value."""
        if isinstance(value, Full):
            return value.data
        clean = self._cache[node]
        if value is None:
            return clean.expand(B, *clean.shape[1:]) if isinstance(clean, Tensor) else clean
        _, C, h, w = value.data.shape
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        out = clean.expand(B, *clean.shape[1:]).clone(memory_format=layout)
        b = torch.arange(B)[:, None, None]
        rows = (value.top[:, None] + torch.arange(h))[:, :, None]
        cols = (value.left[:, None] + torch.arange(w))[:, None, :]
        b, rows, cols = (_to_device(t, out.device) for t in (b, rows, cols))
        out.permute(0, 2, 3, 1)[b, rows, cols] = value.data.permute(0, 2, 3, 1)
        return out

    def _run_patch(self, node: fx.Node, module, values) -> Optional[Patch]:
        """The node's output as a Patch, or None when it has no rectangle rule here."""
        clean_out = self._cache[node]
        if not isinstance(clean_out, Tensor) or clean_out.dim() != 4:
            return None
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(n))
        others = [n for n in node.all_input_nodes if n is not node.args[0]]
        if (node.op in ("call_module", "call_function") and args and isinstance(args[0], _Ref)
                and not any(values.get(n) is not None for n in others)):  # weights must not change
            constants = fx.node.map_arg((node.args[1:], node.kwargs), lambda n: self._cache[n])
            window = _window_of(node, module, (None,) + tuple(constants[0]), constants[1])
            if window is not None:
                return self._run_window(node, args[0].node, window, values)
            offset = _pad_offset(node, (self._cache[args[0].node],) + tuple(constants[0]), constants[1])
            x = values.get(args[0].node)
            if offset is not None and isinstance(x, Patch):  # the changed rectangle moves with the map
                return Patch(x.data, x.top + offset[0], x.left + offset[1])
        if _is_pointwise(node, module):
            return self._run_pointwise(node, module, values)
        if node.op == "call_function" and node.target is torch.cat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim in (1, -3) and all(isinstance(t, fx.Node) for t in tensors):
                return self._run_elementwise(node, list(tensors), values,
                                             lambda patches: torch.cat(patches, 1))
        return None

    def _run_window(self, node: fx.Node, source: fx.Node, op: _Window, values) -> Optional[Patch]:
        x = values.get(source)
        clean_in, clean_out = self._cache[source], self._cache[node]
        if not isinstance(x, Patch) or not isinstance(clean_in, Tensor) or clean_in.dim() != 4:
            return None
        H, W = clean_out.shape[2:]
        h, w = x.data.shape[2:]
        spans = []
        for lo, size, n, k, s, p, d in zip((x.top, x.left), (h, w), (H, W), op.kernel, op.stride, op.padding,
                                           op.dilation):
            # outputs o reading an input in [lo, lo + size): o*s - p + j*d in that range for some j
            first = -_floor_div(-(lo + p - (k - 1) * d), s)
            last = _floor_div(lo + size - 1 + p, s)
            cap = None if self.field_cap is None else max(1, math.ceil(self.field_cap * n))
            spans.append(_fit(first, last + 1, n, cap))
        (top, oh), (left, ow) = spans
        if self.field_cap is None and oh * ow > self.full_fraction * H * W:
            return None
        ih = (oh - 1) * op.stride[0] + (op.kernel[0] - 1) * op.dilation[0] + 1
        iw = (ow - 1) * op.stride[1] + (op.kernel[1] - 1) * op.dilation[1] + 1
        region = Patch(None, top * op.stride[0] - op.padding[0], left * op.stride[1] - op.padding[1])
        patch = self._gather(clean_in, x, region, ih, iw, op.pad_value, key=source)
        out = op.apply(patch)
        self.macs_incremental += out.numel() * op.macs_per_output
        return Patch(out, top, left)

    def _run_pointwise(self, node: fx.Node, module, values) -> Optional[Patch]:
        inputs = [n for n in node.all_input_nodes if values.get(n) is not None]
        clean_out = self._cache[node]
        for n in node.all_input_nodes:
            v = self._cache[n]
            if not isinstance(v, Tensor):
                continue
            if values.get(n) is not None:  # changes with the window: the same map as the output
                if v.shape != clean_out.shape:
                    return None
            elif v.dim() >= 2 and v.shape[-2:] != (1, 1) or v.dim() < 2 and v.numel() != 1:
                return None  # a constant that varies over the map

        def apply(patches):
            lookup = dict(zip(inputs, patches))
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: lookup.get(n, self._cache[n]))
            if _mutates_first_arg(node, module) and isinstance(node.args[0], fx.Node) and (
                    len(node.args[0].users) > 1 or values.get(node.args[0]) is None):
                args = (args[0].clone(),) + tuple(args[1:])
            return _call(node, module, args, kwargs)
        return self._run_elementwise(node, inputs, values, apply)

    def _run_elementwise(self, node: fx.Node, inputs: List[fx.Node], values, apply) -> Optional[Patch]:
        """``apply`` on the inputs' values over the union of their rectangles."""
        patches = [values.get(n) for n in inputs]
        changed = [p for p in patches if p is not None]
        if not changed or any(not isinstance(p, Patch) for p in changed):
            return None
        H, W = self._cache[node].shape[2:]
        if all(p.data.shape[2:] == changed[0].data.shape[2:] and p.top is changed[0].top and p.left is changed[0].left
               for p in changed):
            top, left, (h, w) = changed[0].top, changed[0].left, changed[0].data.shape[2:]
        else:
            top, h = _fit(torch.stack([p.top for p in changed]).amin(0),
                          torch.stack([p.top + p.data.shape[2] for p in changed]).amax(0), H, None)
            left, w = _fit(torch.stack([p.left for p in changed]).amin(0),
                           torch.stack([p.left + p.data.shape[3] for p in changed]).amax(0), W, None)
        region = Patch(None, top, left)
        aligned = []
        for n, p in zip(inputs, patches):
            if p is not None and p.top is top and p.left is left and p.data.shape[2:] == (h, w):
                aligned.append(p.data)
            else:
                aligned.append(self._gather(self._cache[n], p, region, h, w, 0.0, key=n))
        return Patch(apply(aligned), top, left)

    def _gather(self, clean: Tensor, patch: Optional[Patch], region: Patch, h: int, w: int, pad_value: float,
                key=None) -> Tensor:
        """Rows ``region.top[b] + [0, h)`` and columns ``region.left[b] + [0, w)`` of each
        position's map (``clean [1, C, H, W]`` with ``patch`` written in), reading
        ``pad_value`` outside the map: ``Tensor[B, C, h, w]`` (channels-last strides)."""
        C, H, W = clean.shape[1:]
        top, left = region.top, region.left
        B = top.numel()
        pads = (max(0, -int(left.min())), max(0, int(left.max()) + w - W),
                max(0, -int(top.min())), max(0, int(top.max()) + h - H))
        cache_key = (key, pads, pad_value)
        source = self._padded.get(cache_key) if key is not None else None
        if source is None:
            padded = F.pad(clean, pads, value=pad_value) if any(pads) else clean
            source = padded[0].permute(1, 2, 0).reshape(-1, C)
            if key is not None:
                self._padded[cache_key] = source
        Wp = W + pads[0] + pads[1]
        rows = top[:, None] + torch.arange(h)  # [B, h], unpadded coordinates
        cols = left[:, None] + torch.arange(w)
        index = (rows + pads[2])[:, :, None] * Wp + (cols + pads[0])[:, None, :]
        if patch is not None:
            ph, pw = patch.data.shape[2:]
            pr, pc = rows - patch.top[:, None], cols - patch.left[:, None]
            inside = ((pr >= 0) & (pr < ph))[:, :, None] & ((pc >= 0) & (pc < pw))[:, None, :]
            offset = source.shape[0] + torch.arange(B)[:, None, None] * (ph * pw)
            index = torch.where(inside, offset + pr[:, :, None] * pw + pc[:, None, :], index)
            source = torch.cat([source, patch.data.permute(0, 2, 3, 1).reshape(-1, C)])
        index = _to_device(index.reshape(-1), clean.device)
        return source.index_select(0, index).view(B, h, w, C).permute(0, 3, 1, 2)


class _Ref:
    """Marks a node argument while deciding how a node runs."""
    def __init__(self, node):
        self.node = node


def _module_output(nodes: List[fx.Node], name: str) -> List[fx.Node]:
    """``[node]`` returned by the traced-through (not leaf) module ``name``, the only one of
    its nodes read outside it; ``[]`` when that is not one node. (A wrong pick is caught by
    the caller's check of the clean score against the model's.)"""
    inside = {n for n in nodes  # nn_module_stack: {key: (dotted name, type)} of the modules a node ran in
              if any(isinstance(v, tuple) and v[0] == name for v in n.meta.get("nn_module_stack", {}).values())}
    outputs = [n for n in inside if any(user not in inside for user in n.users)]
    return outputs if len(outputs) == 1 else []


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without waiting for the device: a pageable source is
    staged by the driver before the copy call returns, so it may be freed at once."""
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _depends_on(node: fx.Node, values) -> bool:
    return any(values.get(n) is not None for n in node.all_input_nodes)


def _fetch_attr(graph: fx.GraphModule, target: str):
    obj = graph
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _call(node: fx.Node, module, args, kwargs):
    if node.op == "call_module":
        return module(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    self_obj, *rest = args
    return getattr(self_obj, node.target)(*rest, **kwargs)


def _macs(node: fx.Node, module, args, kwargs, out) -> int:
    """Multiply-adds of a convolution or linear node (the arithmetic that dominates)."""
    if not isinstance(out, Tensor):
        return 0
    if node.op == "call_module" and isinstance(module, nn.Conv2d):
        return out.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    if node.op == "call_module" and isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    if node.op == "call_function" and node.target in (F.conv2d, F.linear) and len(args) > 1:
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return out.numel() * (weight[0].numel() if isinstance(weight, Tensor) else 0)
    return 0
