"""deeplift, deeplift_shap against Captum (DeepLift, DeepLiftShap), in float64.

What is compared: the attributions, element by element (relative to the map's largest
value, 1e-6), on the same model weights, inputs, baselines and targets. Captum hooks
``nn.ReLU`` / ``nn.MaxPool2d`` modules only and raises on a module used twice, so models
with other ReLU spellings or a shared ``nn.ReLU`` (torchvision's ResNet BasicBlock) are
compared with Captum on the same weights written with one ``nn.ReLU`` module per use.
"""
import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from captum.attr import DeepLift, DeepLiftShap

import cnnviz_fast as cv
from cnnviz_fast import Neuron, zoo

pytestmark = [pytest.mark.filterwarnings("ignore:Setting forward, backward hooks"),
              pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def assert_equal_maps(ours, ref, rel=1e-6):
    ref = ref.detach()
    assert ours.shape == ref.shape
    scale = ref.abs().max()
    assert scale > 0
    assert float((ours - ref).abs().max() / scale) < rel


def captum_deeplift(model, x, target, baseline=None):
    if isinstance(baseline, torch.Tensor):  # Captum takes a number or a full-size tensor
        baseline = baseline.expand_as(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DeepLift(model).attribute(x, baselines=baseline, target=target).detach()


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits()
    return zoo.digits_cnn().double(), zoo.DIGITS_NORMALIZE(pixels[:2]).double(), labels[:2].tolist()


class Spelled(nn.Module):
    """conv - BN - ReLU (spelled ``relu``) - conv - ReLU - max pool - linear; every spelling
    has the same weights (seed) and the same function."""

    def __init__(self, relu: str = "module", seed: int = 0, pool_after_bn: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(inplace=relu == "inplace")
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(6 * 4 * 4, 4)
        self.spelling, self.pool_after_bn = relu, pool_after_bn
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
        self.double().eval()

    def act(self, x, module):
        s = self.spelling
        if s in ("module", "inplace"):
            return module(x)
        return {"F.relu": lambda t: F.relu(t), "F.relu_inplace": lambda t: F.relu(t, inplace=True),
                "torch.relu": torch.relu, "Tensor.relu_": lambda t: t.relu_(),
                "clamp_min": lambda t: t.clamp(min=0)}[s](x)

    def forward(self, x):
        x = self.act(self.bn(self.conv1(x)), self.relu1)
        x = self.conv2(x)
        if self.pool_after_bn:  # ReLU, then batch norm, then the pooling: Captum applies its max-pool rule
            return self.fc(self.pool(self.bn2(self.act(x, self.relu2))).flatten(1))
        return self.fc(self.pool(self.act(x, self.relu2)).flatten(1))


def unshared_resnet(model):
    """A copy of a zoo ResNet whose BasicBlocks use a second ``nn.ReLU`` for their second
    ReLU (Captum's DeepLift raises on a module used twice); same function."""
    twin = copy.deepcopy(model)

    def forward(block, x):
        identity = x if block.downsample is None else block.downsample(x)
        out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        return block.relu_out(out + identity)

    for module in twin.modules():
        if type(module).__name__ == "BasicBlock":
            module.relu_out = nn.ReLU(inplace=True)
            module.forward = types.MethodType(forward, module)
    return twin


# --------------------------------------------------------------------------- DeepLIFT = Captum
@pytest.mark.parametrize("baseline", [0.3, "channel", "per_image"])
def test_deeplift_matches_captum_digits(digits, baseline):
    model, x, labels = digits
    if baseline == "channel":
        baseline = torch.full((1, 1, 1, 1), -0.4, dtype=torch.double)
    elif baseline == "per_image":
        baseline = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.double)
    ours = cv.deeplift(model, x, labels, baseline=baseline)
    assert_equal_maps(ours, captum_deeplift(model, x, labels, baseline))


def test_deeplift_every_relu_spelling_equals_captum_on_relu_modules(digits):
    model, x, labels = digits
    functional = zoo.digits_cnn(relu="functional").double()
    ref = captum_deeplift(model, x, labels)
    assert_equal_maps(cv.deeplift(functional, x, labels), ref)
    # Captum only hooks nn.ReLU modules: the functional spellings keep their plain gradient there
    assert not torch.allclose(captum_deeplift(functional, x, labels), ref, rtol=1e-3, atol=1e-6)
    x3 = torch.randn(2, 3, 8, 8, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    ref = captum_deeplift(Spelled("module"), x3, 1)
    for spelling in ("inplace", "F.relu", "F.relu_inplace", "torch.relu", "Tensor.relu_", "clamp_min"):
        assert_equal_maps(cv.deeplift(Spelled(spelling), x3, 1), ref)


def test_deeplift_max_pool_rules_against_captum():
    """Captum's max-pool rule takes effect only where the pooling does not directly follow
    an nn.ReLU module (there the ReLU's hook receives the plain pooling gradient):
    max_pool="rescale" equals Captum on the first kind, the default "gradient" on the second."""
    x = torch.randn(3, 3, 8, 8, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    base = torch.randn(1, 3, 8, 8, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    after_bn = Spelled("module", pool_after_bn=True)
    ref = captum_deeplift(after_bn, x, [0, 1, 2], base)
    assert_equal_maps(cv.deeplift(after_bn, x, [0, 1, 2], baseline=base, max_pool="rescale"), ref)
    assert not torch.allclose(cv.deeplift(after_bn, x, [0, 1, 2], baseline=base), ref, rtol=1e-3)
    after_relu = Spelled("module")
    ref = captum_deeplift(after_relu, x, [0, 1, 2], base)
    assert_equal_maps(cv.deeplift(after_relu, x, [0, 1, 2], baseline=base), ref)
    assert not torch.allclose(cv.deeplift(after_relu, x, [0, 1, 2], baseline=base, max_pool="rescale"), ref,
                              rtol=1e-3)


def test_deeplift_resnet_shared_relu_equals_captum_on_unshared_copy():
    model = zoo.resnet18(num_classes=10).double()
    with torch.no_grad():  # batch norm that is not the identity
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.double, generator=torch.Generator().manual_seed(4))
    ours = cv.deeplift(model, x, [3, 7], baseline=0.1)
    assert_equal_maps(ours, captum_deeplift(unshared_resnet(model), x, [3, 7], 0.1))


def test_deeplift_sums_to_delta_without_max_pool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()
    x = torch.randn(4, 3, 12, 12, dtype=torch.double)
    base = torch.randn(4, 3, 12, 12, dtype=torch.double)
    ours = cv.deeplift(model, x, 2, baseline=base)
    with torch.no_grad():
        delta = model(x)[:, 2] - model(base)[:, 2]
    torch.testing.assert_close(ours.sum(dim=(1, 2, 3)), delta, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(cv.saliency(model, x, 2, abs=False) * (x - base), ours)


def test_deeplift_predicted_neuron_and_output(digits):
    model, x, _ = digits
    maps, output = cv.deeplift(model, x, "predicted", return_output=True)
    with torch.no_grad():
        torch.testing.assert_close(output, model(x))
    predicted = output.argmax(1).tolist()
    assert_equal_maps(maps, captum_deeplift(model, x, predicted))

    class UpToConv3Channel5(nn.Module):  # the Neuron's value as a model output, for Captum
        def __init__(self):
            super().__init__()
            self.features = model.features[:6]  # up to conv3

        def forward(self, t):
            return self.features(t)[:, 5].mean(dim=(1, 2))

    ours = cv.deeplift(model, x, Neuron("features.conv3", 5))
    assert_equal_maps(ours, captum_deeplift(UpToConv3Channel5(), x, None))


def test_deeplift_channels_last_batch_equals_small_batches():
    """A batch large enough to run channels-last (core.layout) gives the maps of the same
    images run in small contiguous batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.LazyLinear(3)).eval()
    x = torch.randn(16, 3, 112, 112)
    model(x[:1])
    for max_pool in ("gradient", "rescale"):
        together = cv.deeplift(model, x, 1, baseline=0.2, max_pool=max_pool)
        apart = torch.cat([cv.deeplift(model, x[i:i + 2], 1, baseline=0.2, max_pool=max_pool) for i in range(0, 16, 2)])
        torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- DeepLiftShap = Captum
def test_deeplift_shap_matches_captum(digits):
    model, x, labels = digits
    batch_size = 4  # pairs of a batch cross the groups of 4 references: references gathered per pair
    bases = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.double) - 0.5
    ours = cv.deeplift_shap(model, x, labels, baseline=bases, batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DeepLiftShap(model).attribute(x, baselines=bases, target=labels)
    assert_equal_maps(ours, ref)


def test_deeplift_shap_rescale_pool_and_single_baseline():
    x = torch.randn(2, 3, 8, 8, dtype=torch.double, generator=torch.Generator().manual_seed(6))
    bases = torch.randn(4, 3, 8, 8, dtype=torch.double, generator=torch.Generator().manual_seed(7))
    model = Spelled("F.relu", pool_after_bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DeepLiftShap(Spelled("module", pool_after_bn=True)).attribute(x, baselines=bases, target=[1, 2])
    assert_equal_maps(cv.deeplift_shap(model, x, [1, 2], baseline=bases, batch_size=3, max_pool="rescale"), ref)
    torch.testing.assert_close(cv.deeplift_shap(model, x, 1, baseline=0.5), cv.deeplift(model, x, 1, baseline=0.5))


# --------------------------------------------------------------------------- safety
def test_deeplift_leaves_model_as_found_and_refuses_bad_input(digits):
    model, x, labels = digits
    model = copy.deepcopy(model).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cv.deeplift(model, x, labels)
    cv.deeplift_shap(model, x, labels, baseline=x[:2])
    with pytest.raises(ValueError, match="baseline"):
        cv.deeplift(model, x, labels, baseline=torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="baseline"):
        cv.deeplift_shap(model, x, labels, baseline=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="max_pool"):
        cv.deeplift(model, x, labels, max_pool="average")
    with pytest.raises(ValueError, match="batch_size"):
        cv.deeplift_shap(model, x, labels, baseline=x[:2], batch_size=0)
    with pytest.raises(ValueError, match="baseline"):  # Captum's name answered with ours
        cv.deeplift(model, x, labels, baselines=0.0)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_deeplift_refuses_other_activations_unless_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="silu.*nonlinear='gradient'"):
        cv.deeplift(model, x, 0)
    ours = cv.deeplift(model, x, 0, nonlinear="gradient")
    assert ours.shape == x.shape and torch.isfinite(ours).all()


def test_deeplift_refuses_input_dependent_control_flow():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            if x.mean() > 0:  # one more ReLU for the inputs than for the baseline
                y = torch.relu(y - 0.1)
            return y.flatten(1)

    x = torch.rand(2, 1, 6, 6) + 0.5
    with pytest.raises(ValueError, match="sequence of operations"):
        cv.deeplift(Branchy(), x, 0)
