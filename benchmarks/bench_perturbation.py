"""Perturbation-family benchmarks: ours timed beside the anchors in the same run.

    python benchmarks/bench_perturbation.py [--only cams,segments] [--quick] [--size S] [--masks M] [--no-write]

cams (CPU, ResNet-18 with random weights and one 224x224 noise image, or with
--model efficientnet-lite0 the zoo's trained EfficientNet-Lite0 on scikit-image's
astronaut at layer _act_head; --quick: 64x64):
  ablation_cam (layer4) vs pytorch-grad-cam AblationCAM (batch_size 32, its default)   target: >= 20x
  score_cam (layer4) vs pytorch-grad-cam ScoreCAM at its default batch size (16)       target: >= 2x
  score_cam (layer4) vs pytorch-grad-cam ScoreCAM at batch size 64                     target: >= 1.3x
  rise (--masks masks, default 4000) vs a plain implementation: the same masks
  materialised beforehand (not timed), masked batches of 100 (the paper code's), scores
  @ masks                                                                              target: >= 1.3x
memory (CPU, ResNet-50 with random weights, one 224x224 image, layer4's 2,048 channels):
  peak resident memory a Score-CAM call adds above the model and its clean forward pass
  (the resident set sampled every 10 ms),
  ours (64-row passes, the largest the default picks) vs pytorch-grad-cam ScoreCAM at
  its default batch size; each in a child process stopped after --memory-seconds (every
  pass of the call holds the same tensors, so its peak is reached in the first passes;
  pytorch-grad-cam builds its 2048 x 3 x 224 x 224 masked inputs before the first pass).
  target: ours < 1 GiB
fold (CPU, random-weight ResNet-18, channels-last 224x224 batches of 8 and 32 rows):
  the forward pass of the batch-norm-folded copy the masked passes run
  (attribution/occlusion/folding.py) vs the model itself, outputs checked equal first;
  interleaved torch.utils.benchmark rounds; and the folded graph kept for a repeated call
  vs building it (capture + folding). Written to perturbation-fold-<machine>.
segments: feature ablation / Shapley sampling / LIME (written by another section).
The maps are checked equal first (pytorch-grad-cam's after its min-max scaling).
Score-CAM and RISE rows carry ``floor_s``: the anchor's forward passes alone at our
fastest (common.forward_floor: the folded copy, channels-last batches of the best size),
and ``ceiling`` = anchor / floor, the most an implementation running the same passes
could gain (Score-CAM skips the passes of channels that are zero everywhere, so it can
pass its ceiling).
Each contender runs once per round (a call takes seconds to minutes), in turn.
Results: benchmarks/results/perturbation-<machine>.{md,json} (--only memory: perturbation-memory-<machine>).
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Dict, List

import numpy as np
import torch

from common import TIMING, argument_parser, astronaut, ceiling, finish, forward_floor, machine_description, row

from pytorch_grad_cam import AblationCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import cnnviz_fast as cv
from cnnviz_fast import zoo
from cnnviz_fast.core import capture_layers
from cnnviz_fast.ops import reference

warnings.filterwarnings("ignore")
SECTIONS = ("cams", "memory", "fold", "segments")


def once(contenders: Dict[str, Callable[[], object]], rounds: int = 1) -> Dict[str, float]:
    """Seconds of one call of each contender, in turn; the minimum over ``rounds``."""
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    return {name: min(t) for name, t in times.items()}


def normalised(cam: torch.Tensor) -> np.ndarray:
    cam = cam.double().numpy()
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


def check_cam(ours: torch.Tensor, theirs: np.ndarray, what: str) -> float:
    r = float(np.corrcoef(normalised(ours).ravel(), theirs.ravel())[0, 1])
    assert r >= 0.9999, f"{what}: correlation {r}"
    return r


def grad_cam_anchor(cls, model, x, layer, target, batch_size=None):
    def run():
        with cls(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            if batch_size is not None:
                cam.batch_size = batch_size
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    return run


def plain_rise(model, x, target, masks: torch.Tensor, p: float, batch: int = 100):
    """The paper's algorithm on materialised masks [M, H, W]: scores @ masks / (M p)."""
    def run():
        with torch.no_grad():
            scores = torch.cat([model(x * masks[i:i + batch, None])[:, target] for i in range(0, len(masks), batch)])
            return (scores @ masks.flatten(1)).view(1, *x.shape[2:]) / len(masks) / p
    return run


