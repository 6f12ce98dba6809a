"""Fast feed-forward style transfer: the conditional network, the shipped weights, training
(loss goes down, kill-and-resume equals an uninterrupted run) and the losses it is trained
on, judged by a plain PyTorch Gatys computation written here."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnviz_fast import synthesis, zoo
from cnnviz_fast.core import Normalize, forward_to_layers
from cnnviz_fast.synthesis.fast_style import StyleNetwork, style_losses, stylize, train_style_network

pytestmark = pytest.mark.usefixtures("one_thread")

NORM = Normalize(mean=(0.5, 0.4, 0.45), std=(0.25, 0.3, 0.2))
STYLE_LAYERS = ["0", "2"]
CONTENT_LAYER = "2"


def tiny_network(styles=("a", "b"), dtype=torch.float32, seed=0):
    """A small network whose styles differ (fresh norms are the same for every style)."""
    torch.manual_seed(seed)
    network = StyleNetwork(list(styles), channels=(4, 8, 8), blocks=1, kernel=3).to(dtype)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith((".scale", ".shift")):
                parameter.add_(0.5 * torch.randn_like(parameter))
    return network.eval()


@pytest.fixture(scope="module")
def loss_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(12, 4, 3, padding=1)).eval()


@pytest.fixture(scope="module")
def training_data():
    generator = torch.Generator().manual_seed(2)
    styles = {"red": (torch.rand(1, 3, 24, 24, generator=generator) * torch.tensor([1.0, 0.2, 0.2])[:, None, None]),
              "stripes": (torch.arange(24.0).remainder(6).lt(3).float().expand(1, 3, 24, 24).clone())}
    smooth = F.interpolate(torch.rand(3, 3, 8, 10, generator=generator), size=(40, 48), mode="bilinear")
    return styles, [smooth[i:i + 1].clamp(0, 1) for i in range(3)]


def test_network_shapes_range_and_size():
    network = tiny_network()
    assert sum(p.numel() for p in StyleNetwork(["a", "b"]).parameters()) * 4 < 2_000_000  # shippable
    for height, width in ((32, 32), (37, 45), (16, 23)):
        out = stylize(torch.rand(2, 3, height, width), 0, network)
        assert out.shape == (2, 3, height, width)
        assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_conditional_norm_picks_the_style_per_image():
    network = tiny_network(dtype=torch.float64)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    first, second = stylize(x, 0, network), stylize(x, "b", network)
    assert (first - second).abs().mean() > 1e-2  # two styles, two pictures
    assert torch.equal(second, stylize(x, 1, network))  # a name is its index
    mixed = stylize(x, [0, 1, 1, 0], network)
    separate = torch.cat([stylize(x[i:i + 1], s, network) for i, s in enumerate([0, 1, 1, 0])])
    torch.testing.assert_close(mixed, separate, rtol=0, atol=1e-12)
    torch.testing.assert_close(stylize(x, torch.tensor([0, 1, 1, 0]), network, batch_size=3), mixed, rtol=0,
                               atol=1e-12)


def test_stylize_leaves_everything_as_found():
    network = tiny_network().train()
    before = copy.deepcopy(network.state_dict())
    x = torch.rand(2, 3, 32, 32)
    kept = x.clone()
    stylize(x, 1, network)
    assert network.training and all(m.training for m in network.modules())
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert all(p.requires_grad for p in network.parameters())
    assert torch.equal(x, kept)


def test_bad_input_names_the_argument():
    network = tiny_network()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="style.*index in \\[0, 1\\]"):
        stylize(x, 2, network)
    with pytest.raises(ValueError, match="style 'oil' is not a style.*a, b"):
        stylize(x, "oil", network)
    with pytest.raises(ValueError, match="style must be one style or one per image \\(2\\)"):
        stylize(x, [0, 1, 0], network)
    with pytest.raises(ValueError, match="images must be RGB.*got 1 channels"):
        stylize(torch.rand(2, 1, 32, 32), 0, network)
    with pytest.raises(ValueError, match="images must be pixels in \\[0, 1\\]"):
        stylize(x * 3, 0, network)
    with pytest.raises(ValueError, match="images must be at least 16"):
        stylize(torch.rand(1, 3, 8, 32), 0, network)
    with pytest.raises(ValueError, match="network must be a StyleNetwork"):
        stylize(x, 0, nn.Identity())


def test_shipped_network_loads_checks_and_stylizes(monkeypatch):
    network = zoo.fast_style_network()
    assert network.styles == ("brick", "stain")
    assert not network.training
    assert zoo.FAST_STYLE_WEIGHTS.stat().st_size < 2_500_000
    photo = zoo.sample_images(size=64)["china"]
    out = synthesis.stylize(photo.expand(2, -1, -1, -1), ["brick", "stain"])
    assert out.shape == (2, 3, 64, 64)
    assert (out[0] - out[1]).abs().mean() > 0.05 and (out[1] - photo[0]).abs().mean() > 0.05
    monkeypatch.setattr(zoo, "FAST_STYLE_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256"):
        zoo.fast_style_network()


def plain_gram(features):
    flat = features.flatten(2)
    return torch.bmm(flat, flat.transpose(1, 2)) / flat.shape[-1]


def test_style_losses_are_the_plain_gatys_losses(loss_model, training_data):
    """style_losses (shared with style_transfer and the training) against bmm Gram matrices and MSE."""
    styles, photos = training_data
    content = torch.cat([p[..., :32, :32] for p in photos[:2]]).double()
    images = tiny_network(dtype=torch.float64)(content, torch.tensor([0, 1]))
    model = copy.deepcopy(loss_model).double()
    style = styles["red"].double()
    content_loss, style_loss = style_losses(model, images, content, style, CONTENT_LAYER, STYLE_LAYERS,
                                            normalize=NORM.double())
    with torch.no_grad():
        ours = forward_to_layers(model, NORM.double()(images), STYLE_LAYERS)
        kept = forward_to_layers(model, NORM.double()(content), STYLE_LAYERS)
        target = forward_to_layers(model, NORM.double()(style), STYLE_LAYERS)
    plain_style = sum(0.5 * ((plain_gram(ours[n]) - plain_gram(target[n])) ** 2).flatten(1).mean(1)
                      / plain_gram(target[n]).pow(2).mean() for n in STYLE_LAYERS)
    c, t = ours[CONTENT_LAYER], kept[CONTENT_LAYER]
    plain_content = (c - t).pow(2).flatten(1).mean(1) / t.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(style_loss, plain_style, rtol=1e-10, atol=0)
    torch.testing.assert_close(content_loss, plain_content, rtol=1e-10, atol=0)


def _train(loss_model, training_data, **kwargs):
    styles, photos = training_data
    options = dict(normalize=NORM, network=tiny_network(styles=list(styles)), size=24, batch=2, lr=1e-2, seed=3,
                   progress=False)
    options.update(kwargs)
    return train_style_network(loss_model, styles, photos, CONTENT_LAYER, STYLE_LAYERS, **options)


def test_training_lowers_the_loss_and_leaves_the_model_as_found(loss_model, training_data):
    model = copy.deepcopy(loss_model).train()
    model[2].weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    result = _train(model, training_data, steps=40)
    history = result.history
    assert history.shape == (40,)
    assert float(history[-8:].mean()) < 0.7 * float(history[:8].mean()), history
    assert not result.network.training
    assert model.training and [p.requires_grad for p in model.parameters()] == [True, True, False, True, True, True]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class Killed(Exception):
    pass


def test_killed_and_resumed_equals_uninterrupted(loss_model, training_data, tmp_path):
    whole = _train(loss_model, training_data, steps=6)
    checkpoint = tmp_path / "style.ckpt"

    def kill(step, loss):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        _train(loss_model, training_data, steps=6, checkpoint=checkpoint, checkpoint_every=2, callback=kill)
    assert len(torch.load(checkpoint, weights_only=True)["history"]) == 4
    resumed = _train(loss_model, training_data, steps=6, checkpoint=checkpoint, checkpoint_every=2,
                     network=tiny_network(styles=["red", "stripes"], seed=9))  # the checkpoint's weights win
    assert torch.equal(resumed.history, whole.history)
    for key, value in whole.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[key], value), key
    with pytest.raises(ValueError, match="checkpoint .* other settings \\(lr\\)"):
        _train(loss_model, training_data, steps=6, checkpoint=checkpoint, lr=0.5)
    with pytest.raises(ValueError, match="past steps=3"):
        _train(loss_model, training_data, steps=3, checkpoint=checkpoint)


def test_training_arguments(loss_model, training_data):
    styles, photos = training_data
    with pytest.raises(ValueError, match="photos\\[0\\] is smaller than size=64"):
        _train(loss_model, training_data, steps=1, size=64)
    with pytest.raises(ValueError, match="styles must be a non-empty dict"):
        train_style_network(loss_model, [styles["red"]], photos, CONTENT_LAYER, STYLE_LAYERS)
    with pytest.raises(ValueError, match="styles\\['red'\\] must be RGB"):
        train_style_network(loss_model, {"red": styles["red"][:, :1]}, photos, CONTENT_LAYER, STYLE_LAYERS)
    with pytest.raises(ValueError, match="network's styles"):
        _train(loss_model, training_data, steps=1, network=tiny_network(styles=["x", "y"]))
    with pytest.raises(ValueError, match="style_layers"):
        train_style_network(loss_model, styles, photos, CONTENT_LAYER, ["nope"], size=24)


def test_cli_style_fast(tmp_path, capsys):
    from cnnviz_fast.cli import main

    out = tmp_path / "styled"
    assert main(["style", "--fast", "--content", "samples", "--style", "stain", "--size", "48", "--out", str(out),
                 "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["china-stain.png", "flower-stain.png"]
    assert main(["style", "--fast", "--content", "samples", "--style-index", "0", "--size", "48", "--out",
                 str(out), "--quiet"]) == 0
    assert (out / "china-brick.png").is_file()
    capsys.readouterr()
    for argv, message in ((["--fast", "--style", "oil"], "--style 'oil': with --fast, one of the shipped styles: "
                                                          "brick, stain"),
                          (["--fast", "--style-index", "2"], "--style-index must be in [0, 1]"),
                          (["--fast", "--style-layers", "x"], "--style-layers does not apply to --fast"),
                          (["--style", "samples"], "--content-layer, --style-layers required (or --fast")):
        assert main(["style", "--content", "samples", "--out", str(tmp_path / "bad"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_report_shows_the_feed_forward_result_beside_the_optimisation(tmp_path):
    from cnnviz_fast.report import Report, model_sections

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    report = Report(tmp_path, quick=True, progress=False)
    photos = zoo.sample_images(size=32)
    model_sections(report, model, NORM, torch.cat([photos["china"], photos["flower"]]), ["china", "flower"],
                   sections=["texture_style"])
    section = report.sections[0]
    assert not section.error, section.error
    assert "fast-style.png" in [p for p, _ in section.pictures]
    assert any("ms per image at 32 px" in note and "L-BFGS" in note for note in section.notes), section.notes
    assert (tmp_path / "fast-style.png").is_file()
