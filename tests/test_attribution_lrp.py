"""lrp against Zennit 0.5.1 (its Gradient attributor with the same composite and the
torchvision canonizers): VGG-16 and ResNet-18 with random weights, every rule on a small
CNN, every rectifier spelling; the model left exactly as found (also when the call
raises); bad arguments and networks that cannot be canonized refused, naming the argument."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from zennit import rules as zr
from zennit.attribution import Gradient
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite,
                               SpecialFirstLayerMapComposite, layer_map_base)
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution

import cnnviz_fast as cv
from cnnviz_fast import Neuron, registry, zoo
from cnnviz_fast.attribution.lrp import AlphaBeta, Composite, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")


def zennit_lrp(model, x, target, composite, classes=None, output_relevance=None):
    """Zennit's relevance of the one-hot target (or ``output_relevance``)."""
    x = x.clone().requires_grad_(True)
    if output_relevance is None:
        classes = classes or model(x[:1]).shape[1]
        output_relevance = torch.eye(classes, dtype=x.dtype)[torch.as_tensor(target)]
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(x, output_relevance)
    return relevance


def named_zennit(name, canonizers, low=None, high=None):
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=low, high=high, canonizers=canonizers)
    return {"epsilon_plus_flat": EpsilonPlusFlat, "epsilon_alpha2_beta1": EpsilonAlpha2Beta1}[name](
        canonizers=canonizers)


def map_errors(ours, anchor):
    """Relative error of each image's map (norm-wise)."""
    return ((ours - anchor).flatten(1).norm(dim=1) / anchor.flatten(1).norm(dim=1)).tolist()


