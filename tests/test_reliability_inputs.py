"""Issue 22, items 2 and 3: every input the reliability probe found accepted silently (a
wrong result) or refused unclearly is refused with a ValueError naming the argument; a
model that writes into its input does not change the metrics' or the inversion's result.
One case per line of ../shared/reviews/reliability.md."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Explainer, Neuron, metrics, pipeline
from cnnviz_fast.features import (extract_features, filter_grid, max_activating_patches, patch_grid,
                                  receptive_field)
from cnnviz_fast.synthesis import (adversarial, deep_dream, invert_features, optimize, style_transfer,
                                   synthesize_texture, visualize_class)
from cnnviz_fast.synthesis.engine import Objective
from cnnviz_fast.synthesis.parameterization import make_image

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


MODEL = small_cnn()
X = torch.rand(2, 3, 8, 8)
PIXELS = torch.rand(2, 3, 8, 8)
MAPS = torch.rand(2, 8, 8)
ATTR = torch.rand(2, 3, 8, 8)


class Output(nn.Module):
    """``small_cnn`` whose output is replaced by ``make(logits)``."""

    def __init__(self, make):
        super().__init__()
        self.net, self.make = small_cnn(), make

    def forward(self, x):
        return self.make(self.net(x))


class Fails(nn.Module):
    def forward(self, x):
        raise RuntimeError("the model's own failure")


class Broken(nn.Module):
    """A model that raises its own error inside the forward pass, before any layer."""

    def __init__(self):
        super().__init__()
        self.fails, self.conv = Fails(), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(self.fails(x))


def png_bytes(size=4, mode="RGB"):
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def top_activations():
    return max_activating_patches(MODEL, X, "2", channels=[0], k=1, progress=False)


def one_scalar_loss(features, output, index):
    return output.sum()  # one value for the whole batch instead of one per image


def scalar_loss_optimize():
    image = make_image("pixels", (2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    return optimize(MODEL, Objective(loss=one_scalar_loss, needs_output=True), image, steps=1)


def one_perturbation(x):
    return x + 0.01  # Captum wants (perturbations, perturbed inputs)


def meta_model_output(x):
    return MODEL(x)


SYNTHESIS = {
    "adversarial": (lambda p: adversarial(MODEL, p, [1, 2], "fgsm"), "pixels"),
    "invert_features": (lambda p: invert_features(MODEL, p, "2", steps=1), "pixels"),
    "deep_dream": (lambda p: deep_dream(MODEL, p, "2", steps=1, octaves=1), "pixels"),
    "synthesize_texture": (lambda p: synthesize_texture(MODEL, p, ["0", "2"], steps=1), "texture"),
    "style_transfer": (lambda p: style_transfer(MODEL, p, PIXELS, "2", ["0"], steps=1), "content"),
}

SILENT_WRONG = [
    *[pytest.param(lambda f=f, d=d: f(PIXELS.to(d)), name, id=f"{key}-{str(d)[6:]}")
      for key, (f, name) in SYNTHESIS.items() for d in (torch.float64, torch.float16, torch.bfloat16)],
    pytest.param(lambda: metrics.evaluate(MODEL, X[:0], {"saliency": cv.saliency}), "data", id="evaluate-empty"),
    pytest.param(lambda tmp: pipeline.saliency_maps(MODEL, X[:0], tmp / "o", progress=False), "data",
                 id="saliency_maps-empty"),
    pytest.param(lambda: metrics.deletion_curve(MODEL, X, 1, MAPS, steps=2, baseline=NAN), "baseline",
                 id="deletion-baseline-nan"),
    pytest.param(lambda: metrics.deletion_curve(MODEL, X, 1, MAPS, steps=2, baseline=INF), "baseline",
                 id="deletion-baseline-inf"),
    pytest.param(lambda: metrics.insertion_curve(MODEL, X, 1, MAPS, steps=2, baseline=torch.full((1, 3, 1, 1), NAN)),
                 "baseline", id="insertion-baseline-nan-tensor"),
    pytest.param(lambda: metrics.model_randomization(MODEL, X, 1, cv.saliency, threshold=NAN), "threshold",
                 id="randomization-threshold-nan"),
    pytest.param(lambda: metrics.model_randomization(MODEL, X, 1, cv.saliency, threshold=2.0), "threshold",
                 id="randomization-threshold-2"),
    pytest.param(lambda: metrics.pointing_game(MAPS, torch.tensor([[0, 0, 4, 4]] * 2), tolerance=NAN), "tolerance",
                 id="pointing-tolerance-nan"),
    pytest.param(lambda: metrics.pointing_game(MAPS, torch.tensor([[0, 0, NAN, 4]] * 2)), "boxes",
                 id="pointing-boxes-nan"),
    pytest.param(lambda: metrics.spearman(torch.full((2, 8, 8), NAN), MAPS), "a", id="spearman-nan"),
    pytest.param(lambda: metrics.ssim(MAPS, MAPS, sigma=0), "sigma", id="ssim-sigma-0"),
    pytest.param(lambda: metrics.step_counts(-5, 4), "cells", id="step_counts-negative"),
    pytest.param(lambda: visualize_class(MODEL, 1, (3, 8, 8), steps=1, lr=INF), "lr", id="visualize_class-lr-inf"),
    pytest.param(lambda: receptive_field(MODEL, (3, 16.5, 16), "2"), "input_size", id="receptive-fractional"),
    pytest.param(lambda: filter_grid(MODEL, "0", nrow=0), "nrow", id="filter_grid-nrow-0"),
    pytest.param(lambda: patch_grid(top_activations(), outside=NAN), "outside", id="patch_grid-outside-nan"),
    pytest.param(lambda: pipeline.decode_image(png_bytes(), 8, channels=2), "channels", id="decode-channels-2"),
    pytest.param(lambda: pipeline.to_map(torch.rand(4, 4)), "attributions", id="to_map-2d"),
    pytest.param(scalar_loss_optimize, "loss", id="optimize-scalar-loss"),
]

ATTRIBUTION = {
    "saliency": lambda t: cv.saliency(MODEL, X, t),
    "smoothgrad": lambda t: cv.smoothgrad(MODEL, X, t, samples=2),
    "integrated_gradients": lambda t: cv.integrated_gradients(MODEL, X, t, steps=2),
    "guided_backprop": lambda t: cv.guided_backprop(MODEL, X, t),
    "deconvnet": lambda t: cv.deconvnet(MODEL, X, t),
    "grad_cam": lambda t: cv.grad_cam(MODEL, X, "2", t),
    "guided_grad_cam": lambda t: cv.guided_grad_cam(MODEL, X, "2", t),
    "occlusion": lambda t: cv.occlusion(MODEL, X, t, window=4, stride=4),
    "deletion_curve": lambda t: metrics.deletion_curve(MODEL, X, t, MAPS, steps=2),
    "insertion_curve": lambda t: metrics.insertion_curve(MODEL, X, t, MAPS, steps=2),
    "infidelity": lambda t: metrics.infidelity(MODEL, X, t, ATTR, lambda x: (x * 0.1, x * 0.9), n_perturb_samples=1),
    "sensitivity_max": lambda t: metrics.sensitivity_max(MODEL, X, t, cv.saliency, n_perturb_samples=1),
    "model_randomization": lambda t: metrics.model_randomization(MODEL, X, t, cv.saliency),
    "adversarial": lambda t: adversarial(MODEL, PIXELS, t, "fgsm"),
    "Explainer": lambda t: Explainer(MODEL, "saliency", target=t)(X),
    "Explainer-call": lambda t: Explainer(MODEL, "saliency")(X, t),
}

FLOAT64 = {
    "deletion_curve": lambda x: metrics.deletion_curve(MODEL, x, 1, MAPS.double(), steps=2),
    "insertion_curve": lambda x: metrics.insertion_curve(MODEL, x, 1, MAPS.double(), steps=2),
    "infidelity": lambda x: metrics.infidelity(MODEL, x, 1, ATTR.double(), lambda v: (v * 0.1, v * 0.9)),
    "sensitivity_max": lambda x: metrics.sensitivity_max(MODEL, x, 1, cv.saliency, n_perturb_samples=1),
    "model_randomization": lambda x: metrics.model_randomization(MODEL, x, 1, cv.saliency),
}

UNCLEAR = [
    *[pytest.param(lambda f=f: f(X.double()), "inputs", id=f"{key}-float64") for key, f in FLOAT64.items()],
    pytest.param(lambda: metrics.evaluate(MODEL, X.double(), {"saliency": cv.saliency}), "data",
                 id="evaluate-float64"),
    *[pytest.param(lambda f=f: f(torch.ones(2, dtype=torch.long, device="meta")), "target", id=f"{key}-meta-target")
      for key, f in ATTRIBUTION.items()],
    *[pytest.param(lambda f=f: f({"class": 1}), "target", id=f"{key}-dict-target") for key, f in ATTRIBUTION.items()],
    pytest.param(lambda: metrics.evaluate(MODEL, torch.tensor(1.0), {"s": cv.saliency}), "data", id="evaluate-rank0"),
    pytest.param(lambda: metrics.evaluate(MODEL, torch.empty(2, 3, 8, 8, device="meta"), {"s": cv.saliency}), "data",
                 id="evaluate-meta"),
    pytest.param(lambda: metrics.evaluate(MODEL, None, {"s": cv.saliency}), "data", id="evaluate-none"),
    pytest.param(lambda tmp: pipeline.saliency_maps(MODEL, torch.empty(2, 3, 8, 8, device="meta"), tmp / "o",
                                                    progress=False), "data", id="saliency_maps-meta"),
    pytest.param(lambda tmp: pipeline.saliency_maps(MODEL, str(png_file(tmp)), tmp / "o", size=8,
                                                    normalize=cv.Normalize([0.5] * 3, [0.5] * 3), progress=False),
                 "data", id="saliency_maps-one-file"),
    *[pytest.param(lambda s=s: extract_features(MODEL, torch.rand(s), "2"), "data", id=f"extract-rank{len(s)}")
      for s in ((), (2, 3), (2, 3, 8), (2, 3, 8, 8, 1))],
    pytest.param(lambda: max_activating_patches(MODEL, torch.tensor(1.0), "2", progress=False), "data",
                 id="patches-rank0"),
    *[pytest.param(lambda m=m: visualize_class(Output(m), 1, (3, 8, 8), steps=1), "model", id=f"visualize-{key}")
      for key, m in {"tuple": lambda o: (o, o), "dict": lambda o: {"logits": o}, "list": lambda o: [o],
                     "none": lambda o: None, "str": lambda o: "x", "4d": lambda o: o[:, :, None, None],
                     "scalar": lambda o: o.sum(), "detached": lambda o: o.detach()}.items()],
    pytest.param(lambda: adversarial(Output(lambda o: o.detach()), PIXELS, [1, 2], "fgsm"), "model",
                 id="adversarial-detached"),
    pytest.param(lambda: invert_features(MODEL, PIXELS, ["2"], steps=1), "layer", id="invert-layer-list"),
    pytest.param(lambda: deep_dream(MODEL, PIXELS, ["2"], steps=1, octaves=1), "layer", id="dream-layer-list"),
    pytest.param(lambda: optimize(MODEL, Objective(loss=lambda f, o, i: f["2"].mean((1, 2, 3)), layers=["2", ["2"]]),
                                  make_image("pixels", (1, 3, 8, 8)), steps=1), "layer", id="optimize-layer-list"),
    pytest.param(lambda: metrics.infidelity(MODEL, X, 1, ATTR, one_perturbation, n_perturb_samples=1),
                 "perturb_func", id="infidelity-one-tensor"),
    *[pytest.param(lambda r=r: metrics.sensitivity_max(MODEL, X, 1, cv.saliency, perturb_radius=r,
                                                       n_perturb_samples=1), "perturb_radius", id=f"sensitivity-{r}")
      for r in (-0.1, NAN, "0.02")],
    pytest.param(lambda: metrics.sensitivity_max(MODEL, X, 1, cv.saliency, norm_ord="bogus", n_perturb_samples=1),
                 "norm_ord", id="sensitivity-norm_ord"),
    pytest.param(lambda: metrics.model_randomization(MODEL, X, 1, cv.saliency, seed="x"), "seed",
                 id="randomization-seed"),
    pytest.param(lambda: metrics.evaluate_dataset(MODEL, X, None), "out", id="evaluate_dataset-out-none"),
    pytest.param(lambda: metrics.evaluate_dataset(MODEL, X, 123), "out", id="evaluate_dataset-out-int"),
    pytest.param(lambda: metrics.format_table("x"), "summary", id="format_table-str"),
    pytest.param(lambda: metrics.ssim(MAPS, MAPS, sigma=-1), "sigma", id="ssim-sigma-negative"),
    pytest.param(lambda: metrics.uniform_noise(X, radius=-1), "radius", id="uniform_noise-radius"),
    pytest.param(lambda tmp: pipeline.saliency_maps(MODEL, X, tmp / "o", device="gpu", progress=False), "device",
                 id="saliency_maps-device"),
    pytest.param(lambda tmp: pipeline.saliency_maps(MODEL, X, tmp / "o", extra="x", progress=False), "extra",
                 id="saliency_maps-extra"),
    pytest.param(lambda tmp: pipeline.saliency_maps(MODEL, X, a_file(tmp), progress=False), "out",
                 id="saliency_maps-out-file"),
    pytest.param(lambda tmp: pipeline.saliency_maps(MODEL, X, a_file(tmp) / "below", progress=False), "out",
                 id="saliency_maps-out-under-file"),
    pytest.param(lambda: pipeline.decode_image(png_bytes(), 0, 3), "size", id="decode-size-0"),
    pytest.param(lambda: pipeline.decode_image(png_bytes(), -2, 3), "size", id="decode-size-negative"),
    pytest.param(lambda: pipeline.decode_image(b"not an image", 8, 3), "data", id="decode-garbage"),
    pytest.param(lambda: pipeline.to_map("x"), "attributions", id="to_map-str"),
    pytest.param(lambda: visualize_class(MODEL, 1, (3, 8, 8), steps=1, lr="0.1"), "lr", id="visualize-lr-str"),
    pytest.param(lambda: extract_features(MODEL, X, "2", device="gpu"), "device", id="extract-device"),
    pytest.param(lambda: max_activating_patches(MODEL, X, "2", device="gpu", progress=False), "device",
                 id="patches-device"),
    pytest.param(lambda: max_activating_patches(MODEL, X, "2", channels=1.5, progress=False), "channels",
                 id="patches-channels-float"),
    pytest.param(lambda: receptive_field(MODEL, "3x16x16", "2"), "input_size", id="receptive-str"),
    pytest.param(lambda: filter_grid(MODEL, "0", padding=-1), "padding", id="filter_grid-padding"),
    pytest.param(lambda: patch_grid(top_activations(), padding=-1), "padding", id="patch_grid-padding"),
]


def png_file(tmp):
    path = tmp / "one.png"
    path.write_bytes(png_bytes(8))
    return path


def a_file(tmp):
    path = tmp / "a_file"
    path.write_text("x")
    return path


def run_case(call, tmp_path):
    return call(tmp_path) if call.__code__.co_argcount and not call.__defaults__ else call()


@pytest.mark.parametrize("call, argument", SILENT_WRONG)
def test_silent_wrong_inputs_are_refused(call, argument, tmp_path):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        run_case(call, tmp_path)


@pytest.mark.parametrize("call, argument", UNCLEAR)
def test_unclear_inputs_are_refused_naming_the_argument(call, argument, tmp_path):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        run_case(call, tmp_path)


@pytest.mark.parametrize("method", list(SYNTHESIS))
def test_synthesis_keeps_the_models_own_error(method):
    """An error raised inside the model is the model's: it is not rewritten as a bad input."""
    model = Broken()
    calls = {
        "adversarial": lambda: adversarial(model, PIXELS, [1, 2], "fgsm"),
        "invert_features": lambda: invert_features(model, PIXELS, "conv", steps=1),
        "deep_dream": lambda: deep_dream(model, PIXELS, "conv", steps=1, octaves=1),
        "synthesize_texture": lambda: synthesize_texture(model, PIXELS, ["conv"], steps=1),
        "style_transfer": lambda: style_transfer(model, PIXELS, PIXELS, "conv", ["conv"], steps=1),
    }
    with pytest.raises(RuntimeError, match="the model's own failure"):
        calls[method]()


