"""The fixed cost of one call, as a service pays it: batch 1, a small model.

    python benchmarks/bench_overhead.py [--quick] [--no-write]

overhead = time(method on the small model) - time(the same work written bare: one forward
and one ``torch.autograd.grad`` on the same model and input). What remains is what the
package adds per call: input checks, ``model_guard`` (snapshot and restore of the model's
state), the ReLU interception, hooks, target selection.

Anchor: a bare forward + ``torch.autograd.grad`` w.r.t. the input of ResNet-18 (random
weights) at 1x3x224x224 on this CPU. Target (issue 9): overhead <= 5% of the anchor.
Every contender is timed by ``common.interleaved``: the minimum over rounds of the mean of
``number`` calls. Rows: ours = the overhead, anchor = the ResNet-18 anchor, ratio = their share;
the first row times ``model_guard`` alone on ResNet-18 (the part that grows with the model).
"""
from __future__ import annotations

import torch

from common import argument_parser, finish, interleaved, machine_description, row

import cnnviz_fast as cv
from cnnviz_fast import zoo
from cnnviz_fast.core import model_guard


def bare_gradient(model, x, target: int):
    """What a caller would write without the package: forward, pick the score, input gradient."""
    def run():
        inputs = x.detach().requires_grad_(True)
        score = model(inputs)[:, target].sum()
        return torch.autograd.grad(score, inputs)[0]
    return run


def bare_grad_cam(model, x, layer, target: int):
    """Forward with a hook keeping the layer's output, gradient w.r.t. it, weighted sum."""
    module = model.get_submodule(layer)

    def run():
        kept = {}
        handle = module.register_forward_hook(lambda m, a, out: kept.__setitem__("a", out))
        try:
            score = model(x)[:, target].sum()
        finally:
            handle.remove()
        (grads,) = torch.autograd.grad(score, kept["a"])
        cam = torch.relu((grads.mean((2, 3), keepdim=True) * kept["a"]).sum(1, keepdim=True))
        return torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
    return run


def small_models(device):
    """(name, model, input, layer): a tiny CNN, whose own compute is so small that the
    difference to the bare code is the package's fixed cost, and the zoo digits CNN."""
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    yield "tiny CNN, 1x1x8x8", tiny.to(device), torch.rand(1, 1, 8, 8, device=device), "0"
    digits = zoo.digits_cnn().to(device)
    yield ("digits CNN, 1x1x32x32", digits, zoo.DIGITS_NORMALIZE(zoo.digits("test")[0][:1]).to(device),
           "features.conv3")


def main(argv=None) -> None:
    args = argument_parser(__doc__).parse_args(argv)
    print(machine_description(), flush=True)
    rounds, number = (3, 20) if args.quick else (10, 40)

    resnet = zoo.resnet18().eval().to(args.device)
    image = torch.rand(1, 3, 224, 224, device=args.device)
    anchor = interleaved({"resnet18": bare_gradient(resnet, image, 1)}, rounds=max(3, rounds // 3), number=3)
    anchor = anchor["resnet18"]

    def guard_only():  # the per-call snapshot and restore of the model, on ResNet-18 itself
        with model_guard(resnet):
            pass

    guard = interleaved({"guard": guard_only}, rounds, number)["guard"]
    rows = [row(f"{args.device} model_guard enter + exit on ResNet-18 (68 modules): share of its forward + grad",
                guard, anchor, "<= 0.05x")]
    for model_name, small, x, layer in small_models(args.device):
        target = int(small(x).argmax())
        explain_saliency = cv.Explainer(small, "saliency")
        explain_cam = cv.Explainer(small, "grad_cam", layer=layer)
        graphs = args.device == "cuda"  # Explainer(cuda_graph=True): the whole call replayed at once
        if graphs:
            graph_saliency = cv.Explainer(small, "saliency", cuda_graph=True)
            graph_cam = cv.Explainer(small, "grad_cam", layer=layer, cuda_graph=True)
        # pairs (ours, the same work written bare); the overhead is their difference
        cases = {
            "saliency": (lambda: cv.saliency(small, x, target), bare_gradient(small, x, target)),
            "saliency, target='predicted', return_output": (
                lambda: cv.saliency(small, x, "predicted", return_output=True), bare_gradient(small, x, target)),
            "guided_backprop": (lambda: cv.guided_backprop(small, x, target), bare_gradient(small, x, target)),
            "grad_cam": (lambda: cv.grad_cam(small, x, layer, target), bare_grad_cam(small, x, layer, target)),
            "Explainer(saliency)": (lambda: explain_saliency(x), bare_gradient(small, x, target)),
            "Explainer(grad_cam)": (lambda: explain_cam(x), bare_grad_cam(small, x, layer, target)),
        }
        if graphs:
            cases["Explainer(saliency, cuda_graph=True)"] = (lambda: graph_saliency(x), bare_gradient(small, x, target))
            cases["Explainer(grad_cam, cuda_graph=True)"] = (lambda: graph_cam(x), bare_grad_cam(small, x, layer, target))
        contenders = {}
        for name, (ours, bare) in cases.items():
            contenders[name], contenders[name + " (bare)"] = ours, bare
        times = interleaved(contenders, rounds, number)
        rows += [row(f"{args.device} {model_name} {name}: overhead vs ResNet-18 forward + autograd.grad",
                     times[name] - times[name + " (bare)"], anchor, "<= 0.05x",
                     call_ms=times[name] * 1e3, bare_ms=times[name + " (bare)"] * 1e3) for name in cases]
    # the sync-free checks at a size where the GPU's work, not the host, bounds the call: our
    # saliency against one bare forward + autograd.grad (issue 21: <= 1.05x), guided backprop
    # against our saliency (<= 1.10x)
    batch = torch.rand(16 if not args.quick else 2, 3, 224, 224, device=args.device)
    big = interleaved({"bare": bare_gradient(resnet, batch, 1), "saliency": lambda: cv.saliency(resnet, batch, 1),
                       "guided": lambda: cv.guided_backprop(resnet, batch, 1)}, max(3, rounds // 3), 3)
    rows.append(row(f"{args.device} ResNet-18 {batch.shape[0]}x3x224x224 saliency vs bare forward + autograd.grad",
                    big["saliency"], big["bare"], "<= 1.05x"))
    rows.append(row(f"{args.device} ResNet-18 {batch.shape[0]}x3x224x224 guided_backprop vs our saliency",
                    big["guided"], big["saliency"], "<= 1.10x"))
    finish(args, "overhead", rows, title="Fixed cost of a call (batch 1)",
           notes=("Batch 1: a tiny CNN (conv 1->4, ReLU, pool, linear on 1x1x8x8: the fixed cost alone) and the "
                  "zoo's digits CNN; anchor ResNet-18 at 1x3x224x224, random weights. "
                  f"{rounds} rounds of {number} calls. Overhead = ours - the same work written bare "
                  "(call_ms - bare_ms); ratio = overhead / anchor, target <= 5%."))


if __name__ == "__main__":
    main()