def randomized(model, bn_eps=None, dtype=torch.float32):
    """Random biases and batch-norm statistics (torchvision initialises them to 0 / 1)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            if bn_eps is not None:
                m.eps = bn_eps
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.data.uniform_(-0.05, 0.05)
    return model.eval().to(dtype)


def snapshot(model):
    """Everything a canonizer could change: parameter / buffer objects and bits, module
    structure, forward methods, hooks, flags."""
    return {
        "tensors": [(name, id(t), t.detach().clone(), t.requires_grad, t.dtype, t.stride())
                    for name, t in list(model.named_parameters()) + list(model.named_buffers())],
        "modules": [(name, id(m), type(m), m.training, sorted(vars(m).keys()), dict(m._modules).keys(),
                     [len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")])
                    for name, m in model.named_modules()],
    }


def bits(t):
    return t.detach().contiguous().flatten().view(torch.uint8)


def assert_same_model(before, after):
    assert [t[:2] for t in before["tensors"]] == [t[:2] for t in after["tensors"]]  # same objects
    for (name, _, old, *flags), (_, _, new, *new_flags) in zip(before["tensors"], after["tensors"]):
        assert flags == new_flags and torch.equal(bits(old), bits(new)), name  # same bits, dtype, strides
    assert before["modules"] == after["modules"]


# --------------------------------------------------------------------------- VGG-16, ResNet-18
@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return randomized(torchvision.models.vgg16())


@pytest.mark.parametrize("name", ["epsilon_plus_flat", "epsilon_gamma_box"])  # alpha-beta: ResNet-18 and rules
def test_vgg16_matches_zennit(vgg16, name):
    x = torch.randn(1, 3, 32, 32)
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    ours = cv.lrp(vgg16, x, [3], name)  # default z^B bounds: each image's per-channel range
    anchor = zennit_lrp(vgg16, x, [3], named_zennit(name, [VGGCanonizer()], low, high), classes=1000)
    assert max(map_errors(ours, anchor)) <= 1e-4


@pytest.fixture(scope="module")
def resnet18_exact():
    """ResNet-18 with batch-norm eps = 0: Zennit's merged batch norm then is the identity
    exactly (with eps > 0 it leaves x / sqrt(1 + eps) behind, see the next test), so the
    two agree to float32 rounding (~1e-6 here)."""
    torch.manual_seed(1)
    return randomized(torchvision.models.resnet18(), bn_eps=0.0)


@pytest.mark.parametrize("name", COMPOSITES)
def test_resnet18_matches_zennit(resnet18_exact, name):
    x = torch.randn(1, 3, 32, 32)
    target = [7]
    bounds = dict(low=-2.5, high=2.5) if name == "epsilon_gamma_box" else {}
    ours = cv.lrp(resnet18_exact, x, target, name, **bounds)
    anchor = zennit_lrp(resnet18_exact, x, target, named_zennit(name, [ResNetCanonizer()], -2.5, 2.5), classes=1000)
    assert max(map_errors(ours, anchor)) <= 1e-4


def test_default_batch_norm_eps_within_1e4_of_zennit():
    """With eps = 1e-5 Zennit's canonized network differs from the model by a factor
    1 / sqrt(1 + eps) per batch norm (its merged batch norm stays behind as
    x / sqrt(1 + eps)); ours keeps the model's own forward values. That moves the maps by
    ~1e-5 (on ResNet-18 in float64: <= 3.3e-5)."""
    torch.manual_seed(2)
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                     nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
                                     nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(8, 4)), dtype=torch.float64)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ours, output = cv.lrp(model, x, "predicted", return_output=True)
    anchor = zennit_lrp(model, x, output.argmax(1), EpsilonPlusFlat(canonizers=[VGGCanonizer()]))
    assert max(map_errors(ours, anchor)) <= 1e-4
    torch.testing.assert_close(output, model(x), rtol=0, atol=0)  # the model's own forward


# --------------------------------------------------------------------------- every rule
class SmallCNN(nn.Module):
    def __init__(self, activation=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.act2 = activation()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def small_cnn(activation=nn.ReLU, dtype=torch.float64):
    torch.manual_seed(3)
    model = SmallCNN(activation)
    for m in (model.conv1, model.fc):
        m.bias.data.uniform_(-0.3, 0.3)
    return model.eval().to(dtype)


def zennit_rules(conv, first=None):
    layer_map = layer_map_base() + [(Convolution, conv), (nn.Linear, zr.Epsilon())]
    if first is None:
        return LayerMapComposite(layer_map)
    return SpecialFirstLayerMapComposite(layer_map, [(Convolution, first)])


RULE_CASES = {  # ours, Zennit's: as the rule of every convolution
    "epsilon": (Epsilon(0.01), zr.Epsilon(0.01)),
    "zplus": (ZPlus(), zr.ZPlus()),
    "alpha2_beta1": (AlphaBeta(2, 1), zr.AlphaBeta(2, 1)),
    "alpha3_beta2": (AlphaBeta(3, 2), zr.AlphaBeta(3, 2)),
    "gamma": (Gamma(0.5), zr.Gamma(0.5)),
    "flat": (Flat(), zr.Flat()),
    "wsquare": (WSquare(), zr.WSquare()),
}


@pytest.mark.parametrize("activation", [nn.ReLU, nn.LeakyReLU], ids=["relu", "leaky_relu_passed"])
@pytest.mark.parametrize("rule", RULE_CASES)
def test_each_rule_matches_zennit(rule, activation):
    """Inputs with negative entries at the first layer, and (LeakyReLU, passed as Zennit
    does) at the second: the generalised x- terms of every rule."""
    model = small_cnn(activation)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    ours_rule, zennit_rule = RULE_CASES[rule]
    ours = cv.lrp(model, x, [0, 2, 4], Composite(conv=ours_rule, linear=Epsilon(1e-6)), nonlinear="pass")
    torch.testing.assert_close(ours, zennit_lrp(model, x, [0, 2, 4], zennit_rules(zennit_rule)), rtol=1e-10,
                               atol=1e-12)


def test_non_rectifier_gradient_matches_zennit_without_pass_rule():
    model = small_cnn(nn.LeakyReLU)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    ours = cv.lrp(model, x, [0, 4], "epsilon_plus", nonlinear="gradient")
    no_pass = LayerMapComposite([(nn.AdaptiveAvgPool2d, zr.Norm()), (Convolution, zr.ZPlus()),
                                 (nn.Linear, zr.Epsilon())])
    torch.testing.assert_close(ours, zennit_lrp(model, x, [0, 4], no_pass), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first", ["zbox", "flat", "wsquare"])
def test_input_layer_rules_match_zennit(first):
    model = small_cnn()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    low, high = torch.full((1, 3, 1, 1), -3.0, dtype=torch.float64), torch.tensor([3.0, 4.0, 5.0]).view(1, 3, 1, 1)
    ours_first = {"zbox": ZBox(low, high.double()), "flat": "flat", "wsquare": "wsquare"}[first]
    zennit_first = {"zbox": zr.ZBox(low, high.double()), "flat": zr.Flat(), "wsquare": zr.WSquare()}[first]
    ours = cv.lrp(model, x, [1, 3], Composite(conv="zplus", first=ours_first, first_kinds=("conv",)))
    torch.testing.assert_close(ours, zennit_lrp(model, x, [1, 3], zennit_rules(zr.ZPlus(), zennit_first)),
                               rtol=1e-10, atol=1e-12)


def test_box_bounds_default_to_normalize_pixel_range():
    model = small_cnn(dtype=torch.float32)
    norm = cv.Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    x = norm(torch.rand(2, 3, 12, 12))
    low, high = norm.pixel_range(x)
    ours = cv.lrp(model, x, 1, "epsilon_gamma_box", normalize=norm)
    torch.testing.assert_close(ours, cv.lrp(model, x, 1, "epsilon_gamma_box", low=low, high=high), rtol=0, atol=0)
    anchor = zennit_lrp(model, x, [1, 1], EpsilonGammaBox(low=low, high=high))
    assert max(map_errors(ours, anchor)) <= 1e-5


# --------------------------------------------------------------------------- rectifier spellings
class Spelled(nn.Module):
    """conv → rectifier → conv → rectifier → max pool → linear, the rectifier written as asked."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu, self.relu6 = nn.ReLU(inplace=True), nn.ReLU6()
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def act(self, x):
        s = self.spelling
        if s == "module_inplace":
            return self.relu(x)
        if s == "functional":
            return F.relu(x)
        if s == "tensor_inplace":
            x.relu_()
            return x
        if s == "clamp":
            return x.clamp(min=0)
        if s == "relu6_module":
            return self.relu6(x)
        if s == "relu6_functional":
            return F.relu6(x)
        if s == "hardtanh_inplace":
            return F.hardtanh(x, 0.0, 6.0, inplace=True)
        return torch.clamp_(x, 0, 6)  # "clamp6_inplace"

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(F.max_pool2d(x, 2).flatten(1))


