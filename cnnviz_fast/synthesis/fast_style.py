"""Fast feed-forward style transfer (Johnson et al. 2016) with one network for several
styles by conditional instance normalization (Dumoulin et al. 2017).

An image-transformation network is trained once against fixed style images with the loss
of :func:`~cnnviz_fast.synthesis.style_transfer` (same content and Gram losses, same
relative normalisation, same weights); stylizing an image is then one forward pass
instead of an optimisation. Every normalization layer holds one scale and shift per
style, so the style is picked per call or per image.

- :class:`StyleNetwork` (in :mod:`cnnviz_fast.zoo.style_network`): the network
  (reflection-padded convolutions, instance normalization, residual blocks,
  nearest-neighbour upsampling + convolution).
- :func:`train_style_network`: training on photos (random crops and flips), with a
  resumable checkpoint.
- :func:`stylize`: one forward pass; the network shipped in the zoo by default.
- :func:`style_losses`: the content and style losses of images, as ``style_transfer``
  defines them (to compare a feed-forward result with an optimised one).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import autograd_on, forward_to_layers, model_guard
from ..core.validation import check_images, check_int, check_number, model_device_dtype
from ..zoo import fast_style_network
from ..zoo.style_network import StyleChoice, StyleNetwork
from ._common import check_normalize, check_pixels, probe
from .style import _content_losses, _content_target, _gram_losses, _layer_weights, _layers, _style_grams

__all__ = ["StyleNetwork", "StyleTraining", "stylize", "style_losses", "train_style_network"]


def stylize(images: Tensor, style: StyleChoice = 0, network: Optional[StyleNetwork] = None,
            batch_size: Optional[int] = None) -> Tensor:
    """``images`` painted in a trained style by one forward pass.

    Args:
        images: ``Tensor[N, 3, H, W]`` pixels in [0, 1], H, W ≥ 16.
        style: a style index or name of the network (``network.styles``), or one per image
            (a list or ``Tensor[N]``).
        network: a trained :class:`StyleNetwork`; default the zoo's
            (:func:`cnnviz_fast.zoo.fast_style_network`, styles ``"brick"`` and ``"stain"``).
        batch_size: images per forward pass (default all).

    Returns:
        ``Tensor[N, 3, H, W]`` in [0, 1] on the network's device, without gradients. The
        network runs in eval mode for the call and is left as it was.
    """
    if network is None:
        network = fast_style_network()
    if not isinstance(network, StyleNetwork):
        raise ValueError(f"network must be a StyleNetwork or None, got {type(network).__name__}")
    with model_guard(network), torch.no_grad():
        device, dtype = model_device_dtype(network)
        pixels = _check_rgb(images, "images", device, dtype)
        indices = network.style_indices(style, pixels.shape[0]).to(device)
        step = pixels.shape[0] if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
        return torch.cat([network(pixels[i:i + step], indices[i:i + step])
                          for i in range(0, pixels.shape[0], step)])


def _check_rgb(images, argument: str, device, dtype) -> Tensor:
    check_images(images, argument)
    if images.shape[1] != 3:
        raise ValueError(f"{argument} must be RGB pixels Tensor[N, 3, H, W], got {images.shape[1]} channels")
    if min(images.shape[-2:]) < 16:
        raise ValueError(f"{argument} must be at least 16×16 pixels, got {tuple(images.shape[-2:])}")
    return check_pixels(images, argument, device, dtype)


def style_losses(model: nn.Module, images: Tensor, content: Tensor, style: Tensor, content_layer: str,
                 style_layers: Union[str, Sequence[str]], *, normalize: Optional[nn.Module] = None,
                 layer_weights: Optional[Sequence[float]] = None) -> Tuple[Tensor, Tensor]:
    """``(content_loss Tensor[N], style_loss Tensor[N])`` of ``images`` (stylized
    ``content``, both ``Tensor[N, C, H, W]`` in [0, 1]) against ``style`` (``Tensor[1 or N,
    C, h, w]``), with the definitions of :func:`~cnnviz_fast.synthesis.style_transfer`:
    ``mean((F(x) - F(content))^2) / mean(F(content)^2)`` at ``content_layer`` and
    ``sum_l w_l mean((G_l(x) - G_l(style))^2) / mean(G_l(style)^2)`` (unweighted by
    ``content_weight`` / ``style_weight``)."""
    with model_guard(model), torch.no_grad():
        device, dtype = model_device_dtype(model)
        images = check_pixels(images, "images", device, dtype)
        content = check_pixels(content, "content", device, dtype)
        style = check_pixels(style, "style", device, dtype)
        if images.shape != content.shape:
            raise ValueError(f"images and content must have the same shape, got {tuple(images.shape)} and "
                             f"{tuple(content.shape)}")
        style_layers = _layers(style_layers, "style_layers")
        weights = _layer_weights(layer_weights, style_layers, "layer_weights")
        normalize = check_normalize(normalize, images.shape[1])
        grams = _style_grams(model, style, normalize, style_layers, "style")
        target, scale = _content_target(model, content, normalize, content_layer)
        features = probe(model, normalize(images), "images", layers=list(dict.fromkeys(style_layers + [content_layer])),
                         layer_argument="style_layers")
        index = torch.arange(images.shape[0], device=device) if style.shape[0] > 1 else \
            torch.zeros(images.shape[0], dtype=torch.long, device=device)
        return (_content_losses(features[content_layer], target, scale),
                _gram_losses(features, grams, style_layers, weights, index))


@dataclass
class StyleTraining:
    """What :func:`train_style_network` returns: the trained ``network`` (eval mode) and
    ``history`` ``Tensor[steps]``, the batch loss of every step (content_weight × content
    loss + style_weight × style loss, mean over the batch)."""

    network: StyleNetwork
    history: Tensor


def _stack_styles(model, styles: Dict[str, Tensor], normalize, layers, device, dtype):
    """Target Gram matrices of every style, stacked ``{layer: (Tensor[S, C, C], S scales)}``
    (the layout :func:`_gram_losses` indexes by style)."""
    per_style = [_style_grams(model, check_pixels(image, f"styles[{name!r}]", device, dtype)[:1], normalize, layers,
                              "style") for name, image in styles.items()]
    return {name: (torch.cat([g[name][0] for g in per_style]), [s for g in per_style for s in g[name][1]])
            for name in layers}


def _random_crops(photos: List[Tensor], size: int, batch: int, generator: torch.Generator) -> Tensor:
    """``Tensor[batch, 3, size, size]``: for each, a random photo, a random square crop of
    side ``size`` to the photo's shorter side, resized to ``size``, flipped half the time."""
    crops = []
    for _ in range(batch):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        height, width = photo.shape[-2:]
        side = int(torch.randint(size, min(height, width) + 1, (1,), generator=generator))
        top = int(torch.randint(height - side + 1, (1,), generator=generator))
        left = int(torch.randint(width - side + 1, (1,), generator=generator))
        crop = photo[:, :, top:top + side, left:left + side]
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.cat(crops).clamp(0, 1)


