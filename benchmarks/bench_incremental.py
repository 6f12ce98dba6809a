"""Incremental occlusion against full recomputation and Captum, same run.

    python benchmarks/bench_incremental.py [--quick] [--device cpu|cuda] [--threads N] [--models resnet18,vgg16,mobilenet,efficientnet] [--no-write]

One 3x224x224 image (scikit-learn's "flower" photo, shipped with the package's
dependencies), window 16, stride 8 (VGG-16: stride 16), target: the clean image's top
class. Models from torchvision with random weights (ResNet-18's batch norms with random
statistics, so that none is an identity; every batch norm then rescaled to unit output
deviation on the image, without which MobileNetV2's maps are rounding noise); the
MobileNet is torchvision's MobileNetV2 (depthwise convolutions, ReLU6, inverted residuals).
"efficientnet" (not in the default --models): the zoo's trained EfficientNet-Lite0
(TensorFlow SAME padding), the trained 224 px network the approximate targets are meant for.

Per model, after checking that mode="exact" equals mode="full" (and Captum):
  theoretical speedup: multiply-adds of full recomputation / those of the incremental plan
  exact vs full recomputation (measured; and measured / theoretical)    targets: ResNet-18 >= 3x,
                                                                          VGG-16 >= 4x, >= 70% of theoretical
  exact vs Captum Occlusion at its best perturbations_per_eval (of 16, 64) target: >= 5x
  full recomputation (measured batch size) vs Captum's best             target: >= 1x
  approximate (defaults; and field_cap=0.7, drill_down=0.25) vs full   target: >= 20x,
      with Pearson >= 0.95 and top-5% IoU >= 0.8 against exact
  (info) approximate quality on the trained digits CNN (32x32 digits, window 8, stride 2):
      random weights make occlusion maps of random texture, which no approximation
      interpolates; a trained network's maps are what the approximations are for
--photos: approximate mode on the trained EfficientNet-Lite0 over several photos
(zoo.photos(); target: each photo's top class), each setting against exact and full on the
same photo, best of 2 runs; mean and worst photo (results: incremental-photos-<machine>).
Each contender runs once per round (they take seconds to minutes); median over rounds.
Results: benchmarks/results/incremental-<machine>.{md,json}.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_argument, machine_description, synchronize, write_results  # noqa: E402

from captum.attr import Occlusion  # noqa: E402

from cnnviz_fast import zoo  # noqa: E402
from cnnviz_fast.attribution import occlusion  # noqa: E402
from cnnviz_fast.attribution.occlusion import IncrementalOcclusion  # noqa: E402
from cnnviz_fast.ops.reference import occlusion_grid, occlusion_window_bounds  # noqa: E402

CAPTUM_PER_EVAL = (16, 64)
APPROXIMATE = {"approximate": {}, "approximate (cap 0.7, drill 0.25)": dict(field_cap=0.7, drill_down=0.25)}
# more settings for the quality-only run on the trained digits CNN (--quality-only)
QUALITY = {**APPROXIMATE, "approximate (cap 0.8, no drill-down)": dict(field_cap=0.8, drill_down=1.0),
           "approximate (no cap, drill 0.2)": dict(field_cap=1.0, drill_down=0.2),
           "approximate (cap 0.8, drill 0.2)": dict(field_cap=0.8, drill_down=0.2)}


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def unit_variance(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Rescale each batch norm (in forward order) so that its output on ``x`` has unit
    standard deviation: torchvision's MobileNetV2 at random initialisation otherwise
    shrinks its activations ~1e8-fold, leaving occlusion maps of pure rounding noise."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            captured = []
            handle = norm.register_forward_hook(lambda m, a, out: captured.append(out.std()))
            try:
                model(x)
            finally:
                handle.remove()
            norm.weight.div_(captured[0])
            norm.bias.div_(captured[0])
    return model


def random_weights(build: Callable[[], nn.Module]) -> Callable:
    """``device -> (model, image)``: a torchvision model with random weights on the flower
    photo, its batch norms rescaled to unit output deviation."""
    def make(device):
        x = ((zoo.sample_images(224)["flower"] - 0.45) / 0.25).to(device)
        return unit_variance(build().eval().to(device), x), x
    return make


def trained_efficientnet(device):
    """The zoo's trained EfficientNet-Lite0 on the flower photo, its own preprocessing."""
    x = zoo.EFFICIENTNET_LITE0_NORMALIZE(zoo.sample_images(224)["flower"])
    return zoo.efficientnet_lite0().to(device), x.to(device)


