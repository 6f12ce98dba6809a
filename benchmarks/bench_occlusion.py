"""Occlusion benchmarks: cnnviz_fast.occlusion timed beside Captum in the same run.

    python benchmarks/bench_occlusion.py [--quick] [--device cpu|cuda] [--no-write] [--results-dir DIR]

CPU: ResNet-18 (1000 classes), one 112x112 image (--quick: 64x64), window 16, stride 8
(13x13 = 169 windows; --quick 7x7 = 49).
  occlusion (default: mode="exact", incremental) vs Captum Occlusion at perturbations_per_eval
  1, 64, 256 (--quick: 64)                                               target: >= 1x
  occlusion(batch_size=32, mode="full") vs the floor: the bare forward passes it needs (the clean image
  and the same occluded images in equal passes of at most 32, pre-built, under inference_mode)
                                                                         target: <= 1.10x
  (info, not --quick) mode="full"'s measured batch size against batch_size 8, 32 and all
CUDA (--device cuda): 8 images of 224x224 vs Captum at perturbations_per_eval 64 and 256 (>= 1x),
  exact vs mode="full" (info); one image vs Captum's default (perturbations_per_eval=1)  target: >= 5x
Only public calls are timed. Outputs are checked equal before timing.
Results: benchmarks/results/occlusion-<machine>.{md,json}.
"""
from __future__ import annotations

import math
import warnings
from typing import List

import torch

from common import argument_parser, finish, interleaved, machine_description, row

from captum.attr import Occlusion

import cnnviz_fast as cv
from cnnviz_fast import zoo
from cnnviz_fast.ops import occlude, occlusion_grid

warnings.filterwarnings("ignore", module="captum")
WINDOW, STRIDE = (16, 16), (8, 8)


def captum(model, x, target, per_eval):
    C = x.shape[1]
    return Occlusion(model).attribute(x, sliding_window_shapes=(C, *WINDOW), strides=(C, *STRIDE),
                                      baselines=0.0, target=target, perturbations_per_eval=per_eval)[:, 0]


def floor_fn(model, x, batch_size):
    """The bare forward passes occlusion needs for one image: the clean image, then its
    occluded copies in equal passes of at most ``batch_size``, built beforehand."""
    C, H, W = x.shape[1:]
    rows, cols = occlusion_grid(H, W, WINDOW, STRIDE)
    positions = rows * cols
    size = math.ceil(positions / math.ceil(positions / batch_size))
    batches = [occlude(x, WINDOW, STRIDE, 0.0, first, min(size, positions - first)).reshape(-1, C, H, W)
               for first in range(0, positions, size)]

    def run():
        with torch.inference_mode():
            model(x)
            for batch in batches:
                model(batch)
    return run


def bench_cpu(quick: bool) -> List[dict]:
    model = zoo.resnet18()
    size, rounds, per_evals = (64, 1, (64,)) if quick else (112, 5, (1, 64, 256))
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = 3
    label = f"cpu ResNet-18 1x3x{size}x{size}"

    def ours(batch_size=None, mode="exact"):  # exact: the default (incremental); full: every image in full
        return cv.occlusion(model, x, target, window=WINDOW, stride=STRIDE, batch_size=batch_size, mode=mode)

    expected = ours()
    torch.testing.assert_close(ours(32, "full"), expected, atol=1e-4, rtol=1e-4)
    for per_eval in per_evals:
        torch.testing.assert_close(captum(model, x, target, per_eval), expected, atol=1e-4, rtol=1e-4)
    contenders = {"ours": ours, "ours32": lambda: ours(32, "full"), "floor32": floor_fn(model, x, 32)}
    contenders.update({f"captum{p}": (lambda p=p: captum(model, x, target, p)) for p in per_evals})
    t = interleaved(contenders, rounds)
    rows = [row(f"{label} occlusion vs Captum ppe={p}", t["ours"], t[f"captum{p}"], ">= 1x") for p in per_evals]
    rows.append(row(f"{label} occlusion(batch_size=32, mode='full') vs bare forwards", t["ours32"], t["floor32"],
                    "<= 1.10x"))
    if not quick:  # does full recomputation choose a good batch size? (info)
        sweep = {b: (lambda b=b: ours(b, "full")) for b in (8, 32, 169)}
        ts = interleaved({"default": lambda: ours(mode="full"), **sweep}, 3)
        rows += [row(f"{label} occlusion mode='full' default batch size vs batch_size={b}", ts["default"], ts[b])
                 for b in sweep]
    return rows


def bench_cuda(quick: bool) -> List[dict]:
    """8 images at 224 px against Captum at its best batching (perturbations_per_eval 64, 256),
    and one image against Captum's default (one window per forward)."""
    model = zoo.resnet18().cuda()
    x = torch.rand(8, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    target = list(range(8))
    rounds = 1 if quick else 3
    label = "cuda ResNet-18 8x3x224x224"

    def ours(images=x, targets=target, mode="exact"):
        return cv.occlusion(model, images, targets, window=WINDOW, stride=STRIDE, mode=mode)

    expected = ours(mode="full")
    torch.testing.assert_close(ours(), expected, atol=1e-3, rtol=1e-3)
    contenders = {"ours": ours, "full": lambda: ours(mode="full")}
    for per_eval in (64, 256):
        torch.testing.assert_close(captum(model, x, target, per_eval), expected, atol=1e-3, rtol=1e-3)
        contenders[f"captum{per_eval}"] = lambda p=per_eval: captum(model, x, target, p)
    t = interleaved(contenders, rounds)
    rows = [row(f"{label} occlusion vs Captum ppe={p}", t["ours"], t[f"captum{p}"], ">= 1x") for p in (64, 256)]
    rows += [row(f"{label} occlusion mode='full' vs Captum ppe={p}", t["full"], t[f"captum{p}"], ">= 1x")
             for p in (64, 256)]
    rows.append(row(f"{label} occlusion (exact, incremental) vs mode='full'", t["ours"], t["full"]))
    one = x[:1]
    t = interleaved({"ours": lambda: ours(one, 0), "anchor": lambda: captum(model, one, 0, 1)}, 1)
    rows.append(row("cuda ResNet-18 1x3x224x224 occlusion vs Captum defaults (ppe=1)", t["ours"], t["anchor"], ">= 5x"))
    return rows


def main():
    args = argument_parser(__doc__).parse_args()
    print(machine_description(), flush=True)
    rows = bench_cpu(args.quick) if args.device == "cpu" else bench_cuda(args.quick)
    finish(args, "occlusion", rows, title="Occlusion benchmarks",
           notes="ratio = anchor / ours (speedup) for '>=' targets and the info rows; ours / floor for "
                 "'<='. The machine may have been shared with other jobs (noisy).")


if __name__ == "__main__":
    main()
