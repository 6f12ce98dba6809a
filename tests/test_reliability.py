"""The README's promises for a service (issue 9): bad inputs refused with a ValueError that
names the argument, the caller's tensors never modified (also by a model that writes into
its input), models with tuple / dict outputs usable with a callable target."""
import numpy as np
import pytest
import torch
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Neuron, ops

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


class Halving(nn.Module):
    """``model(x * 0.5)``, in place (``inplace=True``) or not."""

    def __init__(self, model, inplace):
        super().__init__()
        self.model, self.inplace = model, inplace

    def forward(self, x):
        x = x.mul_(0.5) if self.inplace else x * 0.5
        return self.model(x)


class TupleOutput(nn.Module):
    def __init__(self, model, as_dict=False):
        super().__init__()
        self.model, self.as_dict = model, as_dict

    def forward(self, x):
        logits = self.model(x)
        return {"logits": logits} if self.as_dict else (logits, x.mean())


@pytest.fixture
def model():
    return small_cnn()


@pytest.fixture
def x():
    return torch.rand(2, 3, 8, 8)


def with_nan(x, value=float("nan")):
    x = x.clone()
    x[1, 0, 3, 4] = value
    return x


# ---------------------------------------------------------------- NaN / Inf / meta


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_data_is_refused_by_the_feature_methods(model, x, value):
    bad = with_nan(x, value)
    with pytest.raises(ValueError, match=r"data \(inputs 0 to 1\) contains NaN or infinite"):
        cv.extract_features(model, bad, "2")
    with pytest.raises(ValueError, match=r"data \(inputs 2 to 3\) contains NaN or infinite"):
        cv.extract_features(model, [x, bad], "2", length=4)  # the second batch
    with pytest.raises(ValueError, match=r"data \(inputs 0 to 1\) contains NaN or infinite"):
        cv.max_activating_patches(model, bad, "2", k=2)


