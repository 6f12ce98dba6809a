"""The Explainer: one forward per call, results equal to the method called directly, safe
under threads on shared models, the model left as found."""
import threading

import pytest
import torch
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Explainer, Explanation, Neuron, zoo

pytestmark = pytest.mark.usefixtures("one_thread")

NORM = zoo.DIGITS_NORMALIZE


def bn_cnn():
    """A second, different network: BatchNorm and Dropout make train mode visible."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Dropout(0.5), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def pixels():
    return zoo.digits("test")[0][:16]


def state(model):
    """Everything a call could leave behind on the model."""
    return ([m.training for m in model.modules()],
            [sorted(getattr(m, name)) for m in model.modules()
             for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")],
            [(p.requires_grad, p.grad) for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_same_state(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]
    assert a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


CASES = [
    ("saliency", {}),
    ("guided_backprop", {}),
    ("deconvnet", {}),
    ("grad_cam", {"layer": "features.conv3"}),
]


@pytest.mark.parametrize("method, arguments", CASES)
def test_one_forward_per_call_and_the_same_result_as_the_method(pixels, method, arguments):
    model = zoo.digits_cnn()
    explainer = Explainer(model, method, normalize=NORM, **arguments)
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        output, maps = explainer(pixels[:4])
    finally:
        handle.remove()
    assert len(forwards) == 1
    with torch.no_grad():
        logits = model(NORM(pixels[:4]))
    torch.testing.assert_close(output, logits)
    expected = getattr(cv, method)(model, NORM(pixels[:4]), target=logits.argmax(1), **arguments)
    torch.testing.assert_close(maps, expected)


def test_explanation_fields_and_target_override(pixels):
    model = zoo.digits_cnn()
    explainer = Explainer(model, "saliency", normalize=NORM)
    result = explainer(pixels[:3], target=7)
    assert isinstance(result, Explanation) and result.maps.shape == (3, 1, 32, 32)
    torch.testing.assert_close(result.maps, cv.saliency(model, NORM(pixels[:3]), 7))
    neuron = Neuron("features.conv2", 3)
    torch.testing.assert_close(explainer(pixels[:3], target=neuron).maps,
                               cv.saliency(model, NORM(pixels[:3]), neuron))


def test_occlusion_and_smoothgrad_through_the_explainer(pixels):
    model = zoo.digits_cnn()
    explainer = Explainer(model, "occlusion", normalize=NORM, window=8, stride=8)
    output, maps = explainer(pixels[:2])
    assert torch.equal(output.argmax(1), model(NORM(pixels[:2])).argmax(1))
    torch.testing.assert_close(maps, cv.occlusion(model, NORM(pixels[:2]), output.argmax(1), window=8, stride=8))
    explainer = Explainer(model, "smoothgrad", normalize=NORM, samples=4, seed=3)
    output, maps = explainer(pixels[:2])
    torch.testing.assert_close(maps, cv.smoothgrad(model, NORM(pixels[:2]), output.argmax(1), samples=4, seed=3))


def test_eight_threads_on_two_models_equal_single_threaded_calls(pixels):
    models = [zoo.digits_cnn().train(), bn_cnn().train()]  # train mode: the methods must use eval
    before = [state(m) for m in models]
    explainers = [Explainer(models[0], "grad_cam", layer="features.conv3", normalize=NORM),
                  Explainer(models[1], "guided_backprop", normalize=NORM)]
    batches = [pixels[2 * i:2 * i + 2] for i in range(8)]
    expected = [explainers[i % 2](batches[i]) for i in range(8)]
    results, errors = {}, []
    start = threading.Barrier(8)

    def work(i):
        try:
            start.wait()
            results[i] = [explainers[i % 2](batches[i]) for _ in range(5)]
        except BaseException as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(8):
        for output, maps in results[i]:
            torch.testing.assert_close(output, expected[i].output, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(maps, expected[i].maps, rtol=1e-5, atol=1e-6)
    for model, was in zip(models, before):
        assert_same_state(state(model), was)


def test_the_model_is_left_as_found_also_when_a_call_raises(pixels):
    model = bn_cnn().train()
    for p in model[0].parameters():
        p.requires_grad_(False)
    before = state(model)
    explainer = Explainer(model, "grad_cam", layer="4")
    explainer(pixels[:2])
    with pytest.raises(ValueError, match="contains NaN"):
        explainer(torch.full((1, 1, 32, 32), float("nan")))
    assert_same_state(state(model), before)


def test_mistakes_are_found_at_construction():
    model = zoo.digits_cnn()
    with pytest.raises(ValueError, match="method must be one of"):
        Explainer(model, "no_such_method")
    with pytest.raises(ValueError, match="layer 'features.conv9' is not a submodule"):
        Explainer(model, "grad_cam", layer="features.conv9")
    assert Explainer(model, "grad_cam").layer_note is None  # no layer: the default rule at the first call
    with pytest.raises(ValueError, match="arguments do not fit saliency"):
        Explainer(model, "saliency", samples=3)
    with pytest.raises(ValueError, match="return_output is set by the Explainer"):
        Explainer(model, "saliency", return_output=True)
    with pytest.raises(ValueError, match="target.layer 'nope' is not a submodule"):
        Explainer(model, "saliency", target=Neuron("nope", 0))
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        Explainer("resnet", "saliency")


def test_a_function_as_the_method(pixels):
    model = zoo.digits_cnn()
    x = NORM(pixels[:2])
    output, maps = Explainer(model, cv.saliency, abs=False)(x)
    torch.testing.assert_close(maps, cv.saliency(model, x, output.argmax(1), abs=False))

    def no_output(model, inputs, target):
        return inputs

    with pytest.raises(ValueError, match="arguments do not fit no_output"):
        Explainer(model, no_output)
