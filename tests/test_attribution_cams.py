"""The CAM family (Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, Eigen-CAM, EigenGrad-CAM,
Grad-CAM element-wise, FullGrad, ``cams``) against pytorch-grad-cam and torchcam.

What is compared (float64 models, so that only the anchors' own float32 steps round):
- single layer: pytorch-grad-cam's raw per-layer CAM (``get_cam_image``: before its ReLU,
  min-max scaling and cv2 resize), given our ReLU and our bilinear upsampling, against
  our unnormalised map; relative error <= 1e-5 (norm-wise and per element);
- Eigen-CAM, EigenGrad-CAM and ``eigen_smooth``: the same, with pytorch-grad-cam's
  projection oriented by our sign rule (computed here from its own projection: positive
  correlation with the centred channel sum); LAPACK's sign is arbitrary and differs
  between numpy's OpenBLAS and torch's MKL, so its raw sign cannot be matched;
- several layers and ``aug_smooth``: pytorch-grad-cam's full output (its scaling, cv2
  resize, averaging) against ours, both in [0, 1], to 1e-5;
- FullGrad: pytorch-grad-cam's ``compute_cam_per_layer`` (the sum before its final
  scaling) against ours;
- torchcam: ``XGradCAM`` and ``LayerCAM`` (``normalized=False``) against ours. torchcam's
  ``GradCAMpp`` is another formula (its alpha denominator sums g^3 A over positions, and its
  masked in-place division leaves alpha = g^2), so Grad-CAM++ is checked against
  pytorch-grad-cam only.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import (EigenCAM, EigenGradCAM, FullGrad, GradCAM, GradCAMElementWise, GradCAMPlusPlus,
                              HiResCAM, LayerCAM, XGradCAM)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import swinT_reshape_transform, vit_reshape_transform
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import Neuron, zoo
from cnnviz_fast.registry import get_method

ANCHORS = {"grad_cam": GradCAM, "grad_cam_plus_plus": GradCAMPlusPlus, "xgrad_cam": XGradCAM, "hires_cam": HiResCAM,
           "layer_cam": LayerCAM, "grad_cam_elementwise": GradCAMElementWise, "eigen_cam": EigenCAM,
           "eigen_grad_cam": EigenGradCAM}
FUNCTIONS = {name: getattr(cv, name) for name in ANCHORS}
EIGEN = ("eigen_cam", "eigen_grad_cam")
SMOOTHABLE = ("grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam", "grad_cam_elementwise")
# the CAM whose channel sum is what each eigen projection projects (for the sign rule)


def assert_relative(ours: torch.Tensor, ref: torch.Tensor, what: str = "", tol: float = 1e-5):
    """Relative error <= tol norm-wise and per element (against the largest value)."""
    assert ours.shape == ref.shape, what
    scale = float(ref.abs().max())
    assert scale > 0, f"{what}: a blank reference compares nothing"
    error = max(float((ours - ref).norm() / ref.norm()), float((ours - ref).abs().max()) / scale)
    assert error <= tol, f"{what}: relative error {error:.2e}"


def up(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def anchor_pass(model, layer, x, targets, reshape=None):
    """pytorch-grad-cam's forward and backward for one layer: its ``(activations,
    gradients)`` as numpy arrays (what its ``compute_cam_per_layer`` reads)."""
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        outputs = cam.activations_and_grads(x)
        sum(ClassifierOutputTarget(t)(o) for t, o in zip(targets, outputs)).backward()
        a = cam.activations_and_grads.activations[0].numpy()
        g = cam.activations_and_grads.gradients[0].numpy()
    model.zero_grad(set_to_none=True)
    return a, g


def anchor_raw(name, model, layer, x, a, g, eigen_smooth=False) -> torch.Tensor:
    """pytorch-grad-cam's raw CAM of ``name`` (``get_cam_image``: before its ReLU, min-max
    scaling and cv2 resize) from its own activations and gradients, as float64."""
    with ANCHORS[name](model=model, target_layers=[layer]) as cam:
        raw = cam.get_cam_image(x, layer, None, a, g if cam.uses_gradients else None, eigen_smooth)
    return torch.from_numpy(np.asarray(raw, dtype=np.float64))


def oriented(raw: torch.Tensor) -> torch.Tensor:
    """Our sign rule applied to pytorch-grad-cam's projection: each image's map has its
    largest magnitude positive."""
    flip = raw.flatten(1).amin(1).neg() > raw.flatten(1).amax(1)
    return torch.where(flip[:, None, None], -raw, raw)


def expected(names, model, layer, x, targets, reshape=None, eigen_smooth=False, passed=None):
    """``{name: pytorch-grad-cam's map as ours is defined}``: ReLU(raw) upsampled, the
    eigen projections oriented by our rule; one anchor pass for all names (or ``passed``,
    the ``(activations, gradients)`` of an earlier one)."""
    a, g = passed or anchor_pass(model, layer, x, targets, reshape)
    maps = {}
    for name in names:
        raw = anchor_raw(name, model, layer, x, a, g, eigen_smooth)
        if name in EIGEN or eigen_smooth:
            raw = oriented(raw)
        maps[name] = up(raw.relu(), x.shape[2:])
    return maps


def assert_all_equal(ours: dict, theirs: dict):
    """Each map of ``theirs`` equal to ours; a blank one (all below 1e-10: random weights
    can give an all-negative sum) must be blank in ours too, and one at least is not."""
    blank = [name for name in theirs if float(theirs[name].abs().max()) < 1e-10]
    assert len(blank) < len(theirs)
    for name in theirs:
        if name in blank:
            assert float(ours[name].abs().max()) < 1e-10, name
        else:
            assert_relative(ours[name], theirs[name], name)


@pytest.fixture(scope="module")
def resnet():
    model = zoo.resnet18(num_classes=10, width=16).double()  # ResNet-18 a quarter as wide
    return model, torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits()
    return zoo.digits_cnn().double(), zoo.DIGITS_NORMALIZE(pixels[:3]).double(), labels[:3].tolist()


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_resnet18_equals_pytorch_grad_cam(resnet, layer):
    model, x = resnet
    module = model.get_submodule(layer)
    passed = anchor_pass(model, module, x, [1, 9])
    assert_all_equal(cv.cams(model, x, layer, [1, 9]), expected(ANCHORS, model, module, x, [1, 9], passed=passed))
    # eigen_smooth where pytorch-grad-cam has it
    assert_all_equal(cv.cams(model, x, layer, [1, 9], methods=SMOOTHABLE, eigen_smooth=True),
                     expected(SMOOTHABLE, model, module, x, [1, 9], eigen_smooth=True, passed=passed))


@pytest.mark.parametrize("layer", ["features.pool1", "features.relu5"])
def test_digits_equal_pytorch_grad_cam(digits, layer):
    model, x, labels = digits
    assert_all_equal(cv.cams(model, x, layer, labels), expected(ANCHORS, model, model.get_submodule(layer), x, labels))


def test_in_place_op_after_the_layer(digits):
    """In the functional digits CNN, conv4 and conv5 are followed by in-place ReLUs: the maps
    are those of the module network (whose ReLUs are not in place) all the same.
    (pytorch-grad-cam reads its stored activation after the in-place ReLU changed it.)"""
    model, x, labels = digits
    functional = zoo.digits_cnn(relu="functional").double()
    for layer in ("features.conv4", "features.conv5"):
        ours = cv.cams(functional, x, layer, labels)
        for name, cam in cv.cams(model, x, layer, labels).items():
            torch.testing.assert_close(ours[name], cam, msg=name)
        assert_all_equal(ours, expected(["hires_cam", "layer_cam", "eigen_cam"], model, model.get_submodule(layer), x,
                                        labels))


def test_eigen_sign_rule_and_raw_sign(resnet):
    """The projection is pytorch-grad-cam's up to a sign per image, which LAPACK sets
    (numpy's OpenBLAS and torch's MKL differ); ours has its largest magnitude positive."""
    model, x = resnet
    a, g = anchor_pass(model, model.layer3, x, [0, 0])
    raw = anchor_raw("eigen_cam", model, model.layer3, x, a, g)
    ours = cv.eigen_cam(model, x, "layer3", 0, interpolate="nearest")[:, ::16, ::16]  # one pixel per 4 x 4 cell
    for i in range(len(x)):
        plus, minus = raw[i].relu(), (-raw[i]).relu()
        assert torch.allclose(ours[i], plus, rtol=1e-5, atol=1e-6) or torch.allclose(ours[i], minus, rtol=1e-5,
                                                                                       atol=1e-6)
        assert float(ours[i].max()) == pytest.approx(float(raw[i].abs().max()), rel=1e-6)


def test_several_layers_fused_equal_pytorch_grad_cam(resnet):
    model, x = resnet
    layers = ["layer2", "layer3", "layer4"]
    for name in ("layer_cam", "grad_cam_plus_plus"):
        ours = FUNCTIONS[name](model, x, [model.get_submodule(n) for n in layers], [3, 7])
        with ANCHORS[name](model=model, target_layers=[model.get_submodule(n) for n in layers]) as cam:
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in (3, 7)])
        assert ours.min() >= 0 and ours.max() <= 1
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5, rtol=0)
    model.zero_grad(set_to_none=True)


def test_aug_smooth_equals_pytorch_grad_cam(digits):
    model, x, labels = digits
    for name in ("grad_cam", "layer_cam"):
        ours = FUNCTIONS[name](model, x, "features.relu5", labels, aug_smooth=True)
        with ANCHORS[name](model=model, target_layers=[model.features.relu5]) as cam:
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in labels], aug_smooth=True)
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5, rtol=0)
    model.zero_grad(set_to_none=True)


def _random_batch_norms(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low in ((module.weight, 0.5), (module.bias, -0.5), (module.running_mean, -0.5),
                                (module.running_var, 0.5)):
                tensor.data = low + torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
    return model


def fullgrad_reference(model, x, targets):
    with FullGrad(model=model, target_layers=[]) as cam:
        wanted = [ClassifierOutputTarget(t) for t in targets]
        x = x.clone().requires_grad_(True)
        outputs = cam.activations_and_grads(x)
        sum(t(o) for t, o in zip(wanted, outputs)).backward()
        per_layer = cam.compute_cam_per_layer(x, wanted, False)
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.asarray(per_layer, dtype=np.float64))[:, 0]


def test_full_grad_equals_pytorch_grad_cam(resnet, digits, capsys):
    """On torchvision's ResNet (one block per stage). (pytorch-grad-cam pairs its biases, listed in registration
    order, with its gradients, listed in execution order: wrong for a block whose
    downsample runs first, as in zoo.resnet18, where ours differs by 1.5e-4; ours pairs
    them by layer.)"""
    model, x = resnet
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model = _random_batch_norms(model.double().eval())
    assert_relative(cv.full_grad(model, x, [2, 6]), fullgrad_reference(model, x, [2, 6]))
    model, x, labels = digits  # convolution biases, in-place ReLUs
    assert_relative(cv.full_grad(model, x, labels), fullgrad_reference(model, x, labels))
    ours = cv.full_grad(model, x, labels, aug_smooth=True)
    with FullGrad(model=model, target_layers=[]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in labels], aug_smooth=True)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5, rtol=0)
    model.zero_grad(set_to_none=True)
    capsys.readouterr()  # pytorch-grad-cam prints that FullGrad ignores target_layers


def test_torchcam_xgrad_cam_and_layer_cam(resnet):
    from torchcam.methods import LayerCAM as TorchcamLayerCAM
    from torchcam.methods import XGradCAM as TorchcamXGradCAM
    model, x = resnet
    for name, cls in (("xgrad_cam", TorchcamXGradCAM), ("layer_cam", TorchcamLayerCAM)):
        with cls(model, "layer3", input_shape=(3, 64, 64)) as extractor:
            (theirs,) = extractor(class_idx=[4, 8], scores=model(x), normalized=False)
        assert_relative(FUNCTIONS[name](model, x, "layer3", [4, 8]), up(theirs.detach(), x.shape[2:]), name)
    model.zero_grad(set_to_none=True)


def test_cams_one_pass_equals_each_method(resnet):
    model, x = resnet
    model = zoo.resnet18(num_classes=10, width=16).double()
    forwards, backwards = [], []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    model.fc.register_full_backward_hook(lambda *a: backwards.append(1))
    maps, output = cv.cams(model, x, "layer4", "predicted", return_output=True)
    assert (len(forwards), len(backwards)) == (1, 1)
    assert list(maps) == list(cv.CAM_METHODS)
    torch.testing.assert_close(output, model(x))
    for name, cam in maps.items():
        torch.testing.assert_close(cam, FUNCTIONS[name](model, x, "layer4", output.argmax(1)), rtol=0, atol=0)
    forwards.clear()
    only_eigen = cv.cams(model, x, model.layer4, 0, methods=["eigen_cam"])
    assert len(forwards) == 1 and list(only_eigen) == ["eigen_cam"]
    assert all(p.grad is None for p in model.parameters())


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).double()


def tiny_swin():
    torch.manual_seed(0)
    return SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                           num_classes=10).double()


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_token_layers_equal_pytorch_grad_cam_with_reshape_transform(which):
    model = tiny_vit() if which == "vit" else tiny_swin()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if which == "vit":  # [N, 1 + 8 * 8, C]: class token skipped
        layer, reshape = "blocks.1.norm1", lambda t: vit_reshape_transform(t, 8, 8)
    else:  # timm's Swin stages are channels-last [N, 8, 8, C]
        layer, reshape = "layers.1.blocks.1.norm1", lambda t: swinT_reshape_transform(t.flatten(1, 2), 8, 8)
    maps = cv.cams(model, x, layer, [3, 8])
    assert_all_equal(maps, expected(ANCHORS, model, model.get_submodule(layer), x, [3, 8], reshape=reshape))
    # an explicit reshape gives the same
    torch.testing.assert_close(cv.hires_cam(model, x, layer, [3, 8], reshape=reshape), maps["hires_cam"])


def test_token_grid_rule():
    from cnnviz_fast.attribution._cam_engine import token_grid
    assert token_grid(197, (224, 224)) == (1, 14, 14)
    assert token_grid(196, (224, 224)) == (0, 14, 14)
    assert token_grid(201, (224, 224)) == (5, 14, 14)     # class + 4 register tokens
    assert token_grid(281, (224, 320)) == (1, 14, 20)     # a wide image
    assert token_grid(8, (64, 64)) is None and token_grid(3, (64, 64)) is None


def tiny_convnext():
    from timm.models.convnext import ConvNeXt
    torch.manual_seed(0)  # conv_mlp=False: each block's norm and MLP run channels-last [N, h, w, C]
    return ConvNeXt(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), conv_mlp=False, num_classes=10).double()


def tiny_regnet():
    from timm.models.regnet import RegNet, RegNetCfg
    torch.manual_seed(0)
    return RegNet(RegNetCfg(depth=8, w0=16, wa=12.0, wm=2.0, group_size=8, stem_width=16), num_classes=10).double()


@pytest.mark.parametrize("arch, layer", [("convnext", "stages.2"), ("convnext", "stages.2.blocks.1.norm"),
                                         ("regnet", "s4"), ("regnet", "s3.b1")])
def test_modern_cnns(arch, layer):
    """timm ConvNeXt (its block norms are channels-last) and RegNet: every CAM runs and
    equals pytorch-grad-cam (given the channels-last permutation as its reshape_transform)."""
    model = (tiny_convnext() if arch == "convnext" else tiny_regnet()).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    maps = cv.cams(model, x, layer, [1, 2])
    assert all(m.shape == (2, 64, 64) and torch.isfinite(m).all() for m in maps.values())
    reshape = (lambda t: t.permute(0, 3, 1, 2)) if layer.endswith("norm") else None
    assert_all_equal(maps, expected(ANCHORS, model, model.get_submodule(layer), x, [1, 2], reshape=reshape))


def test_target_kinds_and_return_output(digits):
    model, x, labels = digits
    cam, output = cv.layer_cam(model, x, "features.relu4", "predicted", return_output=True)
    torch.testing.assert_close(cam, cv.layer_cam(model, x, "features.relu4", output.argmax(1)))
    neuron = Neuron("classifier.fc1", 5)
    forward = lambda out: out[:, 3]  # noqa: E731
    torch.testing.assert_close(cv.hires_cam(model, x, "features.relu4", forward),
                               cv.hires_cam(model, x, "features.relu4", 3))
    assert cv.grad_cam_plus_plus(model, x, "features.relu4", neuron).shape == (3, 32, 32)
    smooth, output = cv.cams(model, x, "features.relu5", "predicted", methods=["grad_cam"], aug_smooth=True,
                             return_output=True)
    torch.testing.assert_close(output, model(x))
    torch.testing.assert_close(smooth["grad_cam"], cv.grad_cam(model, x, "features.relu5", output.argmax(1),
                                                               aug_smooth=True))


def test_refusals_name_the_argument(digits):
    model, x, labels = digits
    with pytest.raises(ValueError, match="layer 'classifier.fc1' must output a feature map"):
        cv.hires_cam(model, x, "classifier.fc1", labels)
    with pytest.raises(ValueError, match="layer 'classifier.fc1' must output a feature map"):
        cv.cams(model, x, ["features.relu5", "classifier.fc1"], labels)

    class Tokens(nn.Module):  # [N, 3, 16]: three tokens form no grid
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(1, 16, 16, stride=16)
            self.tokens = nn.Identity()
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            t = self.tokens(self.body(x).flatten(2).transpose(1, 2)[:, :3])
            return self.head(t.mean(1))

    with pytest.raises(ValueError, match="layer 'tokens' outputs .* tokens do not form a grid"):
        cv.layer_cam(Tokens().double(), x, "tokens", 1)
    with pytest.raises(ValueError, match="methods: unknown CAM 'score_cam'"):
        cv.cams(model, x, "features.relu5", labels, methods=["grad_cam", "score_cam"])
    with pytest.raises(ValueError, match="methods must be a non-empty list"):
        cv.cams(model, x, "features.relu5", labels, methods=[])
    with pytest.raises(ValueError, match="eigen_smooth must be True or False"):
        cv.layer_cam(model, x, "features.relu5", labels, eigen_smooth="yes")
    with pytest.raises(ValueError, match="aug_smooth must be True or False"):
        cv.full_grad(model, x, labels, aug_smooth=1)
    with pytest.raises(ValueError, match="reshape must be a callable"):
        cv.xgrad_cam(model, x, "features.relu5", labels, reshape=(4, 4))
    with pytest.raises(ValueError, match="reshape must map layer 'features.relu5'"):
        cv.xgrad_cam(model, x, "features.relu5", labels, reshape=lambda t: t.flatten(1))
    with pytest.raises(ValueError, match="reshape_transform: .*cnnviz_fast calls it reshape="):
        cv.hires_cam(model, x, "features.relu5", labels, reshape_transform=lambda t: t)
    with pytest.raises(ValueError, match="layer: got an empty list"):
        cv.layer_cam(model, x, [], labels)
    with pytest.raises(ValueError, match="interpolate"):
        cv.eigen_cam(model, x, "features.relu5", labels, interpolate="cubic")
    with pytest.raises(ValueError, match="target_layers: .*cnnviz_fast calls it layer="):
        cv.layer_cam(model, x, target_layers=[model.features.relu5], target=labels)
    with pytest.raises(ValueError, match="did not run before the forward pass stopped"):
        cv.hires_cam(model, x, "features.relu5", Neuron("features.conv2", 0))


def test_model_left_as_found(digits):
    model, x, labels = digits
    model = zoo.digits_cnn(relu="functional").double().train()
    model.features.conv1.weight.requires_grad_(False)
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    for call in (lambda: cv.cams(model, x, "features.relu5", labels),
                 lambda: cv.full_grad(model, x, labels, aug_smooth=True),
                 lambda: cv.layer_cam(model, x, ["features.pool1", "features.relu5"], labels)):
        with torch.no_grad():
            call()
        assert model.training and hooks() == 0
        assert all(p.grad is None for p in model.parameters())
        assert not model.features.conv1.weight.requires_grad and model.features.conv2.weight.requires_grad
    with pytest.raises(ValueError):
        cv.cams(model, x, ["features.pool1", "classifier.fc1"], labels)  # raises inside the forward pass
    assert model.training and hooks() == 0


def test_declared_in_the_registry(digits):
    model, x, labels = digits
    for name in list(ANCHORS) + ["full_grad"]:
        method = get_method(name)
        assert method.family == "cam" and method.map_rule == "as_is"
        assert method.needs_layer == (name != "full_grad")
        maps, output = method.maps(model, x, "predicted", "features.relu5" if method.needs_layer else None)
        assert maps.shape == (3, 32, 32) and output.shape == (3, 10)


def test_large_cpu_batches_run_channels_last_with_the_same_maps(resnet, monkeypatch):
    """Batches of at least layout.MIN_PIXELS pixels run channels-last (core.layout; lowered
    here so that a small batch does); forced contiguous, the maps agree."""
    from cnnviz_fast.core import layout
    model, x = resnet
    seen = []
    handle = model.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    monkeypatch.setattr(layout, "MIN_PIXELS", 1)
    fast = cv.cams(model, x, "layer3", 3, methods=["layer_cam", "eigen_cam"]), cv.full_grad(model, x, 3)
    monkeypatch.setattr(layout, "MIN_PIXELS", 10 ** 9)
    plain = cv.cams(model, x, "layer3", 3, methods=["layer_cam", "eigen_cam"]), cv.full_grad(model, x, 3)
    handle.remove()
    assert seen == [False, False, True, True]  # channels-last for both methods, then contiguous
    for name in ("layer_cam", "eigen_cam"):
        assert_relative(fast[0][name], plain[0][name], name, tol=1e-9)
    assert_relative(fast[1], plain[1], "full_grad", tol=1e-9)
