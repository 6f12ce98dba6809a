"""Occlusion section of the attribution benchmarks (timed beside Captum in the same run).

    python benchmarks/_bench_occlusion_section.py [--quick] [--no-write]

CPU: ResNet-18 (1000 classes), one 112x112 image, window 16, stride 8 (13x13 = 169 windows).
  occlusion (default mode="exact": incremental) vs Captum Occlusion at
  perturbations_per_eval 1, 64, 256                                      target: faster (> 1x)
  occlusion mode="full" vs the floor: the bare forward passes it needs (the clean image +
  the same occluded batches, pre-built, under inference_mode)           target: <= 1.10x
  (info) the floor at other batch sizes, to check the memory-budget batch size choice
CUDA (when present): same model, 8 images of 224x224, window 16, stride 8, vs Captum at its
  default settings (perturbations_per_eval=1)                           target: >= 5x
Outputs are checked equal before timing; contenders are timed in interleaved rounds.
Results: benchmarks/results/attribution-occlusion-<machine>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_description, write_results  # noqa: E402

from captum.attr import Occlusion  # noqa: E402

from cnnviz_fast import zoo  # noqa: E402
from cnnviz_fast.attribution import occlusion  # noqa: E402
from cnnviz_fast.attribution.occlusion import _chunks, _clean_pass, choose_batch_size  # noqa: E402
from cnnviz_fast.ops import occlude, occlusion_grid  # noqa: E402


def interleaved(contenders: Dict[str, Callable], rounds: int) -> Dict[str, float]:
    """Median seconds per call of each contender, timed one call each per round, in turn."""
    for fn in contenders.values():
        fn()  # warm-up
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}) for name, fn in contenders.items()}
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.timeit(1).mean)
    return {name: statistics.median(t) for name, t in times.items()}


def row(name, ours, anchor, target, ratio=None):
    """``ratio`` = anchor / ours (speedup) unless given; target like '> 1x', '<= 1.10x', '>= 5x'."""
    ratio = anchor / ours if ratio is None else ratio
    if target.startswith(">="):
        ok = ratio >= float(target[2:].strip(" x"))
    elif target.startswith(">"):
        ok = ratio > float(target[1:].strip(" x"))
    elif target.startswith("<="):
        ok = ratio <= float(target[2:].strip(" x"))
    else:
        ok = None
    result = "" if ok is None else ("PASS" if ok else "MISS")
    print(f"{name:44s} ours {ours * 1e3:9.1f} ms | anchor {anchor * 1e3:9.1f} ms | ratio {ratio:5.2f}"
          + (f" (target {target}: {result})" if target else ""), flush=True)
    return {"name": name, "ours_ms": ours * 1e3, "anchor_ms": anchor * 1e3, "ratio": ratio,
            "target": target, "pass": result}


def captum(model, x, target, window, stride, per_eval):
    C = x.shape[1]
    return Occlusion(model).attribute(x, sliding_window_shapes=(C, *window), strides=(C, *stride),
                                      baselines=0.0, target=target, perturbations_per_eval=per_eval)[:, 0]


def floor_fn(model, x, window, stride, batch_size):
    """The bare forward passes occlusion needs with ``batch_size``, over pre-built batches."""
    N, C, H, W = x.shape
    rows, cols = occlusion_grid(H, W, window, stride)
    batches = [occlude(x[n0:n1], window, stride, 0.0, first, count).reshape(-1, C, H, W)
               for n0, n1, first, count in _chunks(N, rows * cols, batch_size)]

    def run():
        with torch.inference_mode():
            model(x)
            for batch in batches:
                model(batch)
    return run


def default_batch_size(model, x, target):
    with torch.inference_mode():
        _, _, per_image = _clean_pass(model, x, target, keep_output=False, measure=True)
    return choose_batch_size(per_image, x.device)


def bench_cpu(quick: bool) -> List[dict]:
    model = zoo.resnet18()
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    window, stride, target = (16, 16), (8, 8), 3
    rounds = 1 if quick else 5
    batch_size = default_batch_size(model, x, target)
    print(f"CPU: ResNet-18, 1x3x112x112, window {window}, stride {stride}, 169 windows; "
          f"default batch size {batch_size}", flush=True)

    def ours():  # the default: mode="exact" (incremental)
        return occlusion(model, x, target, window=window, stride=stride)

    def ours_full():  # full recomputation at the floor's batch size: the overhead over bare forwards
        return occlusion(model, x, target, window=window, stride=stride, mode="full", batch_size=batch_size)

    per_evals = (1, 64, 256)
    expected = ours()
    for per_eval in per_evals:
        torch.testing.assert_close(expected, captum(model, x, target, window, stride, per_eval),
                                   atol=1e-4, rtol=1e-4)
    contenders = {"ours": ours, "ours_full": ours_full, "floor": floor_fn(model, x, window, stride, batch_size)}
    for per_eval in per_evals:
        contenders[f"captum{per_eval}"] = (
            lambda p=per_eval: captum(model, x, target, window, stride, p))
    t = interleaved(contenders, rounds)
    rows = [row(f"cpu occlusion vs Captum ppe={p}", t["ours"], t[f"captum{p}"], "> 1x") for p in per_evals]
    rows.append(row(f"cpu occlusion mode=full vs bare forwards (batch {batch_size})", t["ours_full"], t["floor"],
                    "<= 1.10x", ratio=t["ours_full"] / t["floor"]))
    if not quick:  # is the budget's batch size a good one? (info)
        sweep = {f"floor{b}": floor_fn(model, x, window, stride, b) for b in (8, 16, 32, 64, 169)}
        sweep["floor"] = contenders["floor"]
        ts = interleaved(sweep, 3)
        for b in (8, 16, 32, 64, 169):
            rows.append(row(f"cpu bare forwards batch {b} vs batch {batch_size}", ts["floor"], ts[f"floor{b}"], ""))
    return rows


def bench_cuda(quick: bool) -> List[dict]:
    if not torch.cuda.is_available():
        print("CUDA: no GPU, skipped", flush=True)
        return []
    model = zoo.resnet18().cuda()
    x = torch.rand(8, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    window, stride, target = (16, 16), (8, 8), list(range(8))

    def ours():
        return occlusion(model, x, target, window=window, stride=stride)

    def anchor():  # Captum at its defaults: one window per forward pass
        return captum(model, x, target, window, stride, 1)

    torch.testing.assert_close(ours(), anchor(), atol=1e-3, rtol=1e-3)
    t = interleaved({"ours": ours, "anchor": anchor}, 1 if quick else 3)
    return [row("cuda occlusion vs Captum defaults (8x224x224)", t["ours"], t["anchor"], ">= 5x")]


def bench_occlusion(quick: bool, device: Optional[str] = None) -> List[dict]:
    """Rows: name, ours_ms, anchor_ms, ratio, target, pass. ``device`` None runs the CPU
    section and then the CUDA one (skipped without a GPU); "cpu" / "cuda" runs one, so the
    function also fits bench_attribution.py's ``SECTIONS`` (``(quick, device) -> rows``)."""
    if device is None:
        return bench_cpu(quick) + bench_cuda(quick)
    return bench_cuda(quick) if torch.device(device).type == "cuda" else bench_cpu(quick)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, no batch-size sweep")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    print(machine_description(), flush=True)
    rows = bench_occlusion(args.quick)
    if not args.no_write:
        notes = ("ratio = anchor / ours (speedup), except 'vs bare forwards': ours / floor. "
                 "Interleaved rounds, median; the machine may have been shared (noisy).")
        print(write_results("attribution-occlusion", rows, notes=notes, title="Occlusion benchmarks"))


if __name__ == "__main__":
    main()
