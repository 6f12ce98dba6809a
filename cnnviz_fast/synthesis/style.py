"""Texture synthesis and style transfer with Gram matrices (Gatys et al. 2015, 2016).

A texture is summarised by the Gram matrices ``G = F Fᵀ / S`` of a network's
features at several layers; a new image is optimised until its Gram matrices match
(texture synthesis), and, for style transfer, its features at a deeper layer also
match those of a content image. The Gram losses of all layers are one call of
:func:`cnnviz_fast.ops.gram_loss` per image (fused backward), and the forward pass
stops at the deepest layer needed.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..core import autograd_on, model_guard
from ..core.validation import check_number, model_device_dtype
from ._common import check_normalize, check_pixels, make_generator, probe
from .engine import Objective, SynthesisResult, optimize
from ..core.validation import check_pair
from .parameterization import Size, make_image


def _layers(layers, argument: str) -> List[str]:
    layers = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, (list, tuple)) else None
    if not layers or not all(isinstance(name, str) for name in layers):
        raise ValueError(f"{argument} must be a layer name or a non-empty sequence of layer names, got {layers!r}")
    return layers


def _layer_weights(weights, layers: Sequence[str], argument: str) -> List[float]:
    if weights is None:
        return [1.0 / len(layers)] * len(layers)
    weights = [weights] * len(layers) if isinstance(weights, (int, float)) else list(weights)
    if len(weights) != len(layers):
        raise ValueError(f"{argument} must hold one weight per layer ({len(layers)}), got {len(weights)}")
    return [check_number(w, argument) for w in weights]


def _style_grams(model, pixels, normalize, layers, argument) -> Dict[str, Tuple[Tensor, List[float]]]:
    """``{layer: (Gram matrices [N, C, C], their mean squares as N floats)}`` of ``pixels``."""
    features = probe(model, normalize(pixels), argument,
                     layers=layers, layer_argument="style_layers" if argument == "style" else "layers")
    grams = {}
    for name in layers:
        gram = ops.gram(features[name]).detach()
        grams[name] = (gram, gram.pow(2).flatten(1).mean(1).clamp_min(1e-30).tolist())
    return grams


def _gram_losses(features: Dict[str, Tensor], grams, layers, weights, index, images: Optional[int] = None) -> Tensor:
    """Per-image Gram loss ``sum_l w_l mean((G_l - T_l)^2) / mean(T_l^2)`` as ``Tensor[M]``
    for the images ``index`` (of ``images``): one fused ``gram_loss`` call (all layers) per
    image. Features of another dtype (bf16 under autocast) are compared in the targets'.

    Dividing by the target's mean square makes each layer count by its weight whatever
    the magnitude of its features (deep layers of a random network are tiny) and the
    loss scale-free (L-BFGS's curvature test has an absolute threshold)."""
    losses = []
    # a batch of all the images is 0..N-1 in order: no read of ``index`` (on a GPU that read
    # waited for the forward pass before the loss could be queued, every iteration)
    rows = range(images) if len(index) == images else index.tolist()
    for row, i in enumerate(rows):
        feats, targets, scaled = [], [], []
        for name, weight in zip(layers, weights):
            gram, scale = grams[name]
            j = i if gram.shape[0] > 1 else 0
            feats.append(features[name][row:row + 1].to(gram.dtype))
            targets.append(gram[j])
            scaled.append(weight / scale[j])
        losses.append(ops.gram_loss(feats, targets, scaled))
    return torch.stack(losses)


def _content_target(model, content: Tensor, normalize, layer: str) -> Tuple[Tensor, Tensor]:
    """``(features Tensor[N, ...], their mean squares Tensor[N])`` of ``content`` at ``layer``."""
    target = probe(model, normalize(content), "content", layers=[layer], layer_argument="content_layer")[layer].detach()
    return target, target.pow(2).flatten(1).mean(1).clamp_min(1e-30)


def _content_losses(features: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """Per-image content loss ``mean((F - T)^2) / mean(T^2)`` as ``Tensor[M]`` (features of
    another dtype, bf16 under autocast, compared in the target's)."""
    return (features.to(target.dtype) - target).pow(2).flatten(1).mean(1) / scale


def synthesize_texture(
    model: nn.Module,
    texture: Tensor,
    layers: Union[str, Sequence[str]],
    size: Optional[Size] = None,
    *,
    normalize: Optional[nn.Module] = None,
    layer_weights: Optional[Sequence[float]] = None,
    steps: int = 200,
    optimizer: str = "lbfgs",
    lr: float = 1.0,
    parameterization: str = "pixels",
    seed: Optional[int] = 0,
    progress: Optional[bool] = None,
    callback=None,
    dtype: Optional[str] = None,
    channels_last: bool = False,
) -> SynthesisResult:
    """New images with the Gram statistics of ``texture`` at ``layers``.

    Minimises, per image, ``sum_l w_l mean((G_l(x) - G_l(texture))^2) / mean(G_l(texture)^2)``
    from Gaussian noise around grey.

    Args:
        model: a convolutional network (random weights work: Ustyuzhaninov et al. 2017).
        texture: ``Tensor[N, C, h, w]`` pixels in [0, 1]; one new image per texture.
        layers: layer names whose Gram matrices are matched.
        size: ``(H, W)`` (or int) of the new images; default the texture's size.
        normalize: pixels → model inputs (a :class:`~cnnviz_fast.core.Normalize`) or None.
        layer_weights: per-layer weights (default ``1 / len(layers)`` each).
        steps: iterations; optimizer: ``"lbfgs"`` (default; one L-BFGS iteration per
            step), ``"adam"`` or ``"sgd"``; lr: its step size.
        parameterization: ``"pixels"`` or ``"fourier"``; seed: the initial noise.
        dtype: ``"bf16"`` / ``"fp16"``: each iteration's forward pass under autocast (tensor
            cores on a GPU); the target Gram matrices, the loss and the images stay in the
            model's dtype. channels_last: NHWC images and weights for the call.

    Returns:
        :class:`SynthesisResult`: ``images`` ``Tensor[N, C, H, W]`` in [0, 1], ``history``
        ``Tensor[steps, N]`` of each image's Gram loss. The model runs in eval mode for
        the call and is left as it was; only the images get gradients.
    """
    with model_guard(model), autograd_on():
        device, model_dtype = model_device_dtype(model)
        pixels = check_pixels(texture, "texture", device, model_dtype)
        layers = _layers(layers, "layers")
        weights = _layer_weights(layer_weights, layers, "layer_weights")
        normalize = check_normalize(normalize, pixels.shape[1])
        height, width = check_pair(size, "size") if size is not None else pixels.shape[-2:]
        grams = _style_grams(model, pixels, normalize, layers, "texture")
        generator = make_generator(seed)
        shape = (pixels.shape[0], pixels.shape[1], height, width)
        image = make_image(parameterization, shape, generator=generator, device=device, dtype=model_dtype,
                           init_std=0.1 if parameterization == "pixels" else 0.01)
        def loss(features, output, index):
            return _gram_losses(features, grams, layers, weights, index, shape[0])

        objective = Objective(loss=loss, layers=tuple(layers))
        return optimize(model, objective, image, normalize=normalize, steps=steps, lr=lr, optimizer=optimizer,
                        generator=generator, progress=progress, callback=callback,
                        description="synthesize_texture", dtype=dtype, channels_last=channels_last)


def style_transfer(
    model: nn.Module,
    content: Tensor,
    style: Tensor,
    content_layer: str,
    style_layers: Union[str, Sequence[str]],
    *,
    normalize: Optional[nn.Module] = None,
    content_weight: float = 1.0,
    style_weight: float = 1.0,
    layer_weights: Optional[Sequence[float]] = None,
    steps: int = 200,
    optimizer: str = "lbfgs",
    lr: float = 1.0,
    init: str = "content",
    seed: Optional[int] = 0,
    progress: Optional[bool] = None,
    callback=None,
    dtype: Optional[str] = None,
    channels_last: bool = False,
) -> SynthesisResult:
    """Paint ``content`` in the style of ``style`` (Gatys et al. 2016).

    Minimises, per image, ``content_weight * mean((F(x) - F(content))^2) / mean(F(content)^2)
    + style_weight * sum_l w_l mean((G_l(x) - G_l(style))^2) / mean(G_l(style)^2)``: both
    terms relative to their targets, so the weights do not depend on the network's scale.

    Args:
        model: a convolutional network.
        content: ``Tensor[N, C, H, W]`` pixels in [0, 1]; style: ``Tensor[1 or N, C, h, w]``
            pixels in [0, 1] (any size).
        content_layer: the layer whose features are kept; style_layers: the layers whose
            Gram matrices are matched (``layer_weights`` each, default ``1/len``).
        content_weight, style_weight: the balance of the two terms.
        steps, optimizer (``"lbfgs"`` default, ``"adam"``, ``"sgd"``), lr: the optimisation.
        init: ``"content"`` (start from the content image) or ``"noise"`` (seeded).
        dtype, channels_last: as in :func:`synthesize_texture`.

    Returns:
        :class:`SynthesisResult` (``images`` ``Tensor[N, C, H, W]``, ``history``
        ``Tensor[steps, N]``). The model runs in eval mode for the call and is left as
        it was; only the images get gradients.
    """
    with model_guard(model), autograd_on():
        device, model_dtype = model_device_dtype(model)
        content = check_pixels(content, "content", device, model_dtype)
        style = check_pixels(style, "style", device, model_dtype)
        if style.shape[0] not in (1, content.shape[0]) or style.shape[1] != content.shape[1]:
            raise ValueError(f"style must be [1 or N, C, h, w] with N={content.shape[0]}, C={content.shape[1]}, "
                             f"got shape {tuple(style.shape)}")
        if init not in ("content", "noise"):
            raise ValueError(f"init must be 'content' or 'noise', got {init!r}")
        style_layers = _layers(style_layers, "style_layers")
        weights = _layer_weights(layer_weights, style_layers, "layer_weights")
        content_weight = check_number(content_weight, "content_weight")
        style_weight = check_number(style_weight, "style_weight")
        normalize = check_normalize(normalize, content.shape[1])
        grams = _style_grams(model, style, normalize, style_layers, "style")
        target, content_scale = _content_target(model, content, normalize, content_layer)

        def loss(features, output, index):
            content_loss = _content_losses(features[content_layer], target[index], content_scale[index])
            style_loss = _gram_losses(features, grams, style_layers, weights, index, content.shape[0])
            return content_weight * content_loss + style_weight * style_loss

        generator = make_generator(seed)
        image = make_image("pixels", content.shape, generator=generator, device=device, dtype=model_dtype,
                           init=content if init == "content" else None, init_std=0.1)
        objective = Objective(loss=loss, layers=tuple(dict.fromkeys(style_layers + [content_layer])))
        return optimize(model, objective, image, normalize=normalize, steps=steps, lr=lr, optimizer=optimizer,
                        generator=generator, progress=progress, callback=callback, description="style_transfer",
                        dtype=dtype, channels_last=channels_last)