# name: (device -> (model, image), stride, exact-vs-full target)
MODELS = {
    "resnet18": (random_weights(lambda: randomize_batchnorm(torchvision.models.resnet18())), 8, 3.0),
    "vgg16": (random_weights(lambda: torchvision.models.vgg16()), 16, 4.0),
    "mobilenet": (random_weights(lambda: torchvision.models.mobilenet_v2()), 8, None),
    "efficientnet": (trained_efficientnet, 8, None),
}


def timed(fn: Callable, rounds: int) -> float:
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def plan_speedup(model, x, target, window, stride) -> float:
    """Multiply-adds of full recomputation / those of the incremental plan."""
    H, W = x.shape[2:]
    engine = IncrementalOcclusion.build(model, target)
    with torch.inference_mode():
        engine.clean(x, torch.zeros((), device=x.device), target)
        bounds = occlusion_window_bounds(H, W, window, stride)
        for chunk in torch.arange(bounds[0].numel()).split(128):
            engine.scores(*(b[chunk] for b in bounds))
    return math.prod(occlusion_grid(H, W, window, stride)) * engine.macs_clean / engine.macs_incremental


def pearson(a, b) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def top_iou(a, b, fraction=0.05) -> float:
    """IoU of the pixels at or above each map's (1 - fraction) quantile."""
    top_a = a >= torch.quantile(a.flatten().double(), 1 - fraction).to(a)
    top_b = b >= torch.quantile(b.flatten().double(), 1 - fraction).to(b)
    return float((top_a & top_b).sum() / (top_a | top_b).sum())


def row(name, ours_s, anchor_s, target="", extra=None):
    ratio = anchor_s / ours_s
    ok = "" if not target else ("PASS" if ratio >= float(target.strip(">= x")) else "MISS")
    print(f"{name:50s} ours {ours_s:8.2f} s | anchor {anchor_s:8.2f} s | ratio {ratio:6.2f}"
          + (f" (target {target}: {ok})" if target else ""), flush=True)
    out = {"name": name, "ours_s": ours_s, "anchor_s": anchor_s, "ratio": ratio, "target": target, "pass": ok}
    out.update(extra or {})
    return out


def bench_model(name: str, rounds: int, device: str = "cpu") -> List[Dict]:
    build, step, exact_target = MODELS[name]
    torch.manual_seed(0)
    model, x = build(device)
    window, stride = (16, 16), (step, step)
    with torch.inference_mode():
        target = int(model(x).argmax())
    rows_, cols_ = occlusion_grid(224, 224, window, stride)
    print(f"\n{name} ({device}): 1x3x224x224, window {window}, stride {stride}, {rows_ * cols_} positions, class {target}",
          flush=True)

    def run(mode, **kw):
        out = occlusion(model, x, target, window=window, stride=stride, mode=mode, **kw)
        synchronize(device)
        return out

    def captum(per_eval):
        out = Occlusion(model).attribute(x, sliding_window_shapes=(3, *window), strides=(3, *stride),
                                         baselines=0.0, target=target, perturbations_per_eval=per_eval)[:, 0]
        synchronize(device)
        return out

    if device != "cpu":  # untimed warm-up: cuDNN's algorithm search, the allocator's first blocks
        run("exact"), run("full"), captum(CAPTUM_PER_EVAL[-1])
    # equality first (on the CPU these runs also warm up every path)
    start = time.perf_counter()
    exact = run("exact")
    t_exact = time.perf_counter() - start
    start = time.perf_counter()
    full = run("full")
    t_full = time.perf_counter() - start
    scale = float(full.abs().max())
    # float32: on a GPU, convolution algorithms change with the batch size (seen: 1.5e-6 of a
    # 9.5e-3 map between Captum's batches and ours), so the GPU check allows 1e-3 of the map
    scale *= 1 if device == "cpu" else 10
    torch.testing.assert_close(exact, full, atol=1e-4 * scale, rtol=1e-3)
    print(f"exact == full (max |difference| {float((exact - full).abs().max()):.2e}, max |map| {scale:.3g})",
          flush=True)
    theoretical = plan_speedup(model, x, target, window, stride)
    times = {"exact": [t_exact], "full": [t_full]}
    for _ in range(rounds - 1):
        times["exact"].append(timed(lambda: run("exact"), 1))
        times["full"].append(timed(lambda: run("full"), 1))
    t_exact, t_full = statistics.median(times["exact"]), statistics.median(times["full"])
    captum_s = {}
    for per_eval in CAPTUM_PER_EVAL:
        start = time.perf_counter()
        ref = captum(per_eval)
        captum_s[per_eval] = time.perf_counter() - start
        torch.testing.assert_close(ref, full, atol=1e-4 * scale, rtol=1e-3)
    best = min(captum_s, key=captum_s.get)
    approximations = {}
    for label, knobs in APPROXIMATE.items():
        start = time.perf_counter()
        approx = run("approximate", **knobs)
        approximations[label] = (time.perf_counter() - start,
                                 {"pearson": pearson(approx, exact), "top5_iou": top_iou(approx[0], exact[0])})

    measured = t_full / t_exact
    name = f"{name} ({device})" if device != "cpu" else name
    out = [row(f"{name} exact vs full recomputation", t_exact, t_full,
               f">= {exact_target}x" if exact_target else "",
               {"theoretical": theoretical, "measured_over_theoretical": measured / theoretical})]
    print(f"{'':50s} theoretical {theoretical:.2f}x, measured/theoretical {measured / theoretical:.2f} "
          f"(target >= 0.7: {'PASS' if measured / theoretical >= 0.7 else 'MISS'})", flush=True)
    out.append(row(f"{name} exact vs Captum best (ppe={best})", t_exact, captum_s[best], ">= 5x"))
    for per_eval, seconds in captum_s.items():
        out.append(row(f"{name} full recomputation vs Captum ppe={per_eval}", t_full, seconds, ">= 1x"))
    for label, (t_approx, quality) in approximations.items():
        out.append(row(f"{name} {label} vs full recomputation", t_approx, t_full, ">= 20x", quality))
        print(f"{'':50s} Pearson {quality['pearson']:.3f} (target >= 0.95), top-5% IoU {quality['top5_iou']:.3f} "
              f"(target >= 0.8)", flush=True)
        out.append(row(f"{name} {label} vs exact", t_approx, t_exact, "", quality))
    return out


