"""occlusion: against Captum's Occlusion (channel 0) and a hand-written sliding-window loop."""
import copy
import importlib

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from cnnviz_fast import zoo
from cnnviz_fast.attribution import occlusion
from cnnviz_fast.attribution.occlusion import choose_batch_size
from cnnviz_fast.core import Neuron, forward_to_layers, layout
from layout_models import FlattensByView

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits()
    return zoo.digits_cnn(), zoo.DIGITS_NORMALIZE(pixels[:3]), labels[:3]


def captum_occlusion(forward, inputs, target, window, stride, baseline=0.0, per_eval=16):
    C = inputs.shape[1]
    attr = Occlusion(forward).attribute(
        inputs, sliding_window_shapes=(C, *window), strides=(C, *stride), baselines=baseline,
        target=target, perturbations_per_eval=per_eval)
    return attr[:, 0]


def brute_force(score, inputs, window, stride, baseline=0.0):
    """Mask every window by hand (clipped at the border), accumulate the score drops."""
    N, C, H, W = inputs.shape
    (kh, kw), (sh, sw) = window, stride
    base = torch.as_tensor(baseline, dtype=inputs.dtype).expand(N, C, H, W)
    total = torch.zeros(N, H, W, dtype=torch.float64)
    count = torch.zeros(H, W, dtype=torch.float64)
    with torch.no_grad():
        clean = score(inputs)
        top = 0
        while True:
            left = 0
            while True:
                occluded = inputs.clone()
                rows, cols = slice(top, top + kh), slice(left, left + kw)
                occluded[:, :, rows, cols] = base[:, :, rows, cols]
                total[:, rows, cols] += (clean - score(occluded)).double()[:, None, None]
                count[rows, cols] += 1
                if left + kw >= W:
                    break
                left += sw
            if top + kh >= H:
                break
            top += sh
    return (total / count).to(inputs.dtype)


@pytest.mark.parametrize("window, stride", [((8, 8), (4, 4)), ((5, 7), (3, 4)), ((32, 32), (1, 1))])
def test_matches_captum_on_digits(digits, window, stride):
    model, x, labels = digits
    ours = occlusion(model, x, labels, window=window, stride=stride)
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, captum_occlusion(model, x, labels, window, stride), **TOL)


def test_matches_brute_force_loop(digits):
    model, x, labels = digits
    window, stride = (6, 5), (4, 3)

    def score(images):
        return model(images).gather(1, labels[:, None])[:, 0]

    ours = occlusion(model, x, labels, window=window, stride=stride, baseline=-0.5)
    torch.testing.assert_close(ours, brute_force(score, x, window, stride, -0.5), **TOL)


def test_single_image_int_target_and_deltas(digits):
    model, x, _ = digits
    window, stride = (8, 8), (8, 8)
    attr, deltas = occlusion(model, x[:1], 3, window=window, stride=stride, return_deltas=True)
    assert attr.shape == (1, 32, 32) and deltas.shape == (1, 4, 4)
    # non-overlapping windows: each pixel's attribution is its window's delta
    torch.testing.assert_close(attr, deltas.repeat_interleave(8, 1).repeat_interleave(8, 2))
    torch.testing.assert_close(attr, captum_occlusion(model, x[:1], 3, window, stride), **TOL)
    assert not attr.is_inference() and not deltas.is_inference()


def test_resnet18_per_sample_targets():
    model = zoo.resnet18(num_classes=10)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    window, stride = (16, 16), (12, 12)
    ours = occlusion(model, x, [4, 7], window=window, stride=stride)
    ref = captum_occlusion(model, x, [4, 7], window, stride, per_eval=25)
    torch.testing.assert_close(ours, ref, **TOL)
    assert ours.abs().max() > 0


@pytest.mark.parametrize("neuron", [Neuron("features.conv3", 5), Neuron("features.relu4", 2, y=3, x=1)])
def test_neuron_target_matches_captum(digits, neuron):
    model, x, _ = digits

    def neuron_value(images):
        return neuron.value(forward_to_layers(model, images, [neuron.layer])[neuron.layer])

    window, stride = (6, 6), (5, 5)
    ours = occlusion(model, x, neuron, window=window, stride=stride)
    torch.testing.assert_close(ours, captum_occlusion(neuron_value, x, None, window, stride), **TOL)


def test_callable_target_matches_captum(digits):
    model, x, labels = digits

    def probability(output):
        return output.softmax(1)[:, 0]

    ours = occlusion(model, x, probability, window=(8, 8), stride=(4, 4))
    ref = captum_occlusion(lambda images: model(images).softmax(1), x, 0, (8, 8), (4, 4))
    torch.testing.assert_close(ours, ref, **TOL)


