"""guided_backprop / deconvnet on rectifiers beyond ReLU (ReLU6, Hardtanh(0, t),
clamp(min=0[, max=t]), threshold(0, 0)) against references built from backward hooks and
from a hand-written autograd Function; and the documented behaviour of the activations
that are not rectifiers (refused unless nonlinear="gradient"; Sigmoid / Tanh /
Hardsigmoid and non-activation clamps keep their own gradient)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Neuron

METHODS = {"guided": cv.guided_backprop, "deconvnet": cv.deconvnet}


def keep_mask(x, grad, mode, upper):
    """The rule written from the definition, on the activation's input x: linear range
    0 < x < upper; deconvnet replaces the lower side by the gradient's sign."""
    below = torch.ones_like(x, dtype=torch.bool) if upper is None else x < upper
    if mode == "guided":
        return (x > 0) & below & (grad > 0)
    return below & (grad > 0)


class _ReferenceRectifier(torch.autograd.Function):
    """clamp(x, 0, upper) with the modified backward, independent of cnnviz_fast.ops."""

    @staticmethod
    def forward(ctx, x, mode, upper):
        ctx.mode, ctx.upper = mode, upper
        ctx.save_for_backward(x)
        return x.clamp(min=0) if upper is None else x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * keep_mask(x, grad, ctx.mode, ctx.upper), None, None


# --------------------------------------------------------------------------- #
# module rectifiers vs backward hooks
# --------------------------------------------------------------------------- #
class ModuleNet(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), act(), nn.Conv2d(6, 8, 3, padding=1), act(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), act(),
        )
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


ACTIVATIONS = {
    "ReLU6": (nn.ReLU6, 6.0, 40.0),  # (module factory, upper, input scale that saturates some units)
    "Hardtanh(0,0.5)": (lambda: nn.Hardtanh(0.0, 0.5), 0.5, 4.0),
}


def hook_reference(model, x, target, mode):
    """Backward hooks on every Hardtanh module (ReLU6 is one): the incoming gradient is
    kept where the module's output is in its linear range (guided) / below max_val
    (deconvnet) and the gradient is positive."""
    outputs, handles = {}, []

    def forward_hook(module, args, out):
        outputs[module] = out.detach()

    def backward_hook(module, grad_input, grad_output):
        g, out = grad_output[0], outputs[module]
        below = out < module.max_val
        keep = (below & (g > 0)) if mode == "deconvnet" else ((out > 0) & below & (g > 0))
        return (g * keep,)

    captured = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Hardtanh):
            handles += [m.register_forward_hook(forward_hook), m.register_full_backward_hook(backward_hook)]
        if isinstance(target, Neuron) and name == target.layer:
            handles.append(m.register_forward_hook(lambda mod, a, out: captured.setdefault("act", out)))
    try:
        xr = x.clone().requires_grad_(True)
        out = model(xr)
        if isinstance(target, Neuron):
            scores = target.value(captured["act"])
        else:
            scores = out.gather(1, torch.as_tensor(target, device=x.device).reshape(-1, 1).expand(len(x), 1))[:, 0]
        return torch.autograd.grad(scores.sum(), xr)[0]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("mode", METHODS)
def test_module_rectifiers_match_backward_hook_reference(device, act, mode):
    factory, upper, scale = ACTIVATIONS[act]
    model = ModuleNet(factory).to(device).eval()
    x = torch.randn(3, 3, 6, 6, device=device) * scale
    # the inputs exercise both ends: some units saturate at upper, some are linear
    pre = model.features[0](x)
    assert (pre > upper).any() and ((pre > 0) & (pre < upper)).any()
    # Neurons on conv outputs: a forward hook on a module with a full backward hook sees
    # its output before the hook wraps it, so a Neuron on the rectifier itself would not
    # run through the reference's backward hook
    for target in ([0, 3, 4], Neuron("features.2", 2), Neuron("features.5", 5, 1, 2)):
        ours = METHODS[mode](model, x, target)
        torch.testing.assert_close(ours, hook_reference(model, x, target, mode))
    xr = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(model(xr)[:, 0].sum(), xr)[0]
    assert (METHODS[mode](model, x, 0) - plain).abs().max() > 1e-3 * plain.abs().max()


