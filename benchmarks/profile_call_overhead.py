"""Where a call's fixed cost goes: torch.profiler over cv.saliency / guided_backprop /
grad_cam on a tiny CNN (batch 1) against the bare forward + autograd.grad, on cpu or cuda.
Prints, per contender, the CPU time per call, the host-device syncs per call, and the ops
with the most CPU time; on cuda, also ResNet-18 16x3x224x224: bare forward + grad, saliency,
and saliency with the input's finiteness read turned off, timed in the same run. A probe
behind benchmarks/bench_overhead.py; the H200 output is in
results/profile-call-overhead-*-nvidia-h200.txt.

    python benchmarks/profile_call_overhead.py [cpu|cuda]
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
import cnnviz_fast as cv  # noqa: E402

device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval().to(device)
x = torch.rand(1, 1, 8, 8, device=device)


def bare():
    leaf = x.detach().requires_grad_(True)
    return torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)[0]


contenders = {"bare": bare, "saliency": lambda: cv.saliency(model, x, 1),
              "guided_backprop": lambda: cv.guided_backprop(model, x, 1),
              "grad_cam": lambda: cv.grad_cam(model, x, "0", 1)}
calls = 50
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
for name, fn in contenders.items():
    for _ in range(10):
        fn()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) / calls * 1e6
    events = prof.key_averages()
    ops_us = sum(e.self_cpu_time_total for e in events) / calls
    syncs = {e.key: e.count / calls for e in events
             if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")}
    print(f"\n=== {name} ({device}): {wall_us:.0f} us per call (wall), {ops_us:.0f} us in profiled ops; "
          f"scalar reads / syncs per call: {syncs}")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    for e in top:
        print(f"  {e.key[:60]:60s} {e.count / calls:6.1f}/call {e.self_cpu_time_total / calls:8.1f} us/call")


# Does the one read of the input check (check_finite: is the sum finite?) cost time on a GPU?
# ResNet-18, 16 x 3 x 224 x 224: bare forward + grad, saliency, and saliency with the check off.
if device == "cuda":
    from torch.utils import benchmark

    import cnnviz_fast.core.validation as validation
    from cnnviz_fast import zoo

    resnet, images = zoo.resnet18().eval().cuda(), torch.rand(16, 3, 224, 224, device="cuda")
    targets = torch.arange(16) * 37 % 1000

    def bare16():
        leaf = images.detach().requires_grad_(True)
        return torch.autograd.grad(resnet(leaf).gather(1, targets.cuda()[:, None]).sum(), leaf)[0].abs()

    def unchecked():
        saved = validation.check_finite
        validation.check_finite = lambda tensor, argument: tensor
        try:
            return cv.saliency(resnet, images, targets)
        finally:
            validation.check_finite = saved

    runs = {"bare": bare16, "saliency": lambda: cv.saliency(resnet, images, targets), "saliency, no finite read": unchecked}
    timers = {k: benchmark.Timer("f()", globals={"f": f}) for k, f in runs.items()}
    best = {k: float("inf") for k in runs}
    for _ in range(5):  # interleaved rounds, the minimum of each
        for k in runs:
            best[k] = min(best[k], timers[k].timeit(20).mean)
    for k, seconds in best.items():
        print(f"ResNet-18 16x3x224x224 {k:28s} {seconds * 1e3:7.2f} ms  ({seconds / best['bare']:.2f}x bare)")