def train_style_network(
    model: nn.Module,
    styles: Dict[str, Tensor],
    photos: Sequence[Tensor],
    content_layer: str,
    style_layers: Union[str, Sequence[str]],
    *,
    normalize: Optional[nn.Module] = None,
    content_weight: float = 1.0,
    style_weight: float = 10.0,
    layer_weights: Optional[Sequence[float]] = None,
    network: Optional[StyleNetwork] = None,
    steps: int = 2000,
    size: int = 128,
    batch: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint: Optional[Union[str, Path]] = None,
    checkpoint_every: int = 50,
    progress: Optional[bool] = None,
    callback: Optional[Callable[[int, float], None]] = None,
) -> StyleTraining:
    """Train a :class:`StyleNetwork` for ``styles`` with the loss of ``style_transfer``.

    Each step draws ``batch`` random crops of ``photos`` (side ``size`` to the photo's
    shorter side, resized to ``size``, flipped half the time) and a random style per crop,
    and takes one Adam step on ``content_weight * content loss + style_weight * style loss``
    (mean over the batch), each term defined and normalised as in
    :func:`~cnnviz_fast.synthesis.style_transfer` (same ``content_layer``, ``style_layers``
    and ``layer_weights``). The style targets are the Gram matrices of each style image as
    given (its pixel scale is the scale the network learns to paint).

    Args:
        model: the loss network (e.g. ``zoo.efficientnet_lite0()``), left as found.
        styles: ``{name: Tensor[1, 3, h, w]}`` pixels in [0, 1].
        photos: ``Tensor[1, 3, H, W]`` pixels in [0, 1], each at least ``size`` px.
        network: the network to train (default a new ``StyleNetwork(list(styles))``).
        steps, size, batch, lr: the training; seed: the network's initialisation and every
            random draw (a CPU generator), so a run is reproducible.
        checkpoint: a file; written every ``checkpoint_every`` steps and at the end (network,
            optimiser, generator, history). If it exists, training resumes from it and
            ends where an uninterrupted run with the same arguments would.
        progress: the loss on stderr every few steps (default: when stderr is a terminal).
        callback: ``callback(step, loss)`` after every step (step counts from 1).
    """
    with model_guard(model), autograd_on():
        device, dtype = model_device_dtype(model)
        if not isinstance(styles, dict) or not styles:
            raise ValueError(f"styles must be a non-empty dict {{name: Tensor[1, 3, h, w]}}, got {type(styles).__name__}")
        for name, image in styles.items():
            _check_rgb(image, f"styles[{name!r}]", device, dtype)
        if isinstance(photos, Tensor) or not photos:
            raise ValueError("photos must be a non-empty sequence of Tensor[1, 3, H, W]")
        photos = [_check_rgb(photo, f"photos[{i}]", device, dtype) for i, photo in enumerate(photos)]
        size = check_int(size, "size", minimum=16)
        small = [i for i, photo in enumerate(photos) if min(photo.shape[-2:]) < size]
        if small:
            raise ValueError(f"photos[{small[0]}] is smaller than size={size}")
        steps, batch = check_int(steps, "steps", minimum=1), check_int(batch, "batch", minimum=1)
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", minimum=1)
        lr = check_number(lr, "lr")
        content_weight = check_number(content_weight, "content_weight")
        style_weight = check_number(style_weight, "style_weight")
        style_layers = _layers(style_layers, "style_layers")
        weights = _layer_weights(layer_weights, style_layers, "layer_weights")
        normalize = check_normalize(normalize, 3)
        if network is None:
            with torch.random.fork_rng(devices=[]):  # seeded initialisation, the global generator untouched
                torch.manual_seed(seed)
                network = StyleNetwork(list(styles))
        elif not isinstance(network, StyleNetwork):
            raise ValueError(f"network must be a StyleNetwork or None, got {type(network).__name__}")
        if list(network.styles) != list(styles):
            raise ValueError(f"network's styles {list(network.styles)} differ from styles {list(styles)}")
        network = network.to(device, dtype).train()
        for parameter in model.parameters():
            parameter.requires_grad_(False)  # only the network learns (model_guard restores the flags)
        grams = _stack_styles(model, styles, normalize, style_layers, device, dtype)
        layers = list(dict.fromkeys(style_layers + [content_layer]))
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history: List[float] = []
        config = {"styles": list(styles), "size": size, "batch": batch, "lr": lr, "seed": seed,
                  "content_layer": content_layer, "style_layers": style_layers, "layer_weights": weights,
                  "content_weight": content_weight, "style_weight": style_weight}
        if checkpoint is not None and Path(checkpoint).exists():
            history = _resume(Path(checkpoint), config, network, optimizer, generator)
            if len(history) > steps:
                raise ValueError(f"checkpoint {checkpoint} is at step {len(history)}, past steps={steps}")
        if progress is None:
            progress = sys.stderr.isatty()
        started = time.perf_counter()
        for step in range(len(history) + 1, steps + 1):
            content = _random_crops(photos, size, batch, generator)
            style = torch.randint(len(styles), (batch,), generator=generator).to(device)
            with torch.no_grad():
                target, scale = _content_target(model, content, normalize, content_layer)
            features = forward_to_layers(model, normalize(network(content, style)), layers, argument="style_layers")
            loss = (content_weight * _content_losses(features[content_layer], target, scale)
                    + style_weight * _gram_losses(features, grams, style_layers, weights, style)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            if callback is not None:
                callback(step, history[-1])
            if progress and (step % 10 == 0 or step == steps):
                recent = history[-10:]
                print(f"train_style_network: step {step}/{steps} loss {sum(recent) / len(recent):.4f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
            if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
                _save(Path(checkpoint), config, network, optimizer, generator, history)
        return StyleTraining(network.eval(), torch.tensor(history, dtype=torch.float64))


def _save(path: Path, config, network, optimizer, generator, history) -> None:
    """Written to a temporary file and renamed: a kill leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"config": config, "network": network.to_checkpoint(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "history": list(history)}, partial)
    os.replace(partial, path)


def _resume(path: Path, config, network, optimizer, generator) -> List[float]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("config") != config:
        changed = sorted(k for k in set(config) | set(data.get("config", {}))
                         if config.get(k) != data.get("config", {}).get(k))
        raise ValueError(f"checkpoint {path} was made with other settings ({', '.join(changed)}); "
                         "delete it or pass the same arguments")
    network.load_state_dict(data["network"]["state_dict"])
    optimizer.load_state_dict(data["optimizer"])
    generator.set_state(data["generator"])
    return list(data["history"])
