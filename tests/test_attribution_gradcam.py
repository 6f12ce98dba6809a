"""grad_cam and guided_grad_cam against Captum (LayerGradCam + LayerAttribution.interpolate,
GuidedGradCam) and pytorch-grad-cam (GradCAM, compared after its per-image min-max
normalisation, applied to our unnormalised output)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import cnnviz_fast as cv
from cnnviz_fast import Neuron, pictures, zoo
from anchors import neuron_forward

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")

OUT = Path(__file__).resolve().parent.parent / "test-output" / "attribution"


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits()
    return zoo.digits_cnn(), zoo.digits_cnn(relu="functional"), zoo.DIGITS_NORMALIZE(pixels[:4]), labels[:4]


@pytest.fixture(scope="module")
def resnet():
    return zoo.resnet18(num_classes=10), torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))


def captum_grad_cam(forward, layer_module, x, target=None, mode="bilinear"):
    cam = LayerGradCam(forward, layer_module).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), mode)[:, 0]


@pytest.mark.parametrize("layer", ["features.conv5", "features.relu5", "features.pool3"])
def test_digits_matches_captum(digits, layer):
    model, functional, x, labels = digits
    ours = cv.grad_cam(model, x, layer, labels)
    ref = captum_grad_cam(model, model.get_submodule(layer), x, labels.tolist())
    assert ours.shape == (len(x), 32, 32) and (ours >= 0).all()
    torch.testing.assert_close(ours, ref)
    if layer != "features.conv5":  # (conv5 before its ReLU gives all-negative sums: blank)
        assert ours.amax(dim=(1, 2)).min() > 0
    # the functional-ReLU model gives the same (there conv5 is followed by an in-place ReLU)
    torch.testing.assert_close(cv.grad_cam(functional, x, layer, labels), ours)


@pytest.mark.parametrize("layer", ["layer4", "layer3.1.conv2"])
def test_resnet18_matches_captum(resnet, layer):
    model, x = resnet
    ours = cv.grad_cam(model, x, layer, [1, 4, 9])
    torch.testing.assert_close(ours, captum_grad_cam(model, model.get_submodule(layer), x, [1, 4, 9]))


def test_vgg11_matches_captum():
    model = zoo.vgg11(num_classes=10, hidden=256)
    x = torch.randn(2, 3, 64, 64)
    # features.16 is a conv followed by ReLU(inplace=True)
    for layer in ("features.16", "features.17"):
        torch.testing.assert_close(cv.grad_cam(model, x, layer, 3),
                                   captum_grad_cam(model, model.get_submodule(layer), x, 3))


def normalised_like_pytorch_grad_cam(cam: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam returns min-max scaled maps: img -= min; img /= 1e-7 + max."""
    cam = cam.numpy()
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


@pytest.mark.parametrize("which", ["resnet", "digits"])
def test_matches_pytorch_grad_cam_after_its_normalisation(resnet, digits, which):
    if which == "resnet":
        model, x = resnet
        layer, targets = "layer4", [0, 5, 6]
    else:
        model, _, x, labels = digits
        layer, targets = "features.conv5", labels.tolist()
    ours = cv.grad_cam(model, x, layer, targets)
    with GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    np.testing.assert_allclose(normalised_like_pytorch_grad_cam(ours), theirs, atol=2e-5)


def test_neuron_deeper_than_layer_and_at_layer(digits):
    model, functional, x, _ = digits
    deeper = Neuron("classifier.fc1", 17)
    ref = captum_grad_cam(neuron_forward(model, deeper), model.features.conv4, x)
    torch.testing.assert_close(cv.grad_cam(model, x, "features.conv4", deeper), ref)
    torch.testing.assert_close(cv.grad_cam(functional, x, "features.conv4", deeper), ref)
    at_layer = Neuron("features.conv4", 6, 5, 9)
    ref = captum_grad_cam(neuron_forward(model, at_layer), model.features.conv4, x)
    torch.testing.assert_close(cv.grad_cam(model, x, "features.conv4", at_layer), ref)


def test_neuron_before_layer_and_non_spatial_layer_raise(digits):
    model, _, x, labels = digits
    with pytest.raises(ValueError, match="layer .features.conv5. did not run before the forward pass stopped"):
        cv.grad_cam(model, x, "features.conv5", Neuron("features.conv2", 0))
    with pytest.raises(ValueError, match="layer 'classifier.fc1' must output a feature map"):
        cv.grad_cam(model, x, "classifier.fc1", labels)
    with pytest.raises(ValueError, match="layer 'features.conv9'"):
        cv.grad_cam(model, x, "features.conv9", labels)
    with pytest.raises(ValueError, match="interpolate"):
        cv.grad_cam(model, x, "features.conv5", labels, interpolate="cubic")


def test_backward_stops_at_layer(digits):
    """Nothing below the layer is differentiated; no parameter or input gradients."""
    model, _, x, labels = digits
    model = zoo.digits_cnn()
    called = []
    model.features.conv2.register_full_backward_hook(lambda *a: called.append("conv2"))
    model.classifier.fc1.register_full_backward_hook(lambda *a: called.append("fc1"))
    x = x.clone().requires_grad_(True)
    cam = cv.grad_cam(model, x, "features.conv4", labels)
    assert called == ["fc1"]
    assert not cam.requires_grad and x.grad is None
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_guided_grad_cam_matches_captum(digits, mode):
    model, functional, x, labels = digits
    ref = GuidedGradCam(model, model.features.conv5).attribute(x, target=labels.tolist(), interpolate_mode=mode)
    ours = cv.guided_grad_cam(functional, x, "features.conv5", labels, interpolate=mode)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(cv.guided_grad_cam(model, x, "features.conv5", labels, interpolate=mode), ref)


def test_guided_grad_cam_resnet(resnet):
    model, x = resnet
    ref = GuidedGradCam(model, model.layer4).attribute(x, target=[1, 2, 3], interpolate_mode="bilinear")
    torch.testing.assert_close(cv.guided_grad_cam(model, x, "layer4", [1, 2, 3]), ref)


def test_pictures_of_grad_cam_on_digits(digits):
    model, functional, x, labels = digits
    pixels = zoo.DIGITS_NORMALIZE.inverse(x)
    tiles = []
    for layer in ("features.relu5", "features.pool3"):
        cams = cv.grad_cam(functional, x, layer, labels)
        tiles += [pictures.heatmap_overlay(p, c) for p, c in zip(pixels, cams)]
    guided = pictures.scale_to_unit(cv.guided_grad_cam(functional, x, "features.relu5", labels).abs())
    tiles += [g.expand(3, -1, -1) for g in guided]
    path = pictures.save_png(pictures.image_grid(torch.stack(tiles), nrow=len(x)), OUT / "grad_cam_digits.png",
                             upscale=4)
    assert path.exists()
    # the class evidence lies on the digit: more Grad-CAM mass on stroke pixels than their share
    cams = cv.grad_cam(model, x, "features.relu5", labels)
    stroke = (pixels[:, 0] > 0.3).float()
    assert ((cams * stroke).sum((1, 2)) / cams.sum((1, 2))).mean() > stroke.mean((1, 2)).mean()