def cam_setting(model_name: str, size: int):
    """(model, image [1, 3, size, size], target, layer, label) of the cams section."""
    if model_name == "resnet18":
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        return zoo.resnet18(), x, 3, "layer4", f"cpu ResNet-18 1x3x{size}x{size} layer4"
    model = zoo.efficientnet_lite0()
    x = zoo.EFFICIENTNET_LITE0_NORMALIZE(astronaut(size))
    with torch.no_grad():
        target = int(model(x).argmax())
    return model, x, target, "_act_head", f"cpu EfficientNet-Lite0 astronaut 1x3x{size}x{size} _act_head"


def bench_cams(size: int, masks: int, model_name: str = "resnet18") -> List[dict]:
    model, x, target, layer, label = cam_setting(model_name, size)
    rows = []

    ours = lambda: cv.ablation_cam(model, x, layer, target)  # noqa: E731
    theirs = grad_cam_anchor(AblationCAM, model, x, layer, target)
    r = check_cam(ours(), theirs(), "ablation_cam")
    t = once({"ours": ours, "anchor": theirs})
    rows.append(row(f"{label} ablation_cam vs AblationCAM (batch 32)", t["ours"], t["anchor"], ">= 20x", unit="s",
                    correlation=round(r, 7)))

    ours = lambda: cv.score_cam(model, x, layer, target)  # noqa: E731
    default, best = (grad_cam_anchor(ScoreCAM, model, x, layer, target, b) for b in (None, 64))
    r = check_cam(ours(), default(), "score_cam")
    t = once({"ours": ours, "default": default, "best": best})
    with torch.no_grad(), capture_layers(model, [layer]) as captured:
        model(x)
    K = captured[layer].shape[1]
    floor = forward_floor(model, x, target, K + 1)  # the clean pass and one per channel
    rows.append(row(f"{label} score_cam vs ScoreCAM (batch 16, default)", t["ours"], t["default"], ">= 2x",
                    unit="s", correlation=round(r, 7), **ceiling(t["default"], floor)))
    rows.append(row(f"{label} score_cam vs ScoreCAM (batch 64)", t["ours"], t["best"], ">= 1.3x", unit="s",
                    **ceiling(t["best"], floor)))

    p, seed = 0.5, 0
    m = reference.rise_masks(seed, 7, p, size, size, 0, masks)
    ours = lambda: cv.rise(model, x, target, masks=masks, p=p, seed=seed)  # noqa: E731
    plain = plain_rise(model, x, target, m, p)
    a, b = ours(), plain()
    error = float((a - b).norm() / b.norm())
    assert error < 1e-4, f"rise: relative difference {error}"
    t = once({"ours": ours, "plain": plain})
    floor = forward_floor(model, x, target, masks + 1)  # the clean pass and one per mask
    rows.append(row(f"{label.rsplit(' ', 1)[0]} rise ({masks} masks) vs plain (materialised masks, batch 100)",
                    t["ours"], t["plain"], ">= 1.3x", unit="s", rel_error=f"{error:.1e}", **ceiling(t["plain"], floor)))
    return rows


MEMORY_CHILD = r"""
import os, sys, threading, time, warnings
warnings.filterwarnings("ignore")
import torch
import cnnviz_fast as cv
which, seconds = sys.argv[1], float(sys.argv[2])
model = __import__("torchvision").models.resnet50().eval()
x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
with torch.no_grad():
    model(x)
base, peak = rss(), [0]
def sample():  # the resident set every 10 ms: its largest value above base
    while True:
        peak[0] = max(peak[0], rss() - base)
        time.sleep(0.01)
def report():
    print(f"PEAK {peak[0]}", flush=True)
    os._exit(0)
threading.Thread(target=sample, daemon=True).start()
threading.Timer(seconds, report).start()
if which == "ours":
    cv.score_cam(model, x, "layer4", 3, batch_size=64)
else:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with ScoreCAM(model=model, target_layers=[model.layer4]) as cam:
        cam(input_tensor=x, targets=[ClassifierOutputTarget(3)])
report()
"""