def test_tensor_baselines_match_captum(digits):
    model, x, labels = digits
    window, stride = (8, 8), (4, 4)
    channel_mean = x.mean((0, 2, 3), keepdim=True)  # [1, C, 1, 1]
    blurred = nn.functional.avg_pool2d(x, 5, 1, 2)  # [N, C, H, W], one per image
    for baseline in (channel_mean, blurred, torch.tensor(0.25)):
        ours = occlusion(model, x, labels, window=window, stride=stride, baseline=baseline, batch_size=20)
        ref = captum_occlusion(model, x, labels, window, stride, baseline=baseline)
        torch.testing.assert_close(ours, ref, **TOL)
    # a per-image baseline really is per image: the brute-force loop agrees
    score = lambda images: model(images).gather(1, labels[:, None])[:, 0]  # noqa: E731
    torch.testing.assert_close(occlusion(model, x, labels, window=window, stride=stride, baseline=blurred),
                               brute_force(score, x, window, stride, blurred), **TOL)


@pytest.mark.parametrize("batch_size", [1, 5, 49, 50, 1000])
def test_batch_size_does_not_change_result(digits, batch_size):
    model, x, labels = digits
    expected = occlusion(model, x, labels, window=(8, 8), stride=(4, 4), batch_size=147)
    ours = occlusion(model, x, labels, window=(8, 8), stride=(4, 4), batch_size=batch_size)
    torch.testing.assert_close(ours, expected, **TOL)


def forward_batch_sizes(model):
    sizes = []
    handle = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_occlusion_is_the_function_and_its_package_imports():
    """``attribution.occlusion`` is the function; importing the dotted name gives the package."""
    import cnnviz_fast.attribution as attribution
    package = importlib.import_module("cnnviz_fast.attribution.occlusion")
    assert attribution.occlusion is occlusion and callable(occlusion)
    assert package.occlusion is occlusion and package.choose_batch_size is choose_batch_size


def test_memory_budget_chooses_batch_size(digits):
    model, x, labels = digits
    assert choose_batch_size(1000, "cpu", memory_budget=10_000) == 10
    assert choose_batch_size(1000, "cpu", memory_budget=1) == 1
    assert choose_batch_size(1000, "cpu") == 64 * 2**20 // 1000
    with pytest.raises(ValueError, match="memory_budget"):
        choose_batch_size(1000, "cpu", memory_budget=0)

    sizes, handle = forward_batch_sizes(model)
    try:
        tiny = occlusion(model, x, labels, window=(16, 16), stride=(8, 8), memory_budget=1, mode="full")
        assert sizes == [3] + [1] * 27, "a tiny budget means one occluded image per forward pass"
        sizes.clear()
        default = occlusion(model, x, labels, window=(16, 16), stride=(8, 8), mode="full")
        assert sizes == [3, 27], "the default CPU budget fits all 3 x 9 occluded digits in one pass"
    finally:
        handle.remove()
    torch.testing.assert_close(tiny, default, **TOL)


def test_batches_group_images_and_split_positions(digits):
    model, x, labels = digits
    sizes, handle = forward_batch_sizes(model)
    try:
        occlusion(model, x, labels, window=(16, 16), stride=(8, 8), batch_size=20, mode="full")  # 9 positions
        assert sizes == [3, 18, 9]
        sizes.clear()
        occlusion(model, x, labels, window=(16, 16), stride=(8, 8), batch_size=4, mode="full")
        assert sizes == [3] + [3, 3, 3] * 3, "9 positions in equal passes of 3"
    finally:
        handle.remove()


