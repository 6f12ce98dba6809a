"""Every attribution method on every model format a team deploys: eager, TorchScript
(scripted, traced), torch.compile, torch.export, DataParallel, DistributedDataParallel
and torch.autocast. Each (format x method) equals the eager result or raises one
ValueError that says why and what to pass instead; the model is left as found."""
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Neuron

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")

CUDA = torch.cuda.is_available()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2),
        )
        self.drop = nn.Dropout(0.5)  # any call that forgot eval mode would differ from eager
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).flatten(1)))


# method name -> call(model, x, layer); layer is the conv whose output grad_cam / Neuron use
METHODS = {
    "saliency": lambda m, x, layer: cv.saliency(m, x, [1, 2]),
    "smoothgrad": lambda m, x, layer: cv.smoothgrad(m, x, 1, samples=3, seed=0),
    "integrated_gradients": lambda m, x, layer: cv.integrated_gradients(m, x, 1, steps=3),
    "guided_backprop": lambda m, x, layer: cv.guided_backprop(m, x, 1),
    "deconvnet": lambda m, x, layer: cv.deconvnet(m, x, 1),
    "grad_cam": lambda m, x, layer: cv.grad_cam(m, x, layer, 1),
    "guided_grad_cam": lambda m, x, layer: cv.guided_grad_cam(m, x, layer, 1),
    "occlusion": lambda m, x, layer: cv.occlusion(m, x, 1, window=4, stride=4),
    "neuron": lambda m, x, layer: cv.saliency(m, x, Neuron(layer, 2)),
    "predicted": lambda m, x, layer: cv.saliency(m, x, "predicted", return_output=True),
}

SCRIPT = "TorchScript module.*pass the eager nn.Module"
EXPORT = "torch.export graph.*pass the eager nn.Module"
COMPILE = r"torch.compile'd module.*model._orig_mod"
HOOKS_AND_RECTIFIERS = ("guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam", "neuron")

# format -> {method: regex of the ValueError}; methods not listed equal eager
REFUSED = {
    "eager": {},
    "script": dict.fromkeys(HOOKS_AND_RECTIFIERS, SCRIPT),
    "trace": dict.fromkeys(HOOKS_AND_RECTIFIERS, SCRIPT),
    "compile": dict.fromkeys(("grad_cam", "guided_grad_cam", "neuron"), COMPILE),
    "export": dict.fromkeys(HOOKS_AND_RECTIFIERS, EXPORT),
    "export_static_batch": {
        **dict.fromkeys(HOOKS_AND_RECTIFIERS, EXPORT),
        **dict.fromkeys(("smoothgrad", "integrated_gradients", "occlusion"), "dynamic batch dimension"),
    },
    "exported_program": dict.fromkeys(METHODS, re.escape("pass exported.module()")),
    "data_parallel": {},
    "data_parallel_wrapped_names": {},
    "ddp": {},
    "ddp_wrapped_names": {},
}

# variants that only change what some methods see: run just those (the file stays fast)
LAYER_METHODS = ("grad_cam", "guided_grad_cam", "neuron")
ONLY = {
    "data_parallel_wrapped_names": LAYER_METHODS,
    "ddp_wrapped_names": LAYER_METHODS,
    "export_static_batch": ("saliency", "smoothgrad", "integrated_gradients", "occlusion", "guided_backprop"),
    "exported_program": ("saliency", "guided_backprop", "grad_cam"),
}


def make(fmt, model, x):
    """``(model in that format, layer name to use)``."""
    if fmt == "eager":
        return model, "features.2"
    if fmt == "script":
        return torch.jit.script(model).train(), "features.2"  # model_guard must switch it to eval
    if fmt == "trace":
        return torch.jit.trace(model, x), "features.2"
    if fmt == "compile":
        return torch.compile(model, backend="eager"), "features.2"
    if fmt.startswith("export") or fmt == "exported_program":
        dynamic = None if fmt == "export_static_batch" else ({0: torch.export.Dim("batch")},)
        program = torch.export.export(model, (x,), dynamic_shapes=dynamic)
        return (program if fmt == "exported_program" else program.module()), "features.2"
    if fmt.startswith("data_parallel"):
        return nn.DataParallel(model), ("module.features.2" if fmt.endswith("wrapped_names") else "features.2")
    if fmt.startswith("ddp"):
        return nn.parallel.DistributedDataParallel(model), (
            "module.features.2" if fmt.endswith("wrapped_names") else "features.2")
    raise AssertionError(fmt)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    store = tmp_path_factory.mktemp("ddp") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8) * 3
    eager = {name: call(model, x, "features.2") for name, call in METHODS.items()}
    return model, x, eager


