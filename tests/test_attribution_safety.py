"""Production safety of the gradient attributions: the model and the inputs are left
exactly as they were (also after an exception), no parameter gradients, bad arguments
raise ValueError naming the argument, grad-mode independence, thread safety, memory
bounded by batch_size, CPU/CUDA agreement."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Neuron, zoo
from cnnviz_fast.core.model_state import _HOOK_DICTS

METHODS = {
    "saliency": lambda m, x, t: cv.saliency(m, x, t),
    "smoothgrad": lambda m, x, t: cv.smoothgrad(m, x, t, samples=3, batch_size=2, seed=0),
    "integrated_gradients": lambda m, x, t: cv.integrated_gradients(m, x, t, steps=3, batch_size=2),
    "guided_backprop": lambda m, x, t: cv.guided_backprop(m, x, t),
    "deconvnet": lambda m, x, t: cv.deconvnet(m, x, t),
    "grad_cam": lambda m, x, t: cv.grad_cam(m, x, "block.conv", t),
    "guided_grad_cam": lambda m, x, t: cv.guided_grad_cam(m, x, "block.conv", t),
}


class Exploding(nn.Module):
    """Small CNN with batch norm, dropout and functional ReLUs; raises on demand."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv2d(3, 6, 3, padding=1))
        self.block.add_module("bn", nn.BatchNorm2d(6))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 8 * 8, 5)
        self.explode = False
        self.batches = []  # sizes of the batches seen

    def forward(self, x):
        self.batches.append(x.shape[0])
        x = F.relu(self.block(x), inplace=True)
        if self.explode:
            raise RuntimeError("boom")
        return self.fc(self.drop(x).flatten(1).relu())


def snapshot(model):
    modules = list(model.modules())
    return {
        "training": [m.training for m in modules],
        "hooks": [{name: list(getattr(m, name, {}) or {}) for name in _HOOK_DICTS} for m in modules],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "children": [dict(m._modules) for m in modules],
    }


def assert_same(before, after):
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["children"] == after["children"]
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert torch._C._len_torch_function_stack() == 0  # ReLU interception gone
    assert torch.is_grad_enabled()


def prepared_model(train: bool):
    torch.manual_seed(0)
    model = Exploding().train(train)
    model.block.conv.weight.grad = torch.full_like(model.block.conv.weight, 0.5)  # a user's own gradient
    model.block.bn.weight.requires_grad_(False)
    model.fc.register_forward_hook(lambda *a: None)  # a user's hook stays
    return model


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_model_restored_after_success_and_after_exception(method, train):
    model = prepared_model(train)
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    result = METHODS[method](model, x, [1, 3])
    assert not result.requires_grad
    assert_same(before, snapshot(model))
    model.explode = True
    with pytest.raises(RuntimeError, match="boom"):
        METHODS[method](model, x, [1, 3])
    assert_same(before, snapshot(model))
    model.explode = False  # and the model still works normally afterwards
    torch.testing.assert_close(METHODS[method](model, x, [1, 3]), result)


def test_runs_in_eval_mode_and_leaves_batch_norm_statistics():
    model = zoo.resnet18(num_classes=4).train()
    x = torch.randn(2, 3, 32, 32)
    in_train = cv.saliency(model, x, 1)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(in_train, cv.saliency(model.eval(), x, 1))


@pytest.mark.parametrize("method", METHODS)
def test_inputs_untouched(method):
    model = prepared_model(False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x.grad = torch.ones_like(x)
    grad, copy = x.grad, x.detach().clone()
    METHODS[method](model, x, 2)
    assert x.requires_grad and x.grad is grad and torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(x.detach(), copy)
    y = torch.randn(2, 3, 8, 8)
    METHODS[method](model, y, 2)
    assert not y.requires_grad and y.grad is None


class WritesIntoItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x.mul_(2)  # legal when x does not require grad
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))


def test_grad_cam_protects_inputs_from_a_model_writing_into_them():
    model = WritesIntoItsInput().eval()
    x = torch.randn(2, 3, 8, 8)
    copy = x.clone()
    cv.grad_cam(model, x, "conv", 1)
    assert torch.equal(x, copy)


@pytest.mark.parametrize("method", METHODS)
def test_same_result_under_no_grad_and_inference_mode(method):
    model = prepared_model(False)
    x = torch.randn(2, 3, 8, 8)
    expected = METHODS[method](model, x, [0, 4])
    with torch.no_grad():
        torch.testing.assert_close(METHODS[method](model, x, [0, 4]), expected)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inference_x = x.clone()
        torch.testing.assert_close(METHODS[method](model, inference_x, [0, 4]), expected)
        assert torch.is_inference_mode_enabled()