class Exploding(nn.Module):
    """Raises on its second forward pass (the first occluded batch)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return self.model(x)


def test_model_restored_after_exception(digits):
    model, x, labels = digits
    wrapped = Exploding(model).train()
    grads_before = [p.requires_grad for p in wrapped.parameters()]
    x_before = x.clone()
    with pytest.raises(RuntimeError, match="boom"):
        occlusion(wrapped, x, labels, window=(8, 8), stride=(4, 4), mode="full")
    assert wrapped.training and all(m.training for m in wrapped.modules())
    assert not any(m._forward_hooks for m in wrapped.modules())
    assert [p.requires_grad for p in wrapped.parameters()] == grads_before
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    model.eval()


def test_eval_mode_during_call_and_inputs_untouched(digits):
    model, x, labels = digits
    model.train()
    x_before = x.clone()
    try:
        ours = occlusion(model, x, labels, window=(8, 8), stride=(4, 4))
        assert model.training
    finally:
        model.eval()
    torch.testing.assert_close(ours, occlusion(model, x, labels, window=(8, 8), stride=(4, 4)))
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)


def test_float64(digits):
    model, x, labels = digits
    model64 = zoo.digits_cnn().double()
    x64 = x.double()
    ours = occlusion(model64, x64, labels, window=(8, 8), stride=(8, 8))
    assert ours.dtype == torch.float64
    # (Captum casts its result to float32, so the float64 check is against the loop)
    score = lambda images: model64(images).gather(1, labels[:, None])[:, 0]  # noqa: E731
    torch.testing.assert_close(ours, brute_force(score, x64, (8, 8), (8, 8)).double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(window=(33, 8)), "window"),
    (dict(window=(0, 8)), "window"),
    (dict(stride=(0, 1)), "stride"),
    (dict(stride=(1, 2, 3)), "stride"),
    (dict(batch_size=0), "batch_size"),
    (dict(memory_budget=0), "memory_budget"),
    (dict(baseline=torch.zeros(2, 1, 1, 1)), "baseline"),
    (dict(baseline=torch.zeros(1, 1, 1, 1, 1)), "baseline"),
    (dict(baseline=float("nan")), "baseline"),
    (dict(baseline="grey"), "baseline"),
    (dict(target=[1, 2]), "target"),
])
def test_bad_arguments(digits, kwargs, argument):
    model, x, labels = digits
    kwargs = {"target": labels, **kwargs}
    with pytest.raises(ValueError, match=argument):
        occlusion(model, x, **kwargs)


def test_bad_inputs(digits):
    model, x, labels = digits
    with pytest.raises(ValueError, match="inputs"):
        occlusion(model, x[0], 1)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inputs"):
        occlusion(model, nan, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(digits):
    model, x, labels = digits
    model, x = copy.deepcopy(model).double(), x.double()  # float64: compare our code, not two roundings
    cpu = occlusion(model, x, labels, window=(5, 7), stride=(3, 4), baseline=x.mean((0, 2, 3), keepdim=True))
    gpu_model = zoo.digits_cnn().double().cuda()
    xg = x.cuda()
    gpu = occlusion(gpu_model, xg, labels, window=(5, 7), stride=(3, 4), baseline=xg.mean((0, 2, 3), keepdim=True))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-9, rtol=1e-7)
    # default batch size from free GPU memory
    free = choose_batch_size(10**6, xg.device)
    assert free >= 1


def test_full_recomputation_measures_its_batch_size(digits):
    """No batch size or budget, more work than one pass of the default budget: the first
    passes try the candidate sizes in ascending order (within a quarter of the work) until
    one is slower per image than the best so far, the rest runs at the best; same result.
    (Which sizes are tried depends on timing: only the structure is checked.)"""
    model, x, labels = digits
    x, labels = x[:2], labels[:2]
    window, stride = (4, 4), (1, 1)  # 29 x 29 = 841 positions per image
    sizes, handle = forward_batch_sizes(model)
    try:
        measured = occlusion(model, x, labels, window=window, stride=stride, mode="full")
    finally:
        handle.remove()
    candidates = [8, 16, 32, 64, 128]  # 8 + 248 <= 1682 / 4: the quarter never stops the trials here
    assert sizes[:2] == [2, 8]  # the clean pass, the untimed first pass
    sizes = [2] + sizes[2:]
    tried = 2 + next((k for k, size in enumerate(sizes[3:len(candidates) + 1]) if size != candidates[k + 2]),
                     len(candidates) - 2)
    assert sizes[1:tried + 1] == candidates[:tried]
    rest = sizes[tried + 1:]  # the chosen size, or equal smaller passes splitting an image
    assert rest[0] in candidates[:tried] and max(rest) == rest[0] and sum(sizes[1:]) == 2 * 841 - 8
    if tried < len(candidates):  # stopped: the last size tried was slower than the best
        assert rest[0] != candidates[tried - 1]
    expected = occlusion(model, x, labels, window=window, stride=stride, mode="full", batch_size=841)
    torch.testing.assert_close(measured, expected, **TOL)


def test_full_recomputation_batches_are_channels_last_unless_the_model_refuses(monkeypatch):
    monkeypatch.setattr(layout, "MIN_PIXELS", 0)  # the test's batches are small
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    viewing, reshaping = FlattensByView(), FlattensByView(reshape=True)
    reshaping.load_state_dict(viewing.state_dict())
    knobs = dict(mode="full", window=(4, 4), stride=(2, 2), batch_size=8)
    ours = occlusion(reshaping, x, [1, 3], **knobs)
    assert reshaping.layouts[0] is False and all(reshaping.layouts[1:])  # the clean pass takes x as given
    refused = occlusion(viewing, x, [1, 3], **knobs)
    assert viewing.layouts[1] is True and not any(viewing.layouts[2:])  # one try, then contiguous
    torch.testing.assert_close(refused, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, captum_occlusion(reshaping, x, [1, 3], (4, 4), (2, 2)), rtol=1e-4, atol=1e-5)


def test_small_batches_stay_contiguous():
    torch.manual_seed(0)
    model = FlattensByView(reshape=True)
    occlusion(model, torch.randn(2, 3, 12, 12), [1, 3], mode="full", window=(4, 4), stride=(2, 2), batch_size=8)
    assert not any(model.layouts)  # 8 x 12 x 12 pixels per pass < MIN_PIXELS
