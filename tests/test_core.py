"""The shared mechanisms: layer lookup/capture, targets, model guard, normalisation, checks."""
import pytest
import torch
from torch import nn

from cnnviz_fast.core import (Neuron, Normalize, capture_layers, check_images, forward_to_layers, get_layer,
                              model_guard, target_for_rows, target_scores)
from cnnviz_fast.core.targets import check_target


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), Counting(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_get_layer_suggests_close_names():
    model = small_model()
    assert get_layer(model, "1") is model[1]
    with pytest.raises(ValueError, match=r"layer '5' is not a submodule.*"):
        get_layer(model, "5")
    with pytest.raises(ValueError, match="target.layer"):
        get_layer(model, "nope", argument="target.layer")


def test_forward_to_layers_stops_at_deepest_layer():
    model = small_model()
    x = torch.randn(3, 2, 8, 8)
    acts = forward_to_layers(model, x, ["1", "0"])
    assert model[2].calls == 0, "the pass must stop after the deepest requested layer"
    torch.testing.assert_close(acts["1"], torch.relu(model[0](x)))
    acts = forward_to_layers(model, x, ["2"], stop=False)
    assert model[2].calls == 1 and acts["2"].shape == (3, 4, 6, 6)
    assert not model[1]._forward_hooks


def test_forward_to_layers_reports_layer_never_run():
    class PartlyUsed(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Identity(), nn.ReLU()

        def forward(self, x):
            return self.used(x)

    model = PartlyUsed()
    with pytest.raises(ValueError, match="'unused' was not executed"):
        forward_to_layers(model, torch.zeros(1, 1, 2, 2), ["unused"])


def test_capture_removes_hooks_on_exception():
    model = small_model()
    with pytest.raises(RuntimeError):
        with capture_layers(model, ["0", "1"]):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("target", [3, [0, 4, 2], torch.tensor([1, 1, 0]), lambda out: out[:, 2] * 2])
def test_target_scores_classes_and_callables(target):
    model = small_model()
    x = torch.randn(3, 2, 8, 8)
    out = model(x)
    if callable(target) and not isinstance(target, torch.Tensor):
        expected = out[:, 2] * 2
    else:
        idx = torch.as_tensor(target).expand(3) if not isinstance(target, int) else torch.full((3,), target)
        expected = out[torch.arange(3), idx]
    torch.testing.assert_close(target_scores(model, x, target), expected)


def test_neuron_target_values():
    model = small_model()
    x = torch.randn(2, 2, 8, 8)
    act = torch.relu(model[0](x))
    torch.testing.assert_close(target_scores(model, x, Neuron("1", 3)), act[:, 3].mean((1, 2)))
    torch.testing.assert_close(target_scores(model, x, Neuron("1", 2, 4, 5)), act[:, 2, 4, 5])
    torch.testing.assert_close(target_scores(model, x, Neuron("4", 1)), model(x)[:, 1])


@pytest.mark.parametrize("target, message", [
    (5, r"target classes must lie in \[0, 5\)"),
    (-1, r"target classes must lie in \[0, 5\)"),
    ([0, 1], "one class per image"),
    (1.5, "target must be"),
    (Neuron("1", 4), r"channel must be in \[0, 4\)"),
    (Neuron("1", 0, 6, 0), r"\(y, x\) must lie"),
    (Neuron("nope", 0), "target.layer 'nope'"),
    (lambda out: out, r"target callable must return a Tensor\[3\]"),
])
def test_bad_targets_name_the_argument(target, message):
    with pytest.raises(ValueError, match=message):
        target_scores(small_model(), torch.randn(3, 2, 8, 8), target)


def test_check_target_and_rows():
    with pytest.raises(ValueError, match="target is required"):
        check_target(None, 2)
    with pytest.raises(ValueError, match="one class per image"):
        check_target([1, 2, 3], 2)
    with pytest.raises(ValueError, match="'predicted'"):
        check_target("1", 2)
    with pytest.raises(ValueError, match="needs inputs to predict from"):
        check_target("predicted", 2, allow_predicted=False)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    assert target_for_rows([1, 2], rows).tolist() == [1, 1, 1, 2, 2, 2]
    neuron = Neuron("a", 0)
    assert target_for_rows(neuron, rows) is neuron and target_for_rows(7, rows) == 7
    assert target_for_rows("predicted", rows) == "predicted"
    with pytest.raises(ValueError, match="given together"):
        Neuron("a", 0, y=1)


@pytest.mark.parametrize("start_training", [True, False])
def test_model_guard_restores_everything_after_exception(start_training):
    model = small_model().train(start_training)
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with model_guard(model):
            assert not model.training and not model[0].training
            model[1].register_forward_hook(lambda *a: None)
            model[1].register_forward_pre_hook(lambda *a: None)
            model[4].register_full_backward_hook(lambda *a: None)
            model[1] = nn.Tanh()
            for p in model.parameters():
                p.requires_grad_(True)
            raise RuntimeError("inside")
    assert isinstance(model[1], nn.ReLU)
    assert all(m.training == start_training for m in model.modules())
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_model_guard_keeps_users_own_hooks():
    model = small_model()
    handle = model[1].register_forward_hook(lambda *a: None)
    with model_guard(model):
        pass
    assert handle.id in model[1]._forward_hooks
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        with model_guard(lambda x: x):
            pass


def test_normalize_roundtrip_and_range():
    norm = Normalize((0.5, 0.25), (0.5, 0.25))
    pixels = torch.rand(2, 2, 3, 3)
    torch.testing.assert_close(norm.inverse(norm(pixels)), pixels)
    low, high = norm.pixel_range(pixels)
    torch.testing.assert_close(norm(torch.zeros(1, 2, 1, 1)), low)
    torch.testing.assert_close(norm(torch.ones(1, 2, 1, 1)), high)
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize((0.0,), (0.0,))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 4), "4-D tensor"),
    (torch.zeros(1, 1, 2, 2, dtype=torch.long), "floating-point"),
    (torch.full((1, 1, 2, 2), float("nan")), "NaN"),
    (torch.zeros(0, 1, 2, 2), "at least one image"),
    ([1, 2], "Tensor"),
])
def test_check_images(bad, message):
    with pytest.raises(ValueError, match="images.*" + message):
        check_images(bad, "images")
