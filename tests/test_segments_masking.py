"""The segment scorer's passes on ops.segment_mask (layouts, a model refusing channels-last)
and ROAD's imputation solver (nested dissection order vs scipy's default spsolve)."""
import importlib

import numpy as np
import pytest
import torch

from cnnviz_fast.attribution.perturbation import feature_ablation, kernel_shap, shapley_sampling
from cnnviz_fast.core import layout
from layout_models import FlattensByView

road_module = importlib.import_module("cnnviz_fast.metrics.road")


def test_passes_are_built_channels_last_unless_the_model_refuses(monkeypatch):
    x = torch.randn(2, 3, 12, 12)
    segments = torch.arange(16).view(4, 4).repeat_interleave(3, 0).repeat_interleave(3, 1).expand(2, 12, 12)
    viewing, reshaping = FlattensByView(), FlattensByView(reshape=True)
    reshaping.load_state_dict(viewing.state_dict())
    contiguous = feature_ablation(reshaping, x, [1, 3], segments=segments, batch_size=8)
    assert not any(reshaping.layouts)
    monkeypatch.setattr(layout, "MIN_PIXELS", 0)  # the test's passes are small
    reshaping.layouts.clear()
    ours = feature_ablation(reshaping, x, [1, 3], segments=segments, baseline=0.5, batch_size=8)
    assert reshaping.layouts[0] is False and all(reshaping.layouts[1:])  # the clean pass takes x as given
    refused = feature_ablation(viewing, x, [1, 3], segments=segments, baseline=0.5, batch_size=8)
    assert viewing.layouts[1] is True and not any(viewing.layouts[2:])  # one try, then contiguous
    torch.testing.assert_close(refused, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feature_ablation(reshaping, x, [1, 3], segments=segments, batch_size=8), contiguous,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["shapley", "kernel_shap"])
def test_images_with_different_segment_counts_share_passes(method):
    # rows of image 0 (9 segments) and image 1 (4 segments) in one pass: the keep table is
    # padded for image 1; each image's values equal those of a call on it alone
    model = FlattensByView(reshape=True)
    x = torch.randn(2, 3, 12, 12)
    fine = torch.arange(9).view(3, 3).repeat_interleave(4, 0).repeat_interleave(4, 1)
    coarse = torch.arange(4).view(2, 2).repeat_interleave(6, 0).repeat_interleave(6, 1)
    segments = torch.stack([fine, coarse])
    run = {"shapley": lambda xs, seg, tgt: shapley_sampling(model, xs, tgt, segments=seg, samples=2, seed=0,
                                                            batch_size=5),
           "kernel_shap": lambda xs, seg, tgt: kernel_shap(model, xs, tgt, segments=seg, samples=20, seed=0,
                                                           batch_size=5)}[method]
    both = run(x, segments, [1, 2])
    if method == "shapley":  # the same permutations of max(K) ids restricted to each image
        torch.testing.assert_close(both[1:], shapley_sampling(model, x[1:], 2, segments=segments[1:], batch_size=5,
                                                              permutations=_restricted(_perms(9, 2, 0), 4)),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[:1], run(x[:1], segments[:1], 1), rtol=1e-5, atol=1e-6)


def _restricted(perms, k):
    return perms[perms < k].view(perms.shape[0], k)


def _perms(k, samples, seed):
    from cnnviz_fast.attribution.perturbation import draw_permutations
    return draw_permutations(k, samples, seed)


@pytest.mark.parametrize("shape", [(3, 23, 17), (1, 9, 30), (2, 1, 5)])
def test_road_solver_equals_spsolve(shape):
    from scipy.sparse.linalg import spsolve
    rng = np.random.default_rng(0)
    C, H, W = shape
    image = torch.from_numpy(rng.random(shape)).float()
    order = road_module._dissection_order(H, W)
    assert np.array_equal(np.sort(order), np.arange(H * W))
    for fraction in (0.2, 0.5, 0.9):
        keep = rng.random((H, W)) >= fraction
        keep[0, 0] = True  # at least one known pixel
        out = road_module._interpolated(image, keep)
        A, b, unknown, _ = road_module._system(keep, image.numpy().astype(np.float64), 0)  # the plain system
        expected = image.clone().reshape(C, -1)
        expected[:, torch.from_numpy(unknown)] = torch.as_tensor(spsolve(A, b), dtype=torch.float).reshape(-1, C).t()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        assert torch.equal(out[:, torch.from_numpy(np.flatnonzero(keep))],
                           image.reshape(C, -1)[:, torch.from_numpy(np.flatnonzero(keep))])
