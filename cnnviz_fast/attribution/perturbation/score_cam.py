"""Score-CAM (Wang et al. 2020): each channel of a layer, upsampled and min-max normalised,
masks the input; the channels are weighted by the softmax of the masked inputs' target
scores.

The masked inputs are built and run a bounded batch at a time (never a channels x C x H
x W tensor); channels that are zero everywhere give the all-zero image and share one
forward pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import autograd_on, layer_name, model_guard
from ...core.arguments import friendly_arguments
from ...core.targets import Target
from .._backprop import detach_output, with_output
from ._chunks import Batching, batch_rows, layer_clean_pass, perturbed_scores, scoring_model, weighted_cam

__all__ = ["score_cam"]

# Added to the per-channel value range before dividing (pytorch-grad-cam's constant).
RANGE_EPS = 1e-8


@friendly_arguments
def score_cam(model: nn.Module, inputs: Tensor, layer, target: Target, batch_size: Optional[int] = None,
              memory_budget: Optional[int] = None, return_output: bool = False):
    """Score-CAM map: ``ReLU(sum_k w_k A_k)`` upsampled to the input size, not normalised.

    ``A = Tensor[N, K, h, w]`` is ``layer``'s output on the clean inputs; ``M_k`` is channel
    ``k`` upsampled to ``H x W`` (bilinear, ``align_corners=True``) and min-max normalised
    (``(M - min) / (max - min + 1e-8)``); ``w = softmax_k(score(x * M_k))``. Equals
    pytorch-grad-cam's ``ScoreCAM`` (which also min-max scales the final map per image).

    Args:
        model: the network; run in eval mode for the call, restored afterwards.
        inputs: ``Tensor[N, C, H, W]``.
        layer: dotted module name or the module itself, with a ``[N, K, h, w]`` output.
        target: an int, N ints, a :class:`~cnnviz_fast.Neuron`, a callable ``output ->
            Tensor[B]`` (it sees the masked batches too) or ``"predicted"`` (the clean
            prediction, kept for the masked inputs).
        batch_size: masked inputs per forward pass (the result does not depend on it).
            Default: as many as fit in ``memory_budget`` when it is given, else the fastest
            of 8, 16, 32, 64 timed on the first passes (CPU) or what fits in half the free
            memory (CUDA).
        memory_budget: bytes per pass when ``batch_size`` is None (default 64 MiB on CPU,
            half the free memory on CUDA), counting the masked copy, its mask and the
            activations one more image adds (measured on the clean pass).
        return_output: also return the model's output on the clean inputs.

    Returns:
        ``Tensor[N, H, W]`` (>= 0), with ``return_output`` ``(cam, output)``.
    """
    layer = layer_name(model, layer, "layer", target, "score_cam")
    with model_guard(model), autograd_on(), torch.no_grad():
        x, clean, target = layer_clean_pass(model, inputs, target, layer, return_output, "score_cam")
        A = clean.activation
        N, C, H, W = x.shape
        K = A.shape[1]
        rows = batch_rows(batch_size, memory_budget, clean.bytes_per_image + H * W * x.element_size(), x.device, K)
        runner = scoring_model(model, x, target, clean.scores)
        weights = torch.stack([_channel_weights(runner, x, A, n, target, rows) for n in range(N)])
        cam = weighted_cam(weights, A, (H, W))
        output = detach_output(clean.output) if return_output else None
    return with_output(cam, output, return_output)


def _channel_weights(model: nn.Module, x: Tensor, A: Tensor, n: int, target, rows: Batching) -> Tensor:
    """``softmax_k(score(x_n * M_k))``, ``Tensor[K]`` (float32, float64 for float64 scores)."""
    K = A.shape[1]
    H, W = x.shape[2:]
    image = x[n:n + 1]
    live = A[n].flatten(1).ne(0).any(1).nonzero()[:, 0]  # channels with a non-zero value

    def masked(first: int, count: int) -> Tensor:
        maps = A[n:n + 1, live[first:first + count]]
        up = F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=True)[0]  # [count, H, W]
        flat = up.flatten(1)
        low, high = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
        masks = (up - low) / (high - low + RANGE_EPS)
        return image * masks[:, None]

    scores = x.new_empty(K, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if live.numel():
        scores[live] = perturbed_scores(model, target, n, live.numel(), rows, masked).to(scores.dtype)
    if live.numel() < K:  # a channel that is 0 everywhere masks out the whole image
        dead = torch.ones(K, dtype=torch.bool, device=x.device)
        dead[live] = False
        zero = perturbed_scores(model, target, n, 1, Batching(1), lambda first, count: image * 0)
        scores[dead] = zero.to(scores.dtype)
    return scores.softmax(0)