# --------------------------------------------------------------------------- #
# every way of writing a rectifier vs the reference Function
# --------------------------------------------------------------------------- #
class FunctionalNet(nn.Module):
    """Every rectifier spelling, in place or not; ``reference_mode`` swaps each for the
    reference Function with the same bound."""

    SPELLINGS = [
        (lambda t: F.relu6(t), 6.0),
        (lambda t: F.hardtanh(t, 0.0, 2.0), 2.0),
        (lambda t: t.clamp(0, 1.5), 1.5),
        (lambda t: torch.clamp(t, min=0), None),
        (lambda t: t.clamp_min(0), None),
        (lambda t: torch.clip(t, 0.0, 3.0), 3.0),
        (lambda t: F.threshold(t, 0.0, 0.0), None),
        (lambda t: F.relu6(t, inplace=True), 6.0),
        (lambda t: t.clamp_(min=0, max=2.5), 2.5),
        (lambda t: F.hardtanh_(t, 0.0, 1.0), 1.0),
        (lambda t: torch.clamp_min_(t, 0), None),
    ]

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in self.SPELLINGS)
        with torch.no_grad():  # near-identity 1x1 convs: values stay spread over [0, upper]
            for conv in self.convs:
                conv.weight.copy_(torch.eye(8)[:, :, None, None] + 0.3 * torch.randn(8, 8, 1, 1))
                conv.bias.copy_(0.5 * torch.randn(8))
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x, reference_mode=None):
        x = torch.cat([x, -x, x[:, :2]], 1)  # 8 channels
        for conv, (spelling, upper) in zip(self.convs, self.SPELLINGS):
            y = conv(x)
            if reference_mode is None:
                x = spelling(y)
            else:
                x = _ReferenceRectifier.apply(y, reference_mode, upper)
        return self.fc(x.flatten(1))


def reference_gradient(model, x, target, mode):
    xr = x.clone().requires_grad_(True)
    out = model(xr, reference_mode=mode)
    return torch.autograd.grad(out[:, target].sum(), xr)[0]


@pytest.mark.parametrize("mode", METHODS)
def test_every_rectifier_spelling_matches_reference(device, mode):
    model = FunctionalNet().to(device).eval()
    x = torch.randn(4, 3, 4, 4, device=device) * 3
    ours = METHODS[mode](model, x, 2)
    torch.testing.assert_close(ours, reference_gradient(model, x, 2, mode))
    # not the plain gradient (an un-intercepted spelling would pass that)
    xr = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(model(xr)[:, 2].sum(), xr)[0]
    assert (ours - plain).abs().max() > 1e-3 * plain.abs().max()


def test_each_spelling_is_intercepted_once_with_its_bound(monkeypatch):
    from cnnviz_fast.attribution import _backprop

    seen = []
    original = _backprop.ops.guided_relu

    def counting(t, mode, upper=None):
        seen.append(upper)
        return original(t, mode, upper)

    monkeypatch.setattr(_backprop.ops, "guided_relu", counting)
    in_place = []
    original_in_place = _backprop._GuidedReLUInPlace.apply

    def counting_in_place(t, mode, upper):
        in_place.append(upper)
        return original_in_place(t, mode, upper)

    monkeypatch.setattr(_backprop._GuidedReLUInPlace, "apply", staticmethod(counting_in_place))
    cv.guided_backprop(FunctionalNet().eval(), torch.randn(2, 3, 4, 4), 0)
    assert seen == [6.0, 2.0, 1.5, None, None, 3.0, None]
    assert in_place == [6.0, 2.5, 1.0, None]


def test_in_place_bounded_rectifier_on_half_matches_out_of_place():
    # the in-place path rounds upper to the dtype like the kernel (6.09 is not a bf16 value)
    from cnnviz_fast.attribution import _backprop

    x = (torch.rand(500) * 12 - 3).to(torch.bfloat16)
    grad = torch.randn(500).to(torch.bfloat16)
    a = x.clone().requires_grad_()
    out_a = cv.ops.guided_relu(a, "guided", 6.09)
    b = x.clone().requires_grad_()
    out_b = _backprop._GuidedReLUInPlace.apply(b.clone(), "guided", 6.09)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(out_a, a, grad)[0], torch.autograd.grad(out_b, b, grad)[0], rtol=0, atol=0
    )


# --------------------------------------------------------------------------- #
# non-rectifying activations
# --------------------------------------------------------------------------- #
class Mixed(nn.Module):
    def __init__(self, act, head=None):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(6, 6, 3, padding=1), act
        self.fc = nn.Linear(6 * 4 * 4, 3)
        self.head = head

    def forward(self, x, reference_mode=None):
        y = self.conv1(x)
        y = self.act1(y) if reference_mode is None else _ReferenceRectifier.apply(y, reference_mode, None)
        out = self.fc(self.act2(self.conv2(y)).flatten(1))
        return out if self.head is None else self.head(out)


NON_RECTIFIERS = {
    "leaky_relu": nn.LeakyReLU(0.1),
    "leaky_relu-in-place": nn.LeakyReLU(0.1, inplace=True),
    "silu-in-place": nn.SiLU(inplace=True),
    "prelu": nn.PReLU(),
    "rrelu": nn.RReLU(),
    "elu": nn.ELU(),
    "selu": nn.SELU(),
    "celu": nn.CELU(),
    "silu": nn.SiLU(),
    "gelu": nn.GELU(),
    "mish": nn.Mish(),
    "hardswish": nn.Hardswish(),
    "softplus": nn.Softplus(),
    "hardtanh": nn.Hardtanh(-1.0, 1.0),
    "threshold": nn.Threshold(0.1, 0.0),
}