def state(model):
    """What a method must leave as found."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    return ([m.training for m in modules],
            [len(getattr(m, "_forward_hooks", {})) + len(getattr(m, "_forward_pre_hooks", {})) for m in modules],
            [p.requires_grad for p in (model.parameters() if modules else [])])


@pytest.mark.parametrize("fmt", list(REFUSED))
def test_format_matrix(setup, fmt, request):
    if fmt.startswith("ddp"):
        request.getfixturevalue("process_group")
    if fmt.startswith("data_parallel") and CUDA:
        pytest.skip("DataParallel of a CPU model needs a machine without GPUs")
    model, x, eager = setup
    wrapped, layer = make(fmt, model, x)
    before = state(wrapped)
    for name, call in METHODS.items():
        if name not in ONLY.get(fmt, METHODS):
            continue
        refusal = REFUSED[fmt].get(name)
        if refusal is None:
            got = call(wrapped, x, layer)
            torch.testing.assert_close(got, eager[name], msg=lambda m: f"{fmt} x {name}: {m}")
        else:
            with pytest.raises(ValueError, match=refusal):
                call(wrapped, x, layer)
        assert state(wrapped) == before, f"{fmt} x {name} left the model modified"


def test_script_module_is_restored_after_an_exception(setup):
    model, x, _ = setup
    scripted = torch.jit.script(model).train()
    with pytest.raises(ValueError, match="target"):
        cv.saliency(scripted, x, 99)
    assert all(m.training for m in scripted.modules())


def test_export_in_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    exported = torch.export.export(model.train(), (torch.randn(2, 3, 8, 8),)).module()
    with pytest.raises(ValueError, match="exported in training mode.*after model.eval"):
        cv.saliency(exported, torch.randn(2, 3, 8, 8), 0)


def test_compiled_guided_backprop_with_bounded_rectifiers_equals_eager(setup):
    # dynamo traces through the interception: ReLU and ReLU6 both guided, with aot_eager
    model, x, eager = setup
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(cv.guided_backprop(compiled, x, 1), eager["guided_backprop"])
    torch.testing.assert_close(cv.deconvnet(compiled, x, 1), eager["deconvnet"])


class _ReferenceRectifier(torch.autograd.Function):
    """clamp(x, 0, upper) with the guided backward, independent of cnnviz_fast."""

    @staticmethod
    def forward(ctx, x, upper):
        ctx.upper = upper
        ctx.save_for_backward(x)
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x > 0) & (x < ctx.upper) & (grad > 0)), None


def reference_under_autocast(model, x, guided):
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if guided:
            f = model.features
            h = _ReferenceRectifier.apply(f[0](xr), float("inf"))
            h = f[4](_ReferenceRectifier.apply(f[2](h), 6.0))
            out = model.fc(h.flatten(1))
        else:
            out = model(xr)
    return torch.autograd.grad(out[:, 1].sum(), xr)[0]


def test_autocast_bf16_equals_reference_under_the_same_autocast(setup):
    model, x, _ = setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saliency = cv.saliency(model, x, 1, abs=False)
        guided = cv.guided_backprop(model, x, 1)
    # the same bf16 operations in the same order: equal up to float32 rounding
    torch.testing.assert_close(saliency, reference_under_autocast(model, x, guided=False))
    torch.testing.assert_close(guided, reference_under_autocast(model, x, guided=True))
    assert saliency.dtype == guided.dtype == torch.float32


@pytest.mark.parametrize("name", list(METHODS))
def test_autocast_bf16_is_close_to_float32(setup, name):
    # every method runs under autocast and gives the float32 map up to bf16 effects: a
    # ReLU whose input is near 0 may switch, so element-wise tolerances do not apply;
    # the maps stay aligned (cosine > 0.95; measured >= 0.986 on this model)
    model, x, eager = setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = METHODS[name](model, x, "features.2")
    pairs = zip(got, eager[name]) if isinstance(got, tuple) else [(got, eager[name])]
    for g, e in pairs:
        assert g.shape == e.shape and torch.isfinite(g).all()
        cosine = torch.nn.functional.cosine_similarity(g.float().flatten(), e.float().flatten(), dim=0)
        assert cosine > 0.95, f"{name}: cosine {cosine.item():.3f}"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_data_parallel_and_autocast(setup, dtype):
    cpu_model, cpu_x, eager = setup
    model = Net().cuda().eval()
    model.load_state_dict(cpu_model.state_dict())
    x = cpu_x.cuda()
    wrapped = nn.DataParallel(model)
    for name, call in METHODS.items():
        expected = call(model, x, "features.2")
        torch.testing.assert_close(call(wrapped, x, "features.2"), expected)
        with torch.autocast("cuda", dtype=dtype):
            got = call(model, x, "features.2")
        pairs = zip(got, expected) if isinstance(got, tuple) else [(got, expected)]
        for g, e in pairs:
            assert g.shape == e.shape and torch.isfinite(g).all()
            cosine = torch.nn.functional.cosine_similarity(g.float().flatten(), e.float().flatten(), dim=0)
            assert cosine > 0.95, f"{name}: cosine {cosine.item():.3f}"