SATURATING = ("relu6_module", "relu6_functional", "hardtanh_inplace", "clamp6_inplace")


@pytest.mark.parametrize("spelling", ["module_inplace", "functional", "tensor_inplace", "clamp", "relu6_module",
                                      "relu6_functional", "hardtanh_inplace", "clamp6_inplace"])
def test_every_rectifier_spelling_matches_zennit_on_modules(spelling):
    torch.manual_seed(4)
    model = Spelled(spelling).double().eval()
    with torch.no_grad():
        model.conv1.weight.mul_(6)  # some units above 6: the ReLU6 spellings saturate
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    module_model = copy.deepcopy(model)
    module_model.spelling = "relu6_module" if spelling in SATURATING else "module_inplace"
    ours = cv.lrp(model, x, [0, 3])
    anchor = zennit_lrp(module_model, x, [0, 3], EpsilonPlusFlat())
    torch.testing.assert_close(ours, anchor, rtol=1e-10, atol=1e-12)


def test_digits_functional_relus_equal_module_relus():
    x = zoo.DIGITS_NORMALIZE(torch.rand(3, 1, 32, 32))
    labels = [1, 5, 9]
    module, functional = zoo.digits_cnn(), zoo.digits_cnn(relu="functional")
    ours = cv.lrp(functional, x, labels)
    torch.testing.assert_close(ours, cv.lrp(module, x, labels))
    assert max(map_errors(ours, zennit_lrp(module, x, labels, EpsilonPlusFlat()))) <= 1e-5


class Residual(nn.Module):
    """conv → BN → ReLU → conv → BN, plus the block input, added as asked."""

    def __init__(self, add):
        super().__init__()
        self.add = add
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.add == "iadd":
            out += x
        elif self.add == "plus":
            out = x + out
        else:
            out = torch.add(out, x)
        return self.fc(F.adaptive_avg_pool2d(F.relu(out), 1).flatten(1))