def peak_extra_bytes(which: str, seconds: float) -> int:
    """Peak resident memory (bytes) a Score-CAM call adds in a child process (see the docstring)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, which, str(seconds)], capture_output=True, text=True,
                         check=True, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1])).stdout
    print(f"  {which}: {out.strip()}", flush=True)
    peak = int(next(line for line in out.splitlines() if line.startswith("PEAK")).split()[1])
    if peak <= 0:
        raise RuntimeError(f"{which}: no memory measured above the model's own ({out.strip()})")
    return peak


def bench_memory(seconds: float) -> List[dict]:
    ours, theirs = peak_extra_bytes("ours", seconds), peak_extra_bytes("anchor", seconds)
    gib = 2**30
    return [row("cpu ResNet-50 1x3x224x224 layer4 (2,048 channels) score_cam peak extra memory vs ScoreCAM (batch 16)",
                ours / gib, theirs / gib, "", unit="GiB", goal="ours < 1 GiB",
                result="PASS" if ours < gib else "MISS")]


def bench_fold() -> List[dict]:
    import importlib
    import torchvision
    from common import interleaved
    folding = importlib.import_module("cnnviz_fast.attribution.occlusion.folding")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    folded = folding.folded_model(model)
    rows = []
    with torch.no_grad():
        for batch in (8, 32):
            x = torch.rand(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
            error = float((folded(x) - model(x)).norm() / model(x).norm())
            assert error < 1e-4, f"folded copy: relative difference {error}"
            t = interleaved({"folded": lambda: folded(x), "model": lambda: model(x)}, rounds=3)
            rows.append(row(f"cpu ResNet-18 {batch}x3x224x224 channels-last forward: batch norm folded vs the model",
                            t["folded"], t["model"], "", unit="ms", rel_error=f"{error:.1e}"))
    # a repeated call finds the folded graph kept for the unchanged model; a changed one is rebuilt
    building, found = [], []
    for _ in range(5):
        fresh = torchvision.models.resnet18().eval()
        start = time.perf_counter()
        built = folding.folded_model(fresh)
        building.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert folding.folded_model(fresh) is built
        found.append(time.perf_counter() - start)
    rows.append(row("cpu ResNet-18 folded graph for a repeated call: kept vs built (capture + folding), median of 5",
                    float(np.median(found)), float(np.median(building)), "", unit="ms"))
    return rows


def main():
    parser = argument_parser(__doc__, SECTIONS)
    parser.add_argument("--masks", type=int, default=None, help="RISE masks (default 4000; --quick 100)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 224; --quick 64)")
    parser.add_argument("--memory-seconds", type=float, default=40.0, help="how long each memory child runs")
    parser.add_argument("--model", choices=("resnet18", "efficientnet-lite0"), default="resnet18",
                        help="the cams section's model (results file suffixed with a model other than resnet18)")
    args = parser.parse_args()
    print(machine_description(), flush=True)
    masks = args.masks or (100 if args.quick else 4000)
    rows = []
    if "cams" in args.only:
        rows += bench_cams(args.size or (64 if args.quick else 224), masks, args.model)
    if "memory" in args.only:
        rows += bench_memory(args.memory_seconds)
    if "fold" in args.only:
        rows += bench_fold()
    # the memory rows and the folding rows alone go to their own files, so that they do not replace the timings
    alone = list(args.only)[0] if len(args.only) == 1 and args.only[0] in ("memory", "fold") else None
    notes = {"memory": "Peak extra resident memory of one Score-CAM call on a random-weight ResNet-50 (one 224x224 "
                       "image, layer4), each contender in a child process stopped after "
                       f"{args.memory_seconds:g} s; ratio = anchor / ours.",
             "fold": "ratio = the model's time / the folded copy's (the forward passes of the masked batches)."}.get(
        alone, "ratio = anchor / ours. " + ("Random-weight ResNet-18, one 224x224 noise image" if args.model == "resnet18"
                                            else "The zoo's trained EfficientNet-Lite0, scikit-image's astronaut at "
                                                 "224x224, its predicted class")
        + ", each contender timed once (calls of seconds to minutes), in turn, after the maps were checked equal. "
          "floor_s: the anchor's forward passes alone at our fastest; ceiling = anchor / floor.")
    timing = {"memory": "the resident set of the child process (/proc/self/statm) sampled every 10 ms, its largest "
                        "value above the level after the model's first forward pass",
              "fold": TIMING}.get(alone, "time.perf_counter around one call of each contender in turn "
                                         "(bench_perturbation.once; the equality check before it ran each contender "
                                         "once)")
    name = f"perturbation-{alone}" if alone else "perturbation"
    if args.model != "resnet18" and not alone:
        name += "-" + args.model
    finish(args, name, rows, title="Perturbation-family benchmarks",
           notes=notes, timing=timing)


if __name__ == "__main__":
    main()