@pytest.mark.parametrize("name", NON_RECTIFIERS)
@pytest.mark.parametrize("mode", METHODS)
def test_non_rectifiers_are_refused_by_name(name, mode):
    model = Mixed(NON_RECTIFIERS[name]).train()
    x = torch.randn(2, 3, 4, 4)
    method = "guided backpropagation" if mode == "guided" else "deconvnet"
    with pytest.raises(ValueError, match=rf"{method}: the model applies {name.split('-')[0]}.*nonlinear='gradient'"):
        METHODS[mode](model, x, 1)
    # the model is left as found
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["leaky_relu", "silu", "gelu", "hardtanh"])
@pytest.mark.parametrize("mode", METHODS)
def test_nonlinear_gradient_passes_their_own_gradient(name, mode):
    model = Mixed(NON_RECTIFIERS[name]).eval()
    x = torch.randn(3, 3, 4, 4)
    xr = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(model(xr, reference_mode=mode)[:, 1].sum(), xr)[0]
    torch.testing.assert_close(METHODS[mode](model, x, 1, nonlinear="gradient"), expected)


@pytest.mark.parametrize("head", [nn.Sigmoid(), nn.Tanh(), nn.Hardsigmoid(), nn.Softmax(dim=1)])
@pytest.mark.parametrize("mode", METHODS)
def test_squashing_heads_keep_their_gradient(head, mode):
    # Sigmoid / Tanh / Hardsigmoid (gates, output heads) and softmax are not refused
    model = Mixed(nn.ReLU(), head=head).eval()
    x = torch.randn(3, 3, 4, 4)

    class Reference(nn.Module):
        def forward(self, t):
            return head(model.fc(_ReferenceRectifier.apply(
                model.conv2(_ReferenceRectifier.apply(model.conv1(t), mode, None)), mode, None).flatten(1)))

    xr = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(Reference()(xr)[:, 1].sum(), xr)[0]
    torch.testing.assert_close(METHODS[mode](model, x, 1), expected)


class ClampsThatAreNotActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        # a lower bound other than 0, a two-sided clip and a tensor bound: kept as they are
        return (y.clamp(min=1e-3).log().mean((2, 3)) + y.clamp(-1, 1).mean((2, 3))
                + torch.clamp(y, min=torch.zeros(())).mean((2, 3)) + y.clamp_max(2.0).mean((2, 3)))


@pytest.mark.parametrize("mode", METHODS)
def test_other_clamps_keep_their_gradient(mode):
    model = ClampsThatAreNotActivations().eval()
    x = torch.randn(2, 3, 5, 5)
    xr = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(model(xr)[:, 1].sum(), xr)[0]
    torch.testing.assert_close(METHODS[mode](model, x, 1), expected)


def test_guided_grad_cam_follows_the_same_rule():
    model = Mixed(nn.SiLU()).eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="guided backpropagation: the model applies silu"):
        cv.guided_grad_cam(model, x, "conv2", 1)
    got = cv.guided_grad_cam(model, x, "conv2", 1, nonlinear="gradient")
    expected = cv.guided_backprop(model, x, 1, nonlinear="gradient") * cv.grad_cam(model, x, "conv2", 1)[:, None]
    torch.testing.assert_close(got, expected)


def test_bad_nonlinear_argument():
    model = Mixed(nn.ReLU()).eval()
    for bad in ("sign", None, 1):
        for method in (cv.guided_backprop, cv.deconvnet):
            with pytest.raises(ValueError, match="nonlinear must be one of"):
                method(model, torch.randn(1, 3, 4, 4), 0, nonlinear=bad)
        with pytest.raises(ValueError, match="nonlinear must be one of"):
            cv.guided_grad_cam(model, torch.randn(1, 3, 4, 4), "conv2", 0, nonlinear=bad)


# --------------------------------------------------------------------------- #
# torchvision networks
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("mode", METHODS)
def test_mobilenet_v2_relu6_matches_backward_hook_reference(mode):
    import copy

    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.25).eval()  # ReLU6(inplace=True)
    x = torch.randn(2, 3, 32, 32) * 10  # large enough that ReLU6 units saturate
    saturated = []
    handle = model.features[0][2].register_forward_hook(lambda m, a, out: saturated.append((out == 6).any()))
    model(x)
    handle.remove()
    assert saturated[0]
    reference_model = copy.deepcopy(model)
    for m in reference_model.modules():
        if isinstance(m, nn.Hardtanh):
            m.inplace = False  # full backward hooks refuse in-place modules
    torch.testing.assert_close(METHODS[mode](model, x, [1, 4]), hook_reference(reference_model, x, [1, 4], mode))


def test_mobilenet_v3_and_efficientnet_are_refused_by_activation():
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(1, 3, 32, 32)
    v3 = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    with pytest.raises(ValueError, match="applies hardswish"):
        cv.guided_backprop(v3, x, 0)
    assert torch.isfinite(cv.guided_backprop(v3, x, 0, nonlinear="gradient")).all()
    efficientnet = torchvision.models.efficientnet_b0(num_classes=3).eval()
    with pytest.raises(ValueError, match="applies silu"):
        cv.deconvnet(efficientnet, x, 0)