def digits_quality(settings: Dict[str, Dict] = APPROXIMATE, device: str = "cpu") -> List[Dict]:
    """Approximation error on a trained network (speed is not the point at 32 px)."""
    pixels, labels = zoo.digits()
    x, labels = zoo.DIGITS_NORMALIZE(pixels[:8]).to(device), labels[:8].to(device)
    model = zoo.digits_cnn().to(device)
    window, stride = (8, 8), (2, 2)
    start = time.perf_counter()
    exact = occlusion(model, x, labels, window=window, stride=stride)
    t_exact = time.perf_counter() - start
    out = []
    for label, knobs in settings.items():
        start = time.perf_counter()
        approx = occlusion(model, x, labels, window=window, stride=stride, mode="approximate", **knobs)
        t_approx = time.perf_counter() - start
        quality = {"pearson": statistics.mean(pearson(a, e) for a, e in zip(approx, exact)),
                   "top5_iou": statistics.mean(top_iou(a, e) for a, e in zip(approx, exact))}
        out.append(row(f"digits CNN (trained, 8 digits) {label} vs exact", t_approx, t_exact, "", quality))
        print(f"{'':50s} mean Pearson {quality['pearson']:.3f}, mean top-5% IoU {quality['top5_iou']:.3f}",
              flush=True)
    return out


# approximate settings compared over photos (--photos)
PHOTO_SETTINGS = {"defaults": {}, "coarse_step 2, no cap, drill 0.2": dict(coarse_step=2, field_cap=1.0, drill_down=0.2),
                  "coarse_step 2, no cap, drill 0.1": dict(coarse_step=2, field_cap=1.0, drill_down=0.1),
                  "coarse_step 2, cap 0.9, drill 0.1": dict(coarse_step=2, field_cap=0.9, drill_down=0.1),
                  "cap 0.8, drill 0.2": dict(field_cap=0.8, drill_down=0.2)}