def test_residual_additions_every_spelling_agree():
    torch.manual_seed(5)
    model = randomized(Residual("iadd"), dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    results = []
    for add in ("iadd", "plus", "torch_add"):
        model.add = add
        results.append(cv.lrp(model, x, [0, 2]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[0], results[2], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- targets, output, registry
def test_targets_and_output():
    model = small_cnn(dtype=torch.float32)
    x = torch.randn(3, 3, 12, 12)
    predicted, output = cv.lrp(model, x, "predicted", return_output=True)
    torch.testing.assert_close(output, model(x), rtol=0, atol=0)
    torch.testing.assert_close(predicted, cv.lrp(model, x, output.argmax(1).tolist()), rtol=0, atol=0)
    single = cv.lrp(model, x, 2)
    torch.testing.assert_close(single, cv.lrp(model, x, [2, 2, 2]), rtol=0, atol=0)
    picked = cv.lrp(model, x, lambda out: out[:, 2])
    torch.testing.assert_close(picked, single, rtol=0, atol=0)


def test_neuron_target_is_relevance_of_that_unit():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 6 * 6, 3)).double().eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    ours = cv.lrp(model, x, Neuron("3", 2, 1, 4))
    start = torch.zeros(2, 5, 6, 6, dtype=torch.float64)
    start[:, 2, 1, 4] = 1
    torch.testing.assert_close(ours, zennit_lrp(model[:4], x, None, EpsilonPlusFlat(), output_relevance=start),
                               rtol=1e-10, atol=1e-12)


def test_compiled_model_explained_through_its_eager_original():
    model = small_cnn(dtype=torch.float32)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(cv.lrp(torch.compile(model), x, [1, 2]), cv.lrp(model, x, [1, 2]), rtol=0, atol=0)


def test_registry_declares_lrp():
    method = registry.get_method("lrp")
    assert method.family == "relevance" and method.map_rule == "sum"
    options = {o.name: o for o in method.options}
    assert set(COMPOSITES) <= set(options["composite"].choices) and "gamma" in options and "epsilon" in options
    model = small_cnn(dtype=torch.float32)
    maps, output = method.maps(model, torch.randn(2, 3, 12, 12), composite="epsilon_alpha2_beta1")
    assert maps.shape == (2, 12, 12) and output.shape == (2, 5)


# --------------------------------------------------------------------------- model left as found
def test_model_left_exactly_as_found_bn_network():
    torch.manual_seed(6)
    model = randomized(torchvision.models.resnet18(num_classes=10)).train()
    before = snapshot(model)
    cv.lrp(model, torch.randn(1, 3, 32, 32), 1)  # runs in eval mode, put back in train mode
    assert_same_model(before, snapshot(model))


class BreaksAfterMerge(nn.Module):
    """conv → BN (merged) → SiLU (refused): the call raises after canonization."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


def test_model_left_exactly_as_found_when_the_call_raises():
    model = randomized(BreaksAfterMerge())
    before = snapshot(model)
    with pytest.raises(ValueError, match="nonlinear: .*silu"):
        cv.lrp(model, torch.randn(2, 3, 8, 8), 0)
    assert_same_model(before, snapshot(model))
    resnet = randomized(torchvision.models.resnet18(num_classes=10))
    before = snapshot(resnet)
    with pytest.raises(ValueError, match="target"):  # raised after the whole forward and its canonization
        cv.lrp(resnet, torch.randn(1, 3, 32, 32), 10)
    assert_same_model(before, snapshot(resnet))


# --------------------------------------------------------------------------- refusals
def test_non_rectifier_passed_when_allowed_matches_zennit():
    model = randomized(BreaksAfterMerge()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours = cv.lrp(model, x, [0, 1], nonlinear="pass")
    # Zennit sees the global mean as a plain gradient too (it is no AvgPool module)
    anchor = zennit_lrp(model, x, [0, 1], EpsilonPlusFlat(canonizers=[VGGCanonizer()]))
    assert max(map_errors(ours, anchor)) <= 1e-4  # Zennit's identity batch norm keeps its eps


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)),
     "composite: cannot canonize batch norm '2': its input is not the unmodified output"),
    (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)),
     "composite: cannot canonize batch norm '0'"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2)),
     "composite: cannot canonize group_norm"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(2)), "nonlinear: .*gelu"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2)),
     "model: LRP has no rule for conv_transpose2d"),
])
def test_networks_it_cannot_explain_are_refused(model, match):
    x = torch.randn(2, 3, 8, 8)
    model(x)  # materialise the lazy layers
    with pytest.raises(ValueError, match=match):
        cv.lrp(model.eval(), x, 0)


class MatmulHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.w = nn.Conv2d(3, 4, 3), nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return self.conv(x).mean((2, 3)) @ self.w


@pytest.mark.parametrize("kwargs, match", [
    (dict(composite="epsilon"), "composite: unknown composite 'epsilon'"),
    (dict(composite=Composite(conv="zbox2")), "composite.conv: unknown rule 'zbox2'"),
    (dict(composite=Composite(conv="zplus", first_kinds=("pool",))), "composite.first_kinds"),
    (dict(composite=lambda: Composite(conv=AlphaBeta(1, 1))), "alpha, beta"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(gamma="big"), "gamma"),
    (dict(nonlinear="guided"), "nonlinear"),
    (dict(composite="epsilon_gamma_box", low=1.0, high=0.0), "low, high"),
    (dict(composite="epsilon_gamma_box", low=torch.zeros(5, 1, 1)), "low must be broadcastable"),
    (dict(rules={"conv1": "flat"}), "rules: lrp has no argument"),
    (dict(composite=Composite(conv=ZBox(torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)))),  # on 6-channel conv2
     "composite: the zbox rule's bounds"),
])
def test_bad_arguments_refused_naming_them(kwargs, match):
    model = small_cnn(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}
        cv.lrp(model, torch.randn(2, 3, 12, 12), 0, **kwargs)


def test_matmul_on_activations_and_torchscript_refused():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="model: LRP has no rule for matmul"):
        cv.lrp(MatmulHead().eval(), x, 0)
    with pytest.raises(ValueError, match="LRP: model is a TorchScript module"):
        cv.lrp(torch.jit.script(small_cnn(dtype=torch.float32)), torch.randn(2, 3, 12, 12), 0)
