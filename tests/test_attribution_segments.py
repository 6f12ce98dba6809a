"""Segment-based perturbation methods against Captum: feature ablation, Shapley value
sampling, KernelSHAP, LIME; segments (grid, SLIC, user maps) and their checks."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from captum.attr import FeatureAblation, KernelShap, Lime, ShapleyValueSampling

from cnnviz_fast.attribution.perturbation import (
    draw_permutations, feature_ablation, gaussian_blur, grid_segments, kernel_shap, lime, parse_segments,
    shapley_sampling, slic_segments,
)
from cnnviz_fast.registry import get_method


def small_cnn(double=True):
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))
    with torch.no_grad():
        model[4].running_mean.uniform_(-0.2, 0.2)
    model.eval()
    return model.double() if double else model


def smooth_images(n=2, size=16, dtype=torch.float64):
    """Images with blobs (SLIC needs structure; pure noise is one segment)."""
    x = torch.rand(n, 3, size // 4, size // 4, dtype=dtype)
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 4 - 2


def captum_mask(segments):
    return segments[:, None] if segments.dim() == 3 else segments[None, None]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum's batch / mask advice
        yield


# --------------------------------------------------------------------------- segments


def test_grid_and_parse():
    g = grid_segments(5, 7, 2)
    assert g.shape == (5, 7) and g.unique().tolist() == [0, 1, 2, 3]
    assert g[0, 0] == 0 and g[4, 6] == 3 and g[0, 6] == 1
    assert parse_segments("slic:50") == ("slic", 50) and parse_segments("grid") == ("grid", 8)
    for bad in ("slic:0", "grid:x", "felzenszwalb:3"):
        with pytest.raises(ValueError, match="segments"):
            parse_segments(bad)


def test_slic_as_scikit_image():
    from skimage.segmentation import slic
    pixels = (smooth_images(2, 32) + 2) / 4
    ours = slic_segments(pixels, 20)
    for n in range(2):
        ref = slic(pixels[n].permute(1, 2, 0).numpy(), n_segments=20, start_label=0)
        assert torch.equal(ours[n], torch.from_numpy(ref).long())
    assert ours.max() > 3


def test_blur_is_a_normalised_gaussian():
    x = torch.rand(1, 3, 20, 20, dtype=torch.float64)
    blurred = gaussian_blur(x, 2.0)
    assert blurred.shape == x.shape
    assert torch.allclose(gaussian_blur(torch.full_like(x, 0.3), 2.0), torch.full_like(x, 0.3))
    assert blurred.std() < x.std()


@pytest.mark.parametrize("segments, match", [
    (torch.zeros(3, 16, 16, dtype=torch.long), "shape"),           # N = 3 for 2 images
    (torch.zeros(16, 15, dtype=torch.long), "shape"),
    (torch.zeros(2, 16, 16), "integer"),                            # float ids
    (torch.full((16, 16), -1), ">= 0"),                             # negative ids
    (torch.where(torch.arange(16) < 8, 0, 2).expand(16, 16), "empty"),  # id 1 has no pixel
    ("slic:-3", "segments"),
    (3, "segments"),
])
def test_bad_segments_refused(segments, match):
    model, x = small_cnn(), smooth_images()
    for method in (feature_ablation, shapley_sampling, kernel_shap, lime):
        with pytest.raises(ValueError, match=match) as error:
            method(model, x, 1, segments=segments)
        assert "segments" in str(error.value)


def test_bad_arguments_refused():
    model, x = small_cnn(), smooth_images()
    seg = grid_segments(16, 16, 2)
    with pytest.raises(ValueError, match="inputs"):
        feature_ablation(model, x[:0], 1, segments=seg)
    with pytest.raises(ValueError, match="baseline"):
        feature_ablation(model, x, 1, segments=seg, baseline="fog")
    with pytest.raises(ValueError, match="baseline"):
        feature_ablation(model, x, 1, segments=seg, baseline=torch.zeros(5, 16, 16))
    with pytest.raises(ValueError, match="permutations"):
        shapley_sampling(model, x, 1, segments=seg, permutations=[[0, 1, 2, 2]])
    with pytest.raises(ValueError, match="samples"):
        shapley_sampling(model, x, 1, segments=seg, samples=0)
    with pytest.raises(ValueError, match="coalitions"):
        kernel_shap(model, x, 1, segments=seg, coalitions=torch.ones(5, 3))
    with pytest.raises(ValueError, match="regression"):
        lime(model, x, 1, segments=seg, regression="svm")
    with pytest.raises(ValueError, match="segments"):  # Captum's name answered with ours
        feature_ablation(model, x, 1, feature_mask=seg)


# --------------------------------------------------------------------------- against Captum


@pytest.mark.parametrize("baseline", [0.0, 0.5, "per-channel", "blur"])
def test_feature_ablation_equals_captum(baseline):
    model, x = small_cnn(), smooth_images()
    seg = torch.stack([grid_segments(16, 16, 3), grid_segments(16, 16, (2, 5))])
    base = {"per-channel": torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64).view(1, 3, 1, 1),
            "blur": gaussian_blur(x)}.get(baseline, baseline)
    ours = feature_ablation(model, x, [1, 3], segments=seg, baseline=baseline if baseline == "blur" else base,
                            batch_size=4)
    ref = FeatureAblation(model).attribute(x, target=[1, 3], baselines=base, feature_mask=captum_mask(seg))
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_feature_ablation_slic_resnet18_and_batch_size():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = smooth_images(1, 32, torch.float32)
    seg = slic_segments((x + 2) / 4, 12)
    assert seg.max() >= 3
    ref = FeatureAblation(model).attribute(x, target=4, feature_mask=captum_mask(seg), perturbations_per_eval=8)
    for batch_size in (None, 3):
        ours = feature_ablation(model, x, 4, segments=seg, batch_size=batch_size)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_shapley_equals_captum_on_the_same_permutations():
    model, x = small_cnn(), smooth_images()
    # image 1 has fewer segments (ids 0..3 of the batch's 0..5): it skips the ids it lacks
    seg = torch.stack([grid_segments(16, 16, (2, 3)), grid_segments(16, 16, 2)])
    torch.manual_seed(7)
    ref = ShapleyValueSampling(model).attribute(x, target=[2, 0], feature_mask=captum_mask(seg), n_samples=4,
                                                perturbations_per_eval=3)
    ours = shapley_sampling(model, x, [2, 0], segments=seg, samples=4, seed=7, batch_size=5)
    torch.testing.assert_close(ours, ref.double(), rtol=1e-5, atol=1e-7)
    perms = draw_permutations(6, 4, seed=7)
    given = shapley_sampling(model, x, [2, 0], segments=seg, permutations=perms)
    torch.testing.assert_close(given, ours, rtol=0, atol=1e-12)


def segment_values(attr, seg):
    """``[N, K]``: the value each segment was given (read on its first pixel)."""
    K = int(seg.max()) + 1
    return torch.stack([torch.stack([attr[n, 0][seg == k][0] for k in range(K)]) for n in range(attr.shape[0])])


def test_shapley_efficiency():
    """Shapley values add up to f(x) - f(baseline) on every permutation."""
    model, x = small_cnn(), smooth_images()
    seg = grid_segments(16, 16, 3)
    attr = shapley_sampling(model, x, 1, segments=seg, samples=3, seed=1)
    with torch.no_grad():
        gap = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(segment_values(attr, seg).sum(1), gap, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method, anchor", [(kernel_shap, KernelShap), (lime, Lime)])
def test_surrogates_equal_captum_under_the_same_seed(method, anchor):
    """Same coalitions: ours drawn from a generator seeded 11, Captum's from the global one
    after torch.manual_seed(11); same weights (computed by each), same scikit-learn fit."""
    model = small_cnn()
    x = smooth_images(2) * 3
    seg = grid_segments(16, 16, 3)
    ours = method(model, x, [1, 4], segments=seg, samples=30, seed=11, baseline=0.25)
    torch.manual_seed(11)
    refs = [anchor(model).attribute(x[n:n + 1], target=t, feature_mask=captum_mask(seg), n_samples=30,
                                    baselines=0.25) for n, t in enumerate([1, 4])]
    ref = torch.cat(refs).double()
    assert float(ref.abs().max()) > 1e-3  # a fit that is not all zeros
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_lime_given_coalitions_equal_captum_fed_the_same():
    model = small_cnn()
    x = smooth_images(1) * 3
    seg = grid_segments(16, 16, 3)
    coalitions = torch.rand(25, 9, generator=torch.Generator().manual_seed(2)) > 0.5
    rows = iter(coalitions.long())

    def perturb(_inputs, **_):
        return next(rows)[None]

    ref = Lime(model, perturb_func=perturb).attribute(x, target=2, feature_mask=captum_mask(seg), n_samples=25)
    ours = lime(model, x, 2, segments=seg, coalitions=coalitions)
    torch.testing.assert_close(ours, ref.double(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    weighted = lime(model, x, 2, segments=seg, coalitions=coalitions, weights=torch.ones(25), regression="linear")
    assert not torch.allclose(weighted, ours)


def test_kernel_shap_many_samples_approach_shapley():
    """With every coalition weight right, KernelSHAP's fit sums to f(x) - f(baseline)."""
    model, x = small_cnn(), smooth_images(1)
    seg = grid_segments(16, 16, 2)
    attr = kernel_shap(model, x, 3, segments=seg, samples=200, seed=0)
    with torch.no_grad():
        gap = model(x)[0, 3] - model(torch.zeros_like(x))[0, 3]
    total = float(segment_values(attr, seg).sum())
    assert abs(total - float(gap)) < 1e-3 * max(1.0, abs(float(gap)))


# --------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("name", ["feature_ablation", "shapley_sampling", "kernel_shap", "lime"])
def test_predicted_return_output_and_model_left_as_found(name):
    model = small_cnn().train()
    x = smooth_images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = get_method(name)
    options = dict(method.report_options, **({"seed": 3} if "seed" in method.defaults() else {}))
    maps, output = method.maps(model, x, "predicted", **options)
    assert maps.shape == (2, 16, 16)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(output, expected)
    attr = method.function(model, x, expected.argmax(1), **options)
    torch.testing.assert_close(attr.sum(1), maps)


def test_exported_from_the_package():
    from cnnviz_fast.attribution import perturbation
    assert {"feature_ablation", "shapley_sampling", "kernel_shap", "lime"} <= set(perturbation.__all__)
    assert np.isfinite(draw_permutations(5, 2).numpy()).all()
