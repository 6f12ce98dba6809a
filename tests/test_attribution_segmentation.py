"""saliency_to_mask: GrabCut seeded from saliency quantiles, on synthetic and digit images."""
import sys
from pathlib import Path

import pytest
import torch

from cnnviz_fast import zoo
from cnnviz_fast.attribution import occlusion, saliency_to_mask
from cnnviz_fast.pictures import heatmap_overlay, image_grid, save_png

OUT = Path(__file__).resolve().parents[1] / "test-output" / "attribution"


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


def square_scene(seed=0, size=64):
    """A bright square on noise, and a blurred, noisy saliency map peaking on it."""
    g = torch.Generator().manual_seed(seed)
    square = torch.zeros(size, size, dtype=torch.bool)
    square[20:44, 16:40] = True
    image = torch.rand(3, size, size, generator=g) * 0.6
    image[:, square] = torch.tensor([0.95, 0.85, 0.3])[:, None] + 0.05 * torch.randn(3, int(square.sum()), generator=g)
    image = image.clamp(0, 1)
    saliency = torch.nn.functional.avg_pool2d(square.float()[None, None], 9, 1, 4)[0, 0]
    saliency = saliency + 0.3 * torch.rand(size, size, generator=g)
    return image, saliency, square


def test_square_on_noise():
    image, saliency, square = square_scene()
    mask = saliency_to_mask(image, saliency)
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    assert iou(mask, square) >= 0.8
    # the quantile seeds alone are far from the answer: GrabCut did the work
    assert iou(saliency >= saliency.quantile(0.95), square) < 0.5

    OUT.mkdir(parents=True, exist_ok=True)
    panels = [image, heatmap_overlay(image, saliency), image * mask, mask.float().expand(3, -1, -1)]
    save_png(image_grid(torch.stack(panels), nrow=4), OUT / "segmentation_square.png", upscale=3)


def test_batch_channels_and_grayscale():
    scenes = [square_scene(seed) for seed in (1, 2)]
    images = torch.stack([s[0] for s in scenes])
    maps = torch.stack([s[1] for s in scenes])
    batch = saliency_to_mask(images, maps)
    assert batch.shape == (2, 64, 64)
    for k, (image, saliency, square) in enumerate(scenes):
        assert torch.equal(batch[k], saliency_to_mask(image, saliency))
        assert iou(batch[k], square) >= 0.8
    # [C, H, W] saliency is reduced by max-abs over channels
    image, saliency, _ = scenes[0]
    three = torch.stack([-saliency, 0.5 * saliency, 0.2 * saliency])
    assert torch.equal(saliency_to_mask(image, three), batch[0])
    assert torch.equal(saliency_to_mask(image[None], three[None]), batch[:1])
    # grayscale images are replicated to 3 channels
    gray = image.mean(0, keepdim=True)
    assert torch.equal(saliency_to_mask(gray, saliency), saliency_to_mask(gray.expand(3, -1, -1), saliency))


def test_digit_with_occlusion_map():
    pixels, labels = zoo.digits()
    x, y = pixels[:2], labels[:2]
    model = zoo.digits_cnn()
    # baseline = the black background, so occluding background changes nothing
    black = zoo.DIGITS_NORMALIZE(torch.zeros(1, 1, 1, 1))
    heat = occlusion(model, zoo.DIGITS_NORMALIZE(x), y, window=(4, 4), stride=(2, 2), baseline=black)
    masks = saliency_to_mask(x, heat)
    stroke = x[:, 0] > 0.5
    for mask, on_stroke in zip(masks, stroke):
        assert mask.sum() >= 50, "non-empty"
        assert (mask & on_stroke).sum() / mask.sum() >= 0.8, "mostly on the stroke"

    OUT.mkdir(parents=True, exist_ok=True)
    panels = [p for k in range(2) for p in
              (x[k].expand(3, -1, -1), heatmap_overlay(x[k], heat[k]), masks[k].float().expand(3, -1, -1))]
    save_png(image_grid(torch.stack(panels), nrow=3), OUT / "segmentation_digits.png", upscale=6)


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    image, saliency, _ = square_scene()
    with pytest.raises(ImportError, match=r"cnnviz_fast\[segment\]"):
        saliency_to_mask(image, saliency)


@pytest.mark.parametrize("image, saliency, argument", [
    (torch.rand(64, 64), torch.rand(64, 64), "image"),
    (torch.rand(2, 64, 64), torch.rand(64, 64), "image"),
    (torch.rand(3, 64, 64) * 255, torch.rand(64, 64), "image"),
    (torch.rand(3, 64, 64), torch.rand(32, 32), "saliency"),
    (torch.rand(3, 64, 64), torch.rand(64), "saliency"),
    (torch.rand(2, 3, 64, 64), torch.rand(64, 64), "saliency"),
    (torch.rand(2, 3, 64, 64), torch.rand(3, 64, 64), "saliency"),
    (torch.rand(3, 64, 64), torch.full((64, 64), float("nan")), "saliency"),
    (torch.rand(3, 64, 64), torch.ones(64, 64), "saliency"),  # constant: no seeds
])
def test_bad_shapes_and_degenerate_seeds(image, saliency, argument):
    with pytest.raises(ValueError, match=argument):
        saliency_to_mask(image, saliency)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(fg_quantile=0.0), "fg_quantile"),
    (dict(fg_quantile=1.5), "fg_quantile"),
    (dict(bg_quantile=0.96), "bg_quantile"),
    (dict(bg_quantile=-0.1), "bg_quantile"),
    (dict(iterations=0), "iterations"),
])
def test_bad_arguments(kwargs, argument):
    image, saliency, _ = square_scene()
    with pytest.raises(ValueError, match=argument):
        saliency_to_mask(image, saliency, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors():
    image, saliency, _ = square_scene()
    mask = saliency_to_mask(image.cuda(), saliency.cuda())
    assert mask.device.type == "cuda"
    assert torch.equal(mask.cpu(), saliency_to_mask(image, saliency))
