"""Ablation-CAM (Desai & Ramaswamy 2020): each channel of a layer is weighted by the
relative drop of the target score when that channel alone is set to zero.

Ablating a channel changes only the layer's output, so the network's prefix (everything
up to the layer) runs once per call. When the model can be traced with
``torch.fx.symbolic_trace``, only the graph after the layer runs per batch of ablated
channels: it takes the layer's output and the few earlier values it still reads (a
residual branch), computed once. Otherwise (untraceable models, or a trace that does not
reproduce the clean score) every batch runs the whole model with a forward hook that
replaces the layer's output by the ablated activations.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, fx, nn

from ...core import autograd_on, get_layer, layer_name, model_guard, target_scores
from ...core.arguments import friendly_arguments
from ...core.targets import Target, target_for_rows
from ..occlusion.batching import ACTIVATION_COPIES, choose_batch_size
from .._backprop import detach_output, with_output
from ._chunks import Batching, batch_rows, layer_clean_pass, perturbed_scores, weighted_cam

__all__ = ["ablation_cam"]


@friendly_arguments
def ablation_cam(model: nn.Module, inputs: Tensor, layer, target: Target, batch_size: Optional[int] = None,
                 memory_budget: Optional[int] = None, return_output: bool = False):
    """Ablation-CAM map: ``ReLU(sum_k w_k A_k)`` upsampled to the input size, not normalised.

    ``A = Tensor[N, K, h, w]`` is ``layer``'s output, ``y`` the clean target score and
    ``y_k`` the score with channel ``k`` of ``A`` set to 0: ``w_k = (y - y_k) / y``. Equals
    pytorch-grad-cam's ``AblationCAM`` (which also min-max scales the final map) on layers
    whose activations reach 0 (after a ReLU: the usual choice); on layers with negative
    activations pytorch-grad-cam ablates to a very negative value that depends on the
    channel's place in its batch, while this follows the paper (0).

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        layer: dotted module name or the module itself, with a ``[N, K, h, w]`` output.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron` after ``layer``, a callable
            ``output -> Tensor[B]`` (it sees the ablated batches too) or ``"predicted"``.
        batch_size: ablated channels per pass (the result does not depend on it). Default:
            as many as fit in ``memory_budget``.
        memory_budget: bytes per pass when ``batch_size`` is None (default 64 MiB on CPU,
            half the free memory on CUDA).
        return_output: also return the model's output on the clean inputs.

    Returns:
        ``Tensor[N, H, W]`` (>= 0), with ``return_output`` ``(cam, output)``.
    """
    layer = layer_name(model, layer, "layer", target, "ablation_cam")
    with model_guard(model), autograd_on(), torch.no_grad():
        x, clean, target = layer_clean_pass(model, inputs, target, layer, return_output, "ablation_cam")
        A = clean.activation
        N, C, H, W = x.shape
        K = A.shape[1]
        suffix = _Suffix.build(model, layer, x, A, clean.scores, target)
        per_row = ACTIVATION_COPIES * A[0].nbytes if suffix is not None else clean.bytes_per_image
        if suffix is not None and batch_size is None and memory_budget is None:
            # the suffix is cheap per row (after layer4: pooling and a linear layer): fill the budget
            rows = Batching(max(1, min(choose_batch_size(per_row, x.device), K)))
        else:
            rows = batch_rows(batch_size, memory_budget, per_row, x.device, K)
        dropped = torch.stack([
            _ablated_scores(model, layer, suffix, x, A, n, target, rows) for n in range(N)])  # [N, K]
        y = clean.scores[:, None].to(dropped.dtype)
        weights = (y - dropped) / y
        cam = weighted_cam(weights, A, (H, W))
        output = detach_output(clean.output) if return_output else None
    return with_output(cam, output, return_output)


def _ablated(A: Tensor, n: int, first: int, count: int) -> Tensor:
    """``[count, K, h, w]``: image ``n``'s activations with channel ``first + i`` zeroed in row ``i``."""
    batch = A[n:n + 1].repeat(count, 1, 1, 1)
    rows = torch.arange(count, device=A.device)
    batch[rows, rows + first] = 0
    return batch


def _ablated_scores(model: nn.Module, layer: str, suffix: Optional["_Suffix"], x: Tensor, A: Tensor, n: int,
                    target, rows: Batching) -> Tensor:
    """Target scores ``Tensor[K]`` of image ``n`` with each channel of ``A`` ablated in turn."""
    K = A.shape[1]
    if suffix is not None:
        return perturbed_scores(suffix.module(n), target, n, K, rows,
                                lambda first, count: _ablated(A, n, first, count), fast_layout=False)
    # whole forward passes, the layer's output replaced by a hook
    state = {}

    def replace(_module, _args, _output):
        return state["batch"]

    def make_batch(first: int, count: int) -> Tensor:
        state["batch"] = _ablated(A, n, first, count)
        return x[n:n + 1].expand(count, -1, -1, -1).clone()

    handle = get_layer(model, layer).register_forward_hook(replace)
    try:
        return perturbed_scores(model, target, n, K, rows, make_batch)
    finally:
        handle.remove()


class _LayerLeafTracer(fx.Tracer):
    """Keeps ``layer`` (and torch.nn's own modules) as single call_module nodes."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return module is self.layer or super().is_leaf_module(module, qualname)


class _BoundSuffix(nn.Module):
    """The suffix graph with image ``n``'s earlier values bound: ``activation [B, K, h, w]
    -> model output``. Submodules keep the model's names (Neuron targets read them)."""

    def __init__(self, graph: fx.GraphModule, live: List[Tensor], n: int):
        super().__init__()
        self.suffix = graph
        self.live = [v[n:n + 1] for v in live]

    def get_submodule(self, target: str) -> nn.Module:
        return self.suffix.get_submodule(target)

    def forward(self, activation: Tensor):
        B = activation.shape[0]
        # each batch gets its own copies: in-place operators of the suffix may write into them
        return self.suffix(activation, *(v.expand(B, *v.shape[1:]).clone() for v in self.live))


class _Suffix:
    """The part of a traced model after ``layer`` and the values of the earlier nodes it
    still reads (``live``, all images, computed once by the traced prefix)."""

    def __init__(self, graph: fx.GraphModule, live: List[Tensor]):
        self.graph, self.live = graph, live

    def module(self, n: int) -> nn.Module:
        return _BoundSuffix(self.graph, self.live, n)

    @classmethod
    def build(cls, model: nn.Module, layer: str, x: Tensor, A: Tensor, scores: Tensor,
              target) -> Optional["_Suffix"]:
        """None when the model cannot be traced with ``layer`` as one node called once, or
        when the split graph does not reproduce the clean target scores."""
        module = get_layer(model, layer)
        try:
            graph = fx.GraphModule(model, _LayerLeafTracer(module).trace(model))
        except Exception:  # data-dependent control flow, unsupported Python: not traceable
            return None
        nodes = list(graph.graph.nodes)
        cuts = [i for i, node in enumerate(nodes) if node.op == "call_module" and node.target == layer]
        placeholders = [node for node in nodes if node.op == "placeholder"]
        if len(cuts) != 1 or len(placeholders) != 1:
            return None
        cut = nodes[cuts[0]]
        before, after = nodes[:cuts[0]], nodes[cuts[0] + 1:]
        earlier = set(before)
        live_nodes = list(dict.fromkeys(
            arg for node in after for arg in node.all_input_nodes if arg in earlier and arg.op != "get_attr"))
        try:
            prefix = _graph_of(graph, before + [cut], placeholders, [cut] + live_nodes)
            live = [v.detach() for v in prefix(x.clone())[1:]]
            split = cls(_graph_of(graph, after, [cut] + live_nodes, None), live)
            check = torch.cat([
                target_scores(split.module(n), A[n:n + 1].clone(),
                              target_for_rows(target, torch.tensor([n], device=x.device)))
                for n in range(x.shape[0])])
        except Exception:  # a trace that does not run as the model does
            return None
        if not torch.allclose(check.to(scores.dtype), scores, rtol=1e-4, atol=1e-5):
            return None
        return split


def _graph_of(root: fx.GraphModule, nodes: List[fx.Node], inputs: List[fx.Node],
              outputs: Optional[List[fx.Node]]) -> fx.GraphModule:
    """A GraphModule running ``nodes`` (in order) with ``inputs`` as its placeholders,
    returning the tuple of ``outputs`` (None: the root graph's own output)."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {node: graph.placeholder(node.name) for node in inputs}
    result = None
    for node in nodes:
        if node in env:
            continue
        if node.op == "output":
            result = fx.map_arg(node.args[0], lambda a: env[a])
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[node] for node in outputs) if outputs is not None else result)
    return fx.GraphModule(root, graph)