# ---------------------------------------------------------------- valid but unusual (item 3)


class Halving(nn.Module):
    """``small_cnn()(x * 0.5)``, written into its input (``inplace=True``) or not."""

    def __init__(self, inplace):
        super().__init__()
        self.net, self.inplace = small_cnn(), inplace

    def forward(self, x):
        return self.net(x.mul_(0.5) if self.inplace else x * 0.5)


def seeded_perturbation(x):
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    return noise, x - noise


IN_PLACE = {
    "deletion_curve": lambda m: metrics.deletion_curve(m, X, "predicted", MAPS, steps=4).scores,
    "insertion_curve": lambda m: metrics.insertion_curve(m, X, "predicted", MAPS, steps=4).scores,
    "infidelity": lambda m: metrics.infidelity(m, X, 1, ATTR, seeded_perturbation, n_perturb_samples=2),
    "invert_features": lambda m: invert_features(m, PIXELS, "net.2", steps=2).images,
    "deep_dream": lambda m: deep_dream(m, PIXELS, "net.2", steps=2, octaves=1, jitter=0).images,
}


@pytest.mark.parametrize("method", list(IN_PLACE))
def test_a_model_writing_into_its_input_gives_the_same_result(method):
    before = (X.clone(), PIXELS.clone())
    plain, in_place = IN_PLACE[method](Halving(False)), IN_PLACE[method](Halving(True))
    torch.testing.assert_close(in_place, plain, rtol=0, atol=1e-6)
    assert torch.equal(X, before[0]) and torch.equal(PIXELS, before[1])


@pytest.mark.parametrize("kwargs, argument", [({"seed": "x"}, "seed"), ({"seed": -1}, "seed"),
                                              ({"generator": "cpu"}, "generator")])
def test_smoothgrad_seed_and_generator_are_checked(kwargs, argument):
    import cnnviz_fast as cv
    from cnnviz_fast import zoo

    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        cv.smoothgrad(zoo.digits_cnn(), torch.rand(1, 1, 32, 32), 1, samples=2, **kwargs)
