"""ROAD against pytorch-grad-cam's ROAD metrics, IROF against Quantus' IROF."""
import importlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cnnviz_fast.metrics import irof, noisy_linear_imputation, road


def small_cnn(channels=3):
    model = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 5))
    return model.eval()


def smooth_images(n=2, channels=3, size=24):
    x = torch.rand(n, channels, size // 4, size // 4)
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- ROAD


def test_imputation_is_exact_on_a_linear_ramp():
    """A linear image is its neighbours' weighted mean away from the corners: imputed exactly."""
    ramp = (torch.arange(12.)[None, :] * 0.5 + torch.arange(10.)[:, None] * 0.25).expand(2, 10, 12)
    keep = torch.ones(10, 12, dtype=torch.bool)
    keep[2:8, 3:9] = False
    out = noisy_linear_imputation(ramp, keep, noise=0.0)
    torch.testing.assert_close(out, ramp.float(), rtol=0, atol=1e-5)
    noisy = noisy_linear_imputation(ramp, keep, noise=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, keep], ramp[:, keep]) and not torch.allclose(noisy[:, ~keep], ramp[:, ~keep])


def test_condensed_boxes_equal_the_plain_solve():
    """Inner 8x8 boxes whose pixels are all removed leave the system (their interior a fixed
    map of their ring): the same imputation as the full sparse system, in float64."""
    road_module = importlib.import_module("cnnviz_fast.metrics.road")
    rng = np.random.default_rng(0)
    H, W = 45, 52
    for h, w in ((H, W), (40, 40), (7, 30)):
        order = road_module._grid(h, w, 8).order
        assert np.array_equal(np.sort(order), np.arange(h * w))
    image = rng.random((3, H, W))
    keep = rng.random((H, W)) < 0.4  # isolated removed pixels and small regions
    keep[4:33, 6:42] = False  # a removed region covering whole boxes
    keep[18, 20] = True  # one kept pixel inside: its box stays in the system
    _, _, unknown, condensed = road_module._system(keep, image, 8)
    sizes = {kind.interior.shape[1]: len(which) for kind, which in condensed}
    assert sizes[225] >= 1 and sizes[49] >= 2  # blocks of 2 x 2 boxes and single boxes
    assert unknown.size + sum(size * count for size, count in sizes.items()) == int((~keep).sum())
    condensed_solution = road_module._solved(keep, image, 8)
    np.testing.assert_allclose(condensed_solution, road_module._solved(keep, image, 0), rtol=0, atol=1e-10)
    keep[:] = True
    keep[0, 0] = False
    assert road_module._system(keep, image, 8)[3] is None


def test_road_with_condensed_boxes_equals_pytorch_grad_cam():
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(0)
    model, x = small_cnn(), smooth_images(1, 3, 40)
    cams = nn.functional.interpolate(torch.rand(1, 1, 5, 5), size=(40, 40), mode="bilinear")[:, 0]
    ours = road(model, x, [2], cams, percentiles=(20, 70), seed=3)
    torch.manual_seed(3)
    combined = ROADCombined(percentiles=[20, 70])(x, cams.numpy(), [ClassifierOutputSoftmaxTarget(2)], model)
    np.testing.assert_allclose(ours.combined.numpy(), combined, rtol=1e-4, atol=1e-7)


def test_road_equals_pytorch_grad_cam():
    from pytorch_grad_cam.metrics import road as anchor
    from pytorch_grad_cam.metrics.road import (
        ROADCombined, ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    model, x = small_cnn(), smooth_images(2, 3, 16)
    cams = torch.rand(2, 16, 16)
    percentiles = [20, 50, 80]
    # without noise: MoRF and LeRF on logits
    ours = road(model, x, [1, 3], cams, percentiles, noise=0.0, probability=False)
    defaults = anchor.NoisyLinearImputer.__init__.__defaults__
    anchor.NoisyLinearImputer.__init__.__defaults__ = (0.0,) + defaults[1:]
    try:
        targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(3)]
        morf = ROADMostRelevantFirstAverage(percentiles)(x, cams.numpy(), targets, model)
        lerf = ROADLeastRelevantFirstAverage(percentiles)(x, cams.numpy(), targets, model)
    finally:
        anchor.NoisyLinearImputer.__init__.__defaults__ = defaults
    np.testing.assert_allclose(ours.morf_mean.numpy(), morf, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.lerf_mean.numpy(), lerf, rtol=1e-4, atol=1e-6)
    # with noise (0.01): the same draws, ours from seed 5, theirs from the global generator
    ours = road(model, x, [1, 3], cams, percentiles=(30, 60), seed=5)
    torch.manual_seed(5)
    targets = [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(3)]
    combined = ROADCombined(percentiles=[30, 60])(x, cams.numpy(), targets, model)
    np.testing.assert_allclose(ours.combined.numpy(), combined, rtol=1e-4, atol=1e-6)
    assert ours.morf.shape == (2, 2)


def test_road_bad_input_and_model_left_as_found():
    model, x = small_cnn().train(), smooth_images()
    with pytest.raises(ValueError, match="attributions"):
        road(model, x, 1, torch.rand(2, 12, 12))
    with pytest.raises(ValueError, match="percentiles"):
        road(model, x, 1, torch.rand(2, 24, 24), percentiles=(50, 120))
    with pytest.raises(ValueError, match="noise"):
        road(model, x, 1, torch.rand(2, 24, 24), noise=-1.0)
    road(model, x, "predicted", torch.rand(2, 24, 24), percentiles=(50,))
    assert model.training


# --------------------------------------------------------------------------- IROF


def quantus_irof(model, x, classes, maps):
    quantus = pytest.importorskip("quantus")
    from quantus.functions.perturb_func import baseline_replacement_by_mask

    def perturb(arr, mask, **kwargs):  # Quantus' IROF passes a [B, 1, H, W] mask for [B, C, H, W] images
        return baseline_replacement_by_mask(arr, np.broadcast_to(mask, arr.shape), **kwargs)

    if not hasattr(np, "trapz"):  # Quantus calls np.trapz, removed in NumPy 2
        np.trapz = np.trapezoid
    metric = quantus.IROF(return_aggregate=False, disable_warnings=True, perturb_func=perturb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one image per batch: Quantus' "mean" baseline is the mean of its whole batch
        return np.array([metric(model=model, x_batch=x[n:n + 1].numpy(), y_batch=np.array([c]),
                                a_batch=maps[n:n + 1].numpy(), device="cpu", batch_size=1)[0]
                         for n, c in enumerate(classes)])


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 20)])
def test_irof_equals_quantus(channels, size):
    model, x = small_cnn(channels), smooth_images(2, channels, size)
    maps = torch.rand(2, 1, size, size)
    ours = irof(model, x, [2, 4], maps)
    expected = quantus_irof(model, x, [2, 4], maps)
    assert int(ours.segments.min()) > 5
    np.testing.assert_allclose(ours.aoc.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert ours.curves.shape == (2, int(ours.segments.max()))


def test_irof_segments_and_bad_input():
    model, x = small_cnn(), smooth_images(1, 3, 32)
    maps = torch.rand(1, 32, 32)
    grid = irof(model, x, 1, maps, segments="grid:4", baseline=0.0, batch_size=5)
    assert grid.segments.tolist() == [16] and torch.isfinite(grid.curves).all()
    with pytest.raises(ValueError, match="baseline"):
        irof(model, x, 1, maps, baseline="noise")
    with pytest.raises(ValueError, match="segments"):
        irof(model, x, 1, maps, segments=torch.zeros(32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="attributions"):
        irof(model, x, 1, torch.rand(2, 32, 32))