def photos_quality(names: List[str], device: str = "cpu") -> List[Dict]:
    """Approximate vs exact and full on the trained EfficientNet-Lite0, per photo, then the
    mean and worst photo of each setting (speed vs full and exact, Pearson, top-5% IoU)."""
    model = zoo.efficientnet_lite0().to(device)
    photos = zoo.photos(224)

    def best_of_2(fn):
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            out = fn()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        return out, min(seconds)

    results = {label: [] for label in PHOTO_SETTINGS}
    for name in names:
        x = zoo.EFFICIENTNET_LITE0_NORMALIZE(photos[name]).to(device)
        with torch.inference_mode():
            target = int(model(x).argmax())
        run = lambda **kw: occlusion(model, x, target, window=16, stride=8, **kw)  # noqa: E731
        exact, t_exact = best_of_2(lambda: run(mode="exact"))
        _, t_full = best_of_2(lambda: run(mode="full"))
        print(f"{name} (class {target}): exact {t_exact:.2f} s, full {t_full:.2f} s", flush=True)
        for label, knobs in PHOTO_SETTINGS.items():
            approx, t = best_of_2(lambda: run(mode="approximate", **knobs))
            results[label].append((t_full / t, t_exact / t, pearson(approx, exact), top_iou(approx[0], exact[0])))
            print(f"  {label:36s} {t:.2f} s, {t_full / t:5.1f}x full, {t_exact / t:4.1f}x exact, "
                  f"Pearson {results[label][-1][2]:.3f}, IoU {results[label][-1][3]:.3f}", flush=True)
    print("\n| setting | vs full: mean (worst) | vs exact | Pearson mean / worst | top-5% IoU mean / worst |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for label, per_photo in results.items():
        speed_full, speed_exact, r, iou = zip(*per_photo)
        print(f"| {label} | {statistics.mean(speed_full):.1f}x ({min(speed_full):.1f}) | "
              f"{statistics.mean(speed_exact):.1f}x ({min(speed_exact):.1f}) | {statistics.mean(r):.3f} / {min(r):.3f} | "
              f"{statistics.mean(iou):.3f} / {min(iou):.3f} |")
        rows.append({"setting": label, "photos": ",".join(names),
                     "speedup_vs_full_mean": statistics.mean(speed_full), "speedup_vs_full_worst": min(speed_full),
                     "speedup_vs_exact_mean": statistics.mean(speed_exact), "speedup_vs_exact_worst": min(speed_exact),
                     "pearson_mean": statistics.mean(r), "pearson_worst": min(r),
                     "top5_iou_mean": statistics.mean(iou), "top5_iou_worst": min(iou)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", default="resnet18,vgg16,mobilenet", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--device", type=device_argument, default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quality-only", action="store_true",
                        help="only the approximation error on the trained digits CNN, more settings "
                             "(results: incremental-quality-<machine>)")
    parser.add_argument("--photos", default=None,
                        help="only the approximate settings on the trained EfficientNet-Lite0 over these "
                             "comma-separated zoo.photos() names (e.g. flower,cat,coffee); "
                             "results: incremental-photos-<machine>")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_description(), flush=True)
    if args.photos:
        rows = photos_quality(args.photos.split(","), args.device)
        if not args.no_write:
            print(write_results("incremental-photos", rows, title="Approximate occlusion over photos (trained EfficientNet-Lite0)",
                                notes="224 px, window 16, stride 8, each photo's top class; full, exact and each setting "
                                      "best of 2 runs on the same photo; speedups and quality (Pearson, top-5% IoU "
                                      "against exact): mean and worst photo."))
        return
    if args.quality_only:
        rows = digits_quality(QUALITY, args.device)
        if not args.no_write:
            print(write_results("incremental-quality", rows, title="Approximate occlusion: error on a trained network",
                                notes="Trained digits CNN, 8 test digits 32x32, window 8, stride 2; ratio = exact "
                                      "seconds / approximate seconds; Pearson and top-5% IoU: mean over the digits."))
        return
    rows = []
    rows += digits_quality(device=args.device)
    for name in args.models.split(","):
        rows += bench_model(name, 1 if args.quick else args.rounds, args.device)
    if not args.no_write:
        notes = ("ratio = anchor seconds / ours (speedup). 'theoretical' = multiply-adds of full recomputation / "
                 "those of the incremental plan. One image 3x224x224, window 16, stride 8 (VGG-16: 16); random "
                 "weights. Captum limited to perturbations_per_eval 16 and 64, one run each. "
                 + (f"Device: {args.device}." if args.device != "cpu" else
                    "The 2-core machine was shared with other jobs (see the load average): timings are noisy."))
        print(write_results("incremental", rows, notes=notes, title="Incremental occlusion benchmarks"))


if __name__ == "__main__":
    main()