BAD_ARGUMENTS = [
    ("inputs", lambda m, x: cv.saliency(m, x[0], 1)),
    ("inputs", lambda m, x: cv.guided_backprop(m, x.masked_fill(x > 1, float("nan")), 1)),
    ("inputs", lambda m, x: cv.grad_cam(m, x.long(), "block.conv", 1)),
    ("target", lambda m, x: cv.saliency(m, x, 5)),
    ("target", lambda m, x: cv.deconvnet(m, x, [0, 1, 2])),
    ("target", lambda m, x: cv.smoothgrad(m, x, [0, -1], samples=2)),
    ("target", lambda m, x: cv.saliency(m, x, None)),
    ("target", lambda m, x: cv.guided_backprop(m, x, Neuron("block.conv", 6))),
    ("target.layer", lambda m, x: cv.saliency(m, x, Neuron("block.nope", 0))),
    ("layer", lambda m, x: cv.grad_cam(m, x, "block.conv2", 1)),
    ("layer", lambda m, x: cv.guided_grad_cam(m, x, "fc", 1)),
    ("steps", lambda m, x: cv.integrated_gradients(m, x, 1, steps=0)),
    ("baseline", lambda m, x: cv.integrated_gradients(m, x, 1, baseline=torch.zeros(3, 3, 8, 8))),
    ("baseline", lambda m, x: cv.integrated_gradients(m, x, 1, baseline=float("nan"))),
    ("baseline", lambda m, x: cv.integrated_gradients(m, x, 1, baseline="zeros")),
    ("noise", lambda m, x: cv.smoothgrad(m, x, 1, noise=-0.1)),
    ("samples", lambda m, x: cv.smoothgrad(m, x, 1, samples=0)),
    ("batch_size", lambda m, x: cv.smoothgrad(m, x, 1, batch_size=0)),
    ("batch_size", lambda m, x: cv.integrated_gradients(m, x, 1, batch_size=1.5)),
    ("model", lambda m, x: cv.saliency(lambda t: t, x, 1)),
]


@pytest.mark.parametrize("argument,call", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(argument, call):
    model = prepared_model(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"(^|\W){argument}\W"):
        call(model, torch.randn(2, 3, 8, 8))
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_memory_bounded_by_batch_size(method):
    model = prepared_model(False)
    x = torch.randn(3, 3, 8, 8)
    copies = 7
    if method == "smoothgrad":
        cv.smoothgrad(model, x, [0, 1, 2], samples=copies, batch_size=4)
    else:
        cv.integrated_gradients(model, x, [0, 1, 2], steps=copies, batch_size=4)
    assert model.batches == [4, 4, 4, 4, 4, 1]  # 21 rows, never more than 4 at a time


def test_threads_with_different_models_match_sequential():
    """Guided backprop in one thread must not leak its ReLU interception into another
    thread computing plain gradients of a functional-ReLU model at the same time."""
    pixels, labels = zoo.digits()
    x, labels = zoo.DIGITS_NORMALIZE(pixels[:3]), labels[:3]
    model_a, model_b = zoo.digits_cnn(relu="functional"), zoo.digits_cnn(relu="functional")
    jobs = {
        "a": lambda: cv.guided_backprop(model_a, x, labels),
        "b": lambda: cv.saliency(model_b, x, labels, abs=False),
    }
    expected = {name: job() for name, job in jobs.items()}
    results = {name: [] for name in jobs}
    barrier = threading.Barrier(2)

    def run(name):
        barrier.wait()
        for _ in range(4):
            results[name].append(jobs[name]())

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.allclose(expected["a"], expected["b"])
    for name in jobs:
        assert len(results[name]) == 4
        for result in results[name]:
            torch.testing.assert_close(result, expected[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    model = prepared_model(False)
    x = torch.randn(2, 3, 8, 8)
    on_cpu = METHODS[method](model, x, [1, 2])
    if method == "smoothgrad":  # same noise on both devices
        noise = lambda m, t, tg: cv.smoothgrad(m, t, tg, noise=0.0, samples=2)  # noqa: E731
        on_cpu = noise(model, x, [1, 2])
        on_cuda = noise(model.cuda(), x.cuda(), [1, 2])
    else:
        on_cuda = METHODS[method](model.cuda(), x.cuda(), torch.tensor([1, 2], device="cuda"))
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_digits_functional_guided_and_grad_cam():
    pixels, labels = zoo.digits()
    # float64 on both devices: the comparison is of our code, not of two float32 roundings
    x, labels = zoo.DIGITS_NORMALIZE(pixels[:4]).double(), labels[:4]
    model = zoo.digits_cnn(relu="functional").double()
    cpu = (cv.guided_backprop(model, x, labels), cv.grad_cam(model, x, "features.relu5", labels),
           cv.integrated_gradients(model, x, labels, steps=16))
    model, x, labels = model.cuda(), x.cuda(), labels.cuda()
    cuda = (cv.guided_backprop(model, x, labels), cv.grad_cam(model, x, "features.relu5", labels),
            cv.integrated_gradients(model, x, labels, steps=16))
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-7, atol=1e-9)
