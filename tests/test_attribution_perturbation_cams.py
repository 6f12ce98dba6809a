"""Score-CAM, Ablation-CAM and RISE: against pytorch-grad-cam's ScoreCAM / AblationCAM and
the paper's RISE algorithm on the same seed-derived masks; the rise_mask / rise_accumulate
kernels against their reference and scikit-image's resize; bounded memory; bad input."""
import importlib

import numpy as np
import pytest
import torch
from pytorch_grad_cam import AblationCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage.transform import resize
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import cnnviz_fast as cv
import cnnviz_fast.ops as ops
from cnnviz_fast import zoo
from cnnviz_fast.ops import reference as ref
from cnnviz_fast.registry import get_method
from op_cases import DTYPES, LAYOUTS, layout, needs_ext

ablation_module = importlib.import_module("cnnviz_fast.attribution.perturbation.ablation_cam")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class TinyCNN(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, classes))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return TinyCNN().eval(), torch.randn(2, 3, 15, 13, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits()
    return zoo.digits_cnn(), zoo.DIGITS_NORMALIZE(pixels[:1]), labels[:1].tolist()


@pytest.fixture(scope="module")
def resnet():
    # ResNet-18's topology at 1/8 width (layer4: 64 channels): the anchors run one full pass per channel
    return zoo.resnet18(num_classes=10, width=8), torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def normalised(cam: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's final per-image min-max scaling."""
    cam = cam.double().numpy()
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


def anchor(cls, model, x, layer, targets):
    with cls(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        if cls is ScoreCAM:
            cam.batch_size = 64
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def assert_matches_anchor(ours, theirs):
    a = normalised(ours)
    assert np.corrcoef(a.ravel(), theirs.ravel())[0, 1] >= 0.9999
    np.testing.assert_allclose(a, theirs, atol=1e-4)


# --------------------------------------------------------------------------- Score-CAM / Ablation-CAM
@pytest.mark.parametrize("method,cls", [(cv.score_cam, ScoreCAM), (cv.ablation_cam, AblationCAM)])
def test_cams_match_pytorch_grad_cam(tiny, digits, method, cls):
    model, x = tiny
    ours = method(model, x, "features.4", [0, 3])
    assert ours.shape == (2, 15, 13) and (ours >= 0).all() and ours.amax() > 0
    assert_matches_anchor(ours, anchor(cls, model, x, "features.4", [0, 3]))
    model, x, labels = digits
    assert_matches_anchor(method(model, x, "features.relu5", labels), anchor(cls, model, x, "features.relu5", labels))


@pytest.mark.parametrize("method,cls,layer", [(cv.score_cam, ScoreCAM, "layer3"),
                                              (cv.ablation_cam, AblationCAM, "layer4")])
def test_cams_match_pytorch_grad_cam_on_resnet18(resnet, method, cls, layer):
    model, x = resnet
    assert_matches_anchor(method(model, x, model.get_submodule(layer), 7), anchor(cls, model, x, layer, [7]))


def test_score_cam_weights_by_hand(tiny):
    # softmax of the masked scores, masks = min-max normalised align_corners upsampling
    model, x = tiny
    x = x[:1]
    A = {}
    handle = model.features[4].register_forward_hook(lambda m, a, o: A.setdefault("a", o.clone()))
    model(x)
    handle.remove()
    a = A["a"]
    up = nn.functional.interpolate(a, size=x.shape[2:], mode="bilinear", align_corners=True)[0]
    low, high = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    masked = x * ((up - low) / (high - low + 1e-8))[:, None]
    w = model(masked)[:, 2].softmax(0)
    cam = nn.functional.relu((w[None, :, None, None] * a).sum(1, keepdim=True))
    expected = nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(cv.score_cam(model, x, "features.4", 2, batch_size=5), expected)


@pytest.mark.parametrize("layer", ["layer4", "layer3.1.bn2"])
def test_ablation_cam_suffix_equals_full_passes(resnet, monkeypatch, layer):
    # the traced suffix (with the residual branch's earlier values bound) gives the scores of
    # full forward passes that replace the layer's output, also before a block's ReLU
    model, x = resnet
    x = torch.cat([x, x.flip(3)])[:, :, :32]
    assert ablation_module._Suffix.build(model, layer, x, *_clean(model, x, layer), [1, 2]) is not None
    fast = cv.ablation_cam(model, x, layer, [1, 2])
    monkeypatch.setattr(ablation_module._Suffix, "build", classmethod(lambda *args: None))
    torch.testing.assert_close(cv.ablation_cam(model, x, layer, [1, 2], batch_size=48), fast, rtol=1e-4, atol=1e-5)


def _clean(model, x, layer):
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: store.setdefault("a", o.clone()))
    out = model(x)
    handle.remove()
    return store["a"], out[[0, 1], [1, 2]]


def test_predicted_target_and_return_output(tiny):
    model, x = tiny
    for method in (cv.score_cam, cv.ablation_cam):
        cam, output = method(model, x, "features.3", "predicted", return_output=True)
        torch.testing.assert_close(output, model(x))
        torch.testing.assert_close(cam, method(model, x, "features.3", output.argmax(1).tolist()))


# --------------------------------------------------------------------------- RISE
def paper_rise(model, x, target, masks, grid, p, seed, batch=16):
    """The paper's algorithm on materialised masks: saliency = scores^T masks / (N p)."""
    H, W = x.shape[2:]
    m = ref.rise_masks(seed, grid, p, H, W, 0, masks, x.dtype)
    out = []
    for n in range(len(x)):
        scores = torch.cat([model(x[n] * m[i:i + batch, None])[:, target[n]] for i in range(0, masks, batch)])
        out.append((scores @ m.flatten(1)).view(H, W) / masks / p)
    return torch.stack(out)


def test_rise_equals_the_paper_algorithm(tiny, monkeypatch):
    model, x = tiny
    model = TinyCNN().double().eval()
    x = x.double()
    expected = paper_rise(model, x, [1, 4], 70, (3, 4), 0.4, 11)
    ours = cv.rise(model, x, [1, 4], masks=70, grid=(3, 4), p=0.4, seed=11, batch_size=16)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cv.rise(model, x, [1, 4], masks=70, grid=(3, 4), p=0.4, seed=11, batch_size=70), ours,
                               rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(ops, "_USE_EXT", False)  # the reference path (no compiled extension)
    torch.testing.assert_close(cv.rise(model, x, [1, 4], masks=70, grid=(3, 4), p=0.4, seed=11), ours,
                               rtol=1e-10, atol=1e-12)


def test_rise_seed_predicted_and_registry(tiny):
    model, x = tiny
    torch.manual_seed(5)
    a = cv.rise(model, x, "predicted", masks=40)
    torch.manual_seed(5)
    b, output = cv.rise(model, x, "predicted", masks=40, return_output=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, cv.rise(model, x, output.argmax(1), masks=40, seed=torch.manual_seed(5) and
                                          int(torch.randint(0, 2**62, ()).item())))
    maps, out = get_method("rise").maps(model, x, "predicted", masks=30, seed=1)
    assert maps.shape == (2, 15, 13)


# --------------------------------------------------------------------------- rise_mask / rise_accumulate ops
GEOMETRIES = [((2, 3, 15, 13), (7, 7), 0.5), ((1, 2, 9, 32), (2, 5), 0.1), ((2, 1, 5, 4), (1, 2), 0.9),
              ((1, 3, 31, 31), (4, 3), 0.5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("shape,grid,p", GEOMETRIES)
def test_rise_mask_matches_reference(device, dtype, kind, shape, grid, p):
    images = layout(torch.randn(shape, device=device).to(dtype), kind)
    for seed, first, count in ((0, 0, 5), (-3, 17, 4), (2**63 - 1, 2**31 - 3, 3), (5, 0, 0)):
        out = ops.rise_mask(images, seed, grid, p, first, count)
        assert out.shape == (shape[0], count, *shape[1:]) and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, ref.rise_mask(images, seed, grid, p, first, count), rtol=0, atol=0)


@pytest.mark.parametrize("shape,grid,p", GEOMETRIES)
def test_rise_masks_are_the_papers(shape, grid, p):
    # the paper's masks: skimage resize(order=1, mode="reflect") of the grid, cropped at the shift
    H, W = shape[2:]
    cells, dy, dx = ref.rise_grids_and_shifts(9, grid, p, H, W, 0, 12)
    cell_h, cell_w = -(-H // grid[0]), -(-W // grid[1])
    masks = ops.rise_masks(H, W, 9, grid, p, 0, 12, dtype=torch.float64)
    for m in range(12):
        up = resize(cells[m].double().numpy(), ((grid[0] + 1) * cell_h, (grid[1] + 1) * cell_w), order=1,
                    mode="reflect", anti_aliasing=False)
        np.testing.assert_allclose(masks[m].numpy(), up[dy[m]:dy[m] + H, dx[m]:dx[m] + W], rtol=0, atol=1e-12)
    assert (dy < cell_h).all() and (dx < cell_w).all()


def test_rise_masks_draws():
    masks = ops.rise_masks(32, 32, 4, 8, 0.3, 0, 600)
    cells, dy, dx = ref.rise_grids_and_shifts(4, 8, 0.3, 32, 32, 0, 600)
    assert abs(cells.double().mean().item() - 0.3) < 0.02  # 38400 cells: 9 standard deviations
    assert set(dy.tolist()) == set(range(4)) and set(dx.tolist()) == set(range(4))
    torch.testing.assert_close(ops.rise_masks(32, 32, 4, 8, 0.3, 100, 7), masks[100:107], rtol=0, atol=0)
    assert not torch.equal(ops.rise_masks(32, 32, 5, 8, 0.3, 0, 3), masks[:3])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rise_accumulate_matches_reference(device, dtype):
    scores = torch.randn(3, 150, device=device).to(dtype)
    out = ops.rise_accumulate(scores, 19, 23, 7, (5, 6), 0.5, first=3)
    assert out.shape == (3, 19, 23) and out.dtype == dtype
    masks = ref.rise_masks(7, (5, 6), 0.5, 19, 23, 3, 150, torch.float64, device)
    expected = (scores.double() @ masks.flatten(1)).view(3, 19, 23)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(out, ref.rise_accumulate(scores, 19, 23, 7, (5, 6), 0.5, 3), rtol=tol, atol=tol)


def test_rise_ops_gradients():
    images = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ops.rise_mask(x, 3, (2, 3), 0.5, 1, 3), (images,))
    scores = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda s: ops.rise_accumulate(s, 6, 5, 3, (2, 3), 0.5, 1), (scores,))


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_rise(device, requires_grad):
    images = torch.randn(2, 3, 7, 5, device=device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.cnnviz.rise_mask.default, (images, 3, [2, 3], 0.5, 1, 4))
    scores = torch.randn(2, 6, device=device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.cnnviz.rise_accumulate.default, (scores, 7, 5, 3, [2, 3], 0.5, 2))


# --------------------------------------------------------------------------- memory, model state, bad input
class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.nbytes)
        return out


def test_memory_bounded():
    # the largest tensor any operator makes stays within a small memory budget, far below
    # channels x C x H x W (Score-CAM's masked inputs at once) and masks x H x W (RISE's masks)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 5)).eval()
    x = torch.randn(1, 3, 96, 96)
    budget = 2**20
    assert budget * 6 < 64 * x.nbytes and budget * 10 < 400 * 96 * 96 * 4
    for run in (lambda: cv.score_cam(model, x, "1", 2, memory_budget=budget),
                lambda: cv.ablation_cam(model, x, "1", 2, memory_budget=budget),
                lambda: cv.rise(model, x, 2, masks=400, seed=0, memory_budget=budget)):
        with LargestTensor() as largest:
            run()
        assert 0 < largest.nbytes <= budget


def test_model_left_as_found(digits):
    model, x, labels = digits
    model.train()
    model.features.conv1.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for method in (cv.score_cam, cv.ablation_cam):
            method(model, x, "features.relu5", labels, batch_size=64)
        cv.rise(model, x, labels, masks=20, seed=0)
        assert model.training and not model.features.conv1.weight.requires_grad
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        assert not any(m._forward_hooks for m in model.modules())
    finally:
        model.eval()
        model.features.conv1.weight.requires_grad_(True)


def test_bad_input(tiny):
    model, x = tiny
    cases = [
        (lambda: cv.rise(model, x, 1, masks=0), "masks"),
        (lambda: cv.rise(model, x, 1, masks=10, p=0.0), "p"),
        (lambda: cv.rise(model, x, 1, masks=10, p=1.5), "p"),
        (lambda: cv.rise(model, x, 1, masks=10, grid=16), "grid"),
        (lambda: cv.rise(model, x, 1, masks=10, seed=1.5), "seed"),
        (lambda: cv.rise(model, x, 1, masks=10, batch_size=0), "batch_size"),
        (lambda: cv.score_cam(model, x, "features.9", 1), "layer"),
        (lambda: cv.ablation_cam(model, x, "head.2", 1), "layer"),
        (lambda: cv.score_cam(model, x, nn.Conv2d(1, 1, 1), 1), "layer"),
        (lambda: cv.ablation_cam(model, x, "features.4", 1, memory_budget=0), "memory_budget"),
        (lambda: cv.score_cam(model, x[0], "features.4", 1), "inputs"),
        (lambda: cv.ablation_cam(model, x, "features.4", [1]), "target"),
        (lambda: cv.score_cam(model, x, "features.4", 1, target_layers=[model.features]), "target_layers"),
        (lambda: ops.rise_mask(x, 0, 3, 1.0), "p"),
        (lambda: ops.rise_mask(x, 2**64, 3, 0.5), "seed"),
        (lambda: ops.rise_accumulate(torch.randn(2, 3), 0, 4, 0), "H"),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            call()
