"""Models the layout tests share."""
import torch
from torch import nn


class FlattensByView(nn.Module):
    """A LeNet-style head: ``.view`` of a feature map (refused on a channels-last map) unless
    ``reshape``; ``layouts`` records whether each batch arrived channels-last."""

    def __init__(self, reshape: bool = False):
        super().__init__()
        self.conv, self.fc, self.reshape = nn.Conv2d(3, 4, 3), nn.Linear(4 * 10 * 10, 5), reshape
        self.layouts = []

    def forward(self, x):
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        y = torch.relu(self.conv(x))
        return self.fc(y.reshape(len(y), -1) if self.reshape else y.view(len(y), -1))
