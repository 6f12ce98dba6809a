"""The image-transformation network of fast style transfer (Johnson et al. 2016) with
conditional instance normalization for several styles (Dumoulin et al. 2017); trained by
:func:`cnnviz_fast.synthesis.train_style_network`, run by :func:`cnnviz_fast.synthesis.stylize`."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.validation import check_int

StyleChoice = Union[int, str, Sequence[Union[int, str]], Tensor]


class ConditionalInstanceNorm(nn.Module):
    """Instance normalization with one scale and shift per style: ``Tensor[N, C, H, W]``
    and style indices ``Tensor[N]`` → each image normalized per channel, then scaled and
    shifted by its style's parameters."""

    def __init__(self, channels: int, styles: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(styles, channels))
        self.shift = nn.Parameter(torch.zeros(styles, channels))

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        x = F.instance_norm(x, eps=1e-5)
        return torch.addcmul(self.shift[style][:, :, None, None], x, self.scale[style][:, :, None, None])


class _ConvNorm(nn.Module):
    """Reflection padding, convolution, conditional instance norm, optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, styles: int, stride: int = 1, relu: bool = True):
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, stride)
        self.norm = ConditionalInstanceNorm(cout, styles)
        self.relu = relu

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        x = self.norm(self.conv(self.pad(x)), style)
        return F.relu(x) if self.relu else x


class _Residual(nn.Module):
    def __init__(self, channels: int, styles: int):
        super().__init__()
        self.first = _ConvNorm(channels, channels, 3, styles)
        self.second = _ConvNorm(channels, channels, 3, styles, relu=False)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        return x + self.second(self.first(x, style), style)


class StyleNetwork(nn.Module):
    """Image-transformation network for ``styles`` (their names), after Johnson et al.
    2016 with conditional instance norm: a k×k convolution to ``channels[0]``, two stride-2
    convolutions to ``channels[1]``, ``channels[2]``, ``blocks`` residual blocks, two
    nearest-neighbour ×2 upsamplings each followed by a 3×3 convolution (no transposed
    convolutions: no checkerboard artefacts), a k×k convolution to RGB and a sigmoid.

    ``forward(pixels Tensor[N, 3, H, W] in [0, 1], style Tensor[N] of style indices)`` →
    ``Tensor[N, 3, H, W]`` in [0, 1], any H, W ≥ 16 (the upsamplings return to the sizes
    of the way down)."""

    def __init__(self, styles: Sequence[str], channels: Sequence[int] = (16, 32, 64), blocks: int = 3,
                 kernel: int = 5):
        super().__init__()
        styles = [styles] if isinstance(styles, str) else list(styles)
        if not styles or not all(isinstance(name, str) and name for name in styles) \
                or len(set(styles)) != len(styles):
            raise ValueError(f"styles must be distinct non-empty names, got {styles!r}")
        channels = list(channels)
        if len(channels) != 3 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels must be three positive ints, got {channels!r}")
        check_int(blocks, "blocks", minimum=0)
        check_int(kernel, "kernel", minimum=1)
        self.styles = tuple(styles)
        self.config = {"channels": channels, "blocks": blocks, "kernel": kernel}
        n = len(styles)
        c0, c1, c2 = channels
        self.down = nn.ModuleList([_ConvNorm(3, c0, kernel, n), _ConvNorm(c0, c1, 3, n, stride=2),
                                   _ConvNorm(c1, c2, 3, n, stride=2)])
        self.residual = nn.ModuleList([_Residual(c2, n) for _ in range(blocks)])
        self.up = nn.ModuleList([_ConvNorm(c2, c1, 3, n), _ConvNorm(c1, c0, 3, n)])
        self.out = nn.Sequential(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(c0, 3, kernel))

    def forward(self, pixels: Tensor, style: Tensor) -> Tensor:
        x = pixels * 2 - 1
        sizes = []
        for layer in self.down:
            sizes.append(x.shape[-2:])
            x = layer(x, style)
        for layer in self.residual:
            x = layer(x, style)
        for layer, size in zip(self.up, reversed(sizes[1:])):
            x = layer(F.interpolate(x, size=tuple(size), mode="nearest"), style)
        return torch.sigmoid(self.out(x))

    def style_indices(self, style: StyleChoice, n: int, argument: str = "style") -> Tensor:
        """``Tensor[n]`` of style indices from one index or name, or one per image."""
        if isinstance(style, Tensor):
            if style.dim() > 1 or style.is_floating_point() or style.is_complex() or style.dtype == torch.bool:
                raise ValueError(f"{argument} must be an int, a name or N style indices, got a "
                                 f"{style.dtype} tensor of shape {tuple(style.shape)}")
            style = style.flatten().tolist()
        items = list(style) if isinstance(style, (list, tuple)) else [style] * n
        if len(items) != n:
            raise ValueError(f"{argument} must be one style or one per image ({n}), got {len(items)}")
        indices = []
        for item in items:
            if isinstance(item, str):
                if item not in self.styles:
                    raise ValueError(f"{argument} {item!r} is not a style of this network; its styles: "
                                     f"{', '.join(self.styles)}")
                indices.append(self.styles.index(item))
            elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(self.styles):
                indices.append(item)
            else:
                raise ValueError(f"{argument} must be a style index in [0, {len(self.styles) - 1}] or a name "
                                 f"({', '.join(self.styles)}), got {item!r}")
        return torch.tensor(indices, dtype=torch.long)

    def to_checkpoint(self) -> dict:
        """What :meth:`from_checkpoint` needs: names, sizes and the state dict (loadable with
        ``torch.load(weights_only=True)``)."""
        return {"styles": list(self.styles), **self.config,
                "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, data: dict) -> "StyleNetwork":
        network = cls(data["styles"], data["channels"], data["blocks"], data["kernel"])
        network.load_state_dict(data["state_dict"])
        return network