def test_feature_data_must_be_floating_point_and_out_a_file(model, x, tmp_path):
    for dtype in (torch.uint8, torch.int64, torch.bool):
        with pytest.raises(ValueError, match=r"data \(inputs 0 to 1\) must be floating-point model inputs"):
            cv.extract_features(model, x.to(dtype), "2")
        with pytest.raises(ValueError, match="must be floating-point model inputs"):
            cv.max_activating_patches(model, x.to(dtype), "2", k=2)
    with pytest.raises(ValueError, match="out must be the path of a .npy file, got the directory"):
        cv.extract_features(model, x, "2", out=tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_or_queries_are_refused(value):
    features = torch.rand(6, 3)
    bad = features.clone()
    bad[4, 1] = value
    with pytest.raises(ValueError, match="features contains NaN or infinite"):
        cv.nearest_neighbors(bad, None, k=1)
    with pytest.raises(ValueError, match="queries contains NaN or infinite"):
        cv.nearest_neighbors(features, bad[3:5], k=1)
    with pytest.raises(ValueError, match="features contains NaN or infinite"):
        cv.embed(bad)
    with pytest.raises(ValueError, match="features contains NaN or infinite"):
        cv.embed(bad, method="tsne", perplexity=2.0)


def test_meta_tensors_are_refused_with_a_clear_message(model):
    meta = torch.empty(2, 3, 8, 8, device="meta")
    for call in (lambda: cv.saliency(model, meta, 1), lambda: cv.occlusion(model, meta, 1, window=4),
                 lambda: cv.grad_cam(model, meta, "2", 1)):
        with pytest.raises(ValueError, match="inputs is a meta tensor"):
            call()
    with pytest.raises(ValueError, match=r"data \(inputs 0 to 1\) is a meta tensor"):
        cv.extract_features(model, meta, "2")
    with pytest.raises(ValueError, match="queries is a meta tensor"):
        cv.nearest_neighbors(torch.rand(4, 2), torch.empty(1, 2, device="meta"), k=1)
    with pytest.raises(ValueError, match="saliency is a meta tensor"):
        cv.saliency_to_mask(torch.rand(1, 3, 8, 8), torch.empty(1, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="image is a meta tensor"):
        cv.saliency_to_mask(meta, torch.rand(1, 8, 8))
    with torch.device("meta"):
        meta_model = small_cnn()
    with pytest.raises(ValueError, match="model has parameters on the meta device"):
        cv.saliency(meta_model, torch.rand(1, 3, 8, 8), 1)


# ---------------------------------------------------------------- dtypes


def test_float64_inputs_to_a_float32_model_are_refused_with_the_fix(model, x):
    message = r"inputs are float64 but the model's parameters are float32; pass inputs.to\(torch.float32\)"
    for call in (lambda: cv.saliency(model, x.double(), 1), lambda: cv.smoothgrad(model, x.double(), 1, samples=2),
                 lambda: cv.integrated_gradients(model, x.double(), 1, steps=2),
                 lambda: cv.guided_backprop(model, x.double(), 1), lambda: cv.grad_cam(model, x.double(), "2", 1),
                 lambda: cv.occlusion(model, x.double(), 1, window=4)):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=r"data are float64 but the model's parameters are float32"):
        cv.extract_features(model, x.double(), "2")
    # a float64 model takes float64 inputs; the result is float64 as the inputs
    double = small_cnn().double()
    assert cv.saliency(double, x.double(), 1).dtype == torch.float64


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", [None, 2.5, True, "4", (4,), (4, 4, 4)])
def test_occlusion_window_and_stride_must_be_ints(model, x, value):
    with pytest.raises(ValueError, match="window must be an int or a pair of ints"):
        cv.occlusion(model, x, 1, window=value)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
        cv.occlusion(model, x, 1, window=4, stride=value)


@pytest.mark.parametrize("field", ["channel", "y", "x"])
@pytest.mark.parametrize("value", [1.5, 1.0, "1", True])
def test_neuron_channel_and_position_must_be_ints(field, value):
    args = dict(layer="2", channel=1, y=1, x=1)
    args[field] = value
    with pytest.raises(ValueError, match=f"Neuron.{field} must be an int"):
        Neuron(**args)


def test_neuron_accepts_int_like_values_as_ints(model, x):
    neuron = Neuron("2", np.int64(1), torch.tensor(2), np.int32(3))
    assert neuron == Neuron("2", 1, 2, 3) and type(neuron.channel) is int
    assert torch.equal(cv.saliency(model, x, neuron), cv.saliency(model, x, Neuron("2", 1, 2, 3)))


@pytest.mark.parametrize("weight", ["heavy", "1", True, float("nan"), None])
def test_gram_loss_weight_must_be_a_number(weight):
    features, target = torch.rand(2, 3, 4, 4), torch.rand(3, 3)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        ops.gram_loss(features, target, weight)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        ops.gram_loss([features, features], [target, target], [1.0, weight])
    assert torch.equal(ops.gram_loss(features, target, np.float32(2.0)), ops.gram_loss(features, target, 2.0))


# ---------------------------------------------------------------- tuple / dict outputs


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_work_with_a_callable_target(model, x, as_dict):
    wrapped = TupleOutput(model, as_dict)
    pick = (lambda out: out["logits"][:, 3]) if as_dict else (lambda out: out[0][:, 3])
    calls = {
        "saliency": lambda m, t: cv.saliency(m, x, t),
        "smoothgrad": lambda m, t: cv.smoothgrad(m, x, t, samples=3, seed=0),
        "integrated_gradients": lambda m, t: cv.integrated_gradients(m, x, t, steps=3),
        "guided_backprop": lambda m, t: cv.guided_backprop(m, x, t),
        "grad_cam": lambda m, t: cv.grad_cam(m, x, "model.2" if m is wrapped else "2", t),
        "occlusion": lambda m, t: cv.occlusion(m, x, t, window=4, stride=4),
    }
    for name, call in calls.items():
        torch.testing.assert_close(call(wrapped, pick), call(model, 3), msg=name)
    with pytest.raises(ValueError, match="needs a model output Tensor"):
        cv.saliency(wrapped, x, 3)


# ---------------------------------------------------------------- the caller's tensors


def test_a_model_writing_into_its_input_leaves_the_callers_data_alone(model, x):
    writer, plain = Halving(model, inplace=True), Halving(model, inplace=False)
    before = x.clone()
    torch.testing.assert_close(cv.occlusion(writer, x, 1, window=4, stride=4),
                               cv.occlusion(plain, x, 1, window=4, stride=4))
    torch.testing.assert_close(cv.extract_features(writer, x, "model.2"), cv.extract_features(plain, x, "model.2"))
    torch.testing.assert_close(cv.extract_features(writer, [x[:1], x[1:]], "model.2"),
                               cv.extract_features(plain, x, "model.2"))
    gradient_methods = {
        "saliency": lambda m: cv.saliency(m, x, 1),
        "smoothgrad": lambda m: cv.smoothgrad(m, x, 1, samples=3, seed=0),
        "integrated_gradients": lambda m: cv.integrated_gradients(m, x, 1, steps=3),
        "guided_backprop": lambda m: cv.guided_backprop(m, x, "predicted"),
        "deconvnet": lambda m: cv.deconvnet(m, x, 1),
        "grad_cam": lambda m: cv.grad_cam(m, x, "model.2", 1),
        "guided_grad_cam": lambda m: cv.guided_grad_cam(m, x, "model.2", 1),
    }
    for name, call in gradient_methods.items():
        torch.testing.assert_close(call(writer), call(plain), msg=name)
    for data in (x, [x[:1], x[1:]]):
        ours, theirs = (cv.max_activating_patches(m, data, "model.2", k=3) for m in (writer, plain))
        assert torch.equal(ours.patches, theirs.patches)  # cut from the unmodified inputs
        torch.testing.assert_close(ours.values, theirs.values)
    assert torch.equal(x, before)
