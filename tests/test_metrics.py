"""cnnviz_fast.metrics: curves against hand-computed values, Captum equality, sanity checks."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import cnnviz_fast.metrics as M
from cnnviz_fast import saliency


def linear_model(C=1, H=4, W=5, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, classes)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, C * H * W, generator=g, dtype=torch.float64))
        model[1].bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))
    return model


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 5 * 5, 4),
    ).double().eval()


def expected_curve(model, x, contributions, target, steps, mode, probability):
    """Independent hand computation: sort each image's pixel contributions in Python, rebuild the
    logits from the kept pixels (baseline 0), trapezoid by hand."""
    Wt = model[1].weight.detach().numpy()
    b = model[1].bias.detach().numpy()
    scores, aucs = [], []
    for n in range(x.shape[0]):
        xs = x[n].flatten().numpy()
        c = contributions[n].flatten().tolist()
        ranked = sorted(range(len(c)), key=lambda i: (-c[i], i))
        D = len(c)
        row = []
        for k in range(steps + 1):
            top = set(ranked[: k * D // steps])
            keep = [i for i in range(D) if (i in top) == (mode == "insertion")]
            z = b + Wt[:, keep] @ xs[keep]
            if probability:
                e = np.exp(z - z.max())
                row.append(float(e[target] / e.sum()))
            else:
                row.append(float(z[target]))
        fr = [k * D // steps / D for k in range(steps + 1)]
        aucs.append(sum((fr[i + 1] - fr[i]) * (row[i] + row[i + 1]) / 2 for i in range(steps)))
        scores.append(row)
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(aucs, dtype=torch.float64)


# --------------------------------------------------------------------------- curves
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("probability", [True, False])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_curve_of_linear_model_gradient_x_input(mode, probability, steps):
    model = linear_model(classes=3)
    x = torch.randn(3, 1, 4, 5, dtype=torch.float64)
    target = 2
    # gradient x input of the target logit of a linear model: w_i * x_i
    maps = model[1].weight[target].detach().reshape(1, 1, 4, 5) * x
    fn = M.deletion_curve if mode == "deletion" else M.insertion_curve
    curve = fn(model, x, target, maps, steps=steps, batch_size=4, probability=probability)
    scores, aucs = expected_curve(model, x, maps, target, steps, mode, probability)
    torch.testing.assert_close(curve.scores, scores)
    torch.testing.assert_close(curve.auc, aucs)
    assert curve.fractions[0] == 0 and curve.fractions[-1] == 1 and curve.mode == mode


def test_curve_targets_callable_predicted_and_per_image():
    model = linear_model(classes=3)
    x = torch.randn(4, 1, 4, 5, dtype=torch.float64)
    maps = torch.randn(4, 4, 5, dtype=torch.float64)
    predicted = model(x).argmax(1)
    a = M.deletion_curve(model, x, "predicted", maps, steps=5)
    b = M.deletion_curve(model, x, predicted.tolist(), maps, steps=5)
    c = M.deletion_curve(model, x, lambda out: out.softmax(1).gather(1, predicted.repeat_interleave(out.shape[0] // 4)[:, None])[:, 0], maps, steps=5, batch_size=6 * 4)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.scores, c.scores)
    # batch_size never changes the values
    d = M.deletion_curve(model, x, predicted, maps, steps=5, batch_size=1)
    torch.testing.assert_close(a.scores, d.scores)


def test_curve_patches_and_low_resolution_maps():
    model = linear_model(C=2, H=6, W=4)
    x = torch.randn(2, 2, 6, 4, dtype=torch.float64)
    coarse = torch.randn(2, 3, 2, dtype=torch.float64)  # one value per 2 x 2 patch
    full = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    a = M.insertion_curve(model, x, 0, coarse, steps=6, baseline=0.25)
    b = M.insertion_curve(model, x, 0, full, steps=6, baseline=0.25, patch=2)
    torch.testing.assert_close(a.scores, b.scores)
    # by hand: reveal the k top patches over a 0.25 baseline
    order = coarse.flatten(1).argsort(1, descending=True)
    for n in range(2):
        for k in range(7):
            img = torch.full_like(x[n], 0.25)
            for cell in order[n, :k].tolist():
                i, j = divmod(cell, 2)
                img[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = x[n, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            p = model(img[None]).softmax(1)[0, 0]
            torch.testing.assert_close(a.scores[n, k], p.detach())


def test_curve_clipped_patches_rank_by_patch_mean():
    model = linear_model(C=1, H=5, W=5)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    maps = torch.randn(2, 5, 5, dtype=torch.float64)
    curve = M.deletion_curve(model, x, 1, maps, steps=9, patch=2, probability=False)  # 3 x 3 cells
    for n in range(2):
        cells = [(i, j) for i in range(3) for j in range(3)]
        means = [float(maps[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean()) for i, j in cells]
        ranked = sorted(range(9), key=lambda c: (-means[c], c))
        for k in range(10):
            img = x[n].clone()
            for c in ranked[:k]:
                i, j = cells[c]
                img[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = 0
            torch.testing.assert_close(curve.scores[n, k], model(img[None])[0, 1].detach())


def test_curve_neuron_target():
    from cnnviz_fast import Neuron

    model = small_cnn()
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    curve = M.insertion_curve(model, x, Neuron("2", 3), torch.randn(2, 11, 11, dtype=torch.float64), steps=3)
    with torch.no_grad():
        clean = model[:3](x)[:, 3].mean((1, 2))
        empty = model[:3](torch.zeros_like(x))[:, 3].mean((1, 2))
    torch.testing.assert_close(curve.scores[:, -1], clean)
    torch.testing.assert_close(curve.scores[:, 0], empty)


def test_curve_leaves_model_untouched():
    model = small_cnn().train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    M.deletion_curve(model, x, 1, torch.randn(2, 11, 11, dtype=torch.float64), steps=4)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


BAD_CURVE = [
    (dict(attributions=torch.randn(2, 3, 5)), "attributions"),
    (dict(attributions=torch.randn(3, 4, 5)), "attributions"),
    (dict(attributions=torch.full((2, 4, 5), float("nan"))), "NaN"),
    (dict(attributions=torch.randn(2, 4, 5).long()), "attributions"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(target=[0, 1, 0]), "target"),
    (dict(target=5), "target"),
    (dict(patch=(3, 3), attributions=torch.randn(2, 2, 5)), "patch"),
    (dict(inputs=torch.full((2, 1, 4, 5), float("nan"))), "inputs"),
    (dict(baseline=torch.randn(3, 4, 5)), "baseline"),
]


@pytest.mark.parametrize("bad,name", BAD_CURVE)
def test_curve_bad_input(bad, name):
    args = dict(model=linear_model().float(), inputs=torch.randn(2, 1, 4, 5), target=0,
                attributions=torch.randn(2, 4, 5), steps=3)
    args.update(bad)
    with pytest.raises(ValueError, match=name):
        M.deletion_curve(**args)


def test_step_counts():
    assert M.step_counts(10, 4) == [0, 2, 5, 7, 10]
    assert M.step_counts(3, 1) == [0, 3]


# --------------------------------------------------------------------------- Captum equality
def noise_perturbation(x):
    noise = 0.1 * torch.randn(x.shape, dtype=x.dtype)
    return noise, x - noise


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch_size", [None, 4, 7])
def test_infidelity_equals_captum(normalize, batch_size):
    from captum.metrics import infidelity as captum_infidelity

    model = small_cnn()
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    target = [1, 3]
    attr = saliency(model, x, target, abs=False) * x
    torch.manual_seed(7)
    ours = M.infidelity(model, x, target, attr, noise_perturbation, n_perturb_samples=5, batch_size=batch_size,
                        normalize=normalize)
    torch.manual_seed(7)
    theirs = captum_infidelity(model, noise_perturbation, x, attr, target=target, n_perturb_samples=5,
                               max_examples_per_batch=batch_size, normalize=normalize)
    torch.testing.assert_close(ours, theirs)
    assert (ours > 0).all()


def test_infidelity_with_baselines_and_predicted():
    from captum.metrics import infidelity as captum_infidelity

    model = small_cnn()
    x = torch.randn(3, 3, 11, 11, dtype=torch.float64)
    base = torch.randn(3, 3, 11, 11, dtype=torch.float64)
    attr = torch.randn_like(x)

    def perturb(inputs, baselines):
        keep = (torch.rand(inputs.shape[0], 1, 11, 11) > 0.3).double()
        return (inputs - baselines) * (1 - keep), inputs * keep + baselines * (1 - keep)

    torch.manual_seed(3)
    ours = M.infidelity(model, x, "predicted", attr, perturb, n_perturb_samples=4, baselines=base)
    torch.manual_seed(3)
    theirs = captum_infidelity(model, perturb, x, attr, baselines=base, target=model(x).argmax(1),
                               n_perturb_samples=4)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("batch_size", [None, 6])
def test_sensitivity_max_equals_captum(batch_size):
    from captum.metrics import sensitivity_max as captum_sensitivity_max

    model = small_cnn()
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)

    def explain(inputs, target):  # Captum passes (and expects back) a tuple for the clean inputs
        if isinstance(inputs, tuple):
            return (saliency(model, inputs[0], target),)
        return saliency(model, inputs, target)

    torch.manual_seed(11)
    ours = M.sensitivity_max(model, x, [0, 2], saliency, perturb_radius=0.05, n_perturb_samples=5,
                             batch_size=batch_size)
    torch.manual_seed(11)
    theirs = captum_sensitivity_max(explain, x, perturb_radius=0.05, n_perturb_samples=5,
                                    max_examples_per_batch=batch_size, target=torch.tensor([0, 2]))
    torch.testing.assert_close(ours, theirs)
    assert (ours > 0).all()


def test_robustness_bad_input():
    model = small_cnn()
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    with pytest.raises(ValueError, match="attributions"):
        M.infidelity(model, x, 0, torch.randn(2, 11, 11), noise_perturbation)
    with pytest.raises(ValueError, match="attributions"):
        M.infidelity(model, x, 0, torch.full_like(x, float("nan")), noise_perturbation)
    with pytest.raises(ValueError, match="n_perturb_samples"):
        M.infidelity(model, x, 0, x, noise_perturbation, n_perturb_samples=0)
    with pytest.raises(ValueError, match="perturb_func"):
        M.infidelity(model, x, 0, x, None)
    with pytest.raises(ValueError, match="method"):
        M.sensitivity_max(model, x, 0, "saliency")


# --------------------------------------------------------------------------- sanity checks
def test_spearman_and_ssim_match_scipy_and_skimage():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    a = torch.randn(3, 16, 13, dtype=torch.float64)
    b = a + 0.5 * torch.randn_like(a)
    b[0, :4] = 0.0  # ties
    a[1, 2:5] = 1.0
    rho = M.spearman(a, b)
    s = M.ssim(a, b)
    for n in range(3):
        assert math.isclose(float(rho[n]), spearmanr(a[n].flatten(), b[n].flatten())[0], rel_tol=1e-9, abs_tol=1e-12)
        an = (a[n] - a[n].min()) / (a[n].max() - a[n].min())
        bn = (b[n] - b[n].min()) / (b[n].max() - b[n].min())
        ref = structural_similarity(an.numpy(), bn.numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
        assert math.isclose(float(s[n]), ref, rel_tol=1e-9, abs_tol=1e-12)
    torch.testing.assert_close(M.ssim(a, a), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_randomization_leaves_model_untouched_and_flags_input_only_maps(mode):
    model = small_cnn().train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    rng = torch.get_rng_state()
    edges = lambda m, inputs, target: inputs.abs()  # noqa: E731  (ignores the model entirely)
    res = M.model_randomization(model, x, "predicted", edges, mode=mode)
    assert res.unchanged and torch.equal(res.spearman, torch.ones_like(res.spearman))
    res = M.model_randomization(model, x, "predicted", saliency, mode=mode)
    assert res.layers == (["5", "2", "0"] if mode == "cascading" else ["0", "2", "5"])
    assert res.spearman.shape == res.ssim.shape == (3, 2)
    assert (res.spearman < 1 - 1e-6).all()  # every randomized model changes the saliency maps
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


def test_randomization_bad_input():
    model = small_cnn()
    x = torch.randn(1, 3, 11, 11, dtype=torch.float64)
    with pytest.raises(ValueError, match="layers"):
        M.model_randomization(model, x, 0, saliency, layers=["nope"])
    with pytest.raises(ValueError, match="mode"):
        M.model_randomization(model, x, 0, saliency, mode="top-down")
    with pytest.raises(ValueError, match="model"):
        M.model_randomization(lambda t: t, x, 0, saliency)


# --------------------------------------------------------------------------- pointing game
def test_pointing_game_boxes_masks_tolerance():
    maps = torch.zeros(3, 10, 12)
    maps[0, 2, 3] = 1  # inside the box
    maps[1, 8, 11] = 1  # outside
    maps[2, 5, 9] = 1  # 2 pixels right of the box's last column (x = 7)
    boxes = torch.tensor([[1, 1, 8, 6]] * 3)  # x1, y1, x2, y2 (half-open)
    assert M.pointing_game(maps, boxes=boxes).tolist() == [True, False, False]
    assert M.pointing_game(maps, boxes=boxes, tolerance=2).tolist() == [True, False, True]
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[:, 1:6, 1:8] = True
    assert M.pointing_game(maps[:, None], masks=masks, tolerance=2).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="boxes or masks"):
        M.pointing_game(maps)
    with pytest.raises(ValueError, match="boxes"):
        M.pointing_game(maps, boxes=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="masks"):
        M.pointing_game(maps, masks=torch.zeros(3, 9, 12))


# --------------------------------------------------------------------------- evaluate
def test_evaluate_summary():
    model = small_cnn().float()
    data = [(torch.randn(3, 3, 11, 11), torch.tensor([0, 1, 2])) for _ in range(2)]
    methods = {"saliency": saliency, "random": lambda m, x, t: torch.rand(x.shape[0], 11, 11)}
    summary = M.evaluate(model, data, methods, target="label", steps=4)
    for name in methods:
        for metric in ("deletion", "insertion"):
            s = summary[name][metric]
            assert s["n"] == 6 and s["low"] <= s["mean"] <= s["high"] and 0 <= s["mean"] <= 1
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    again = M.evaluate(model, dataset, methods, target="label", steps=4, images_per_batch=4)
    for key in ("mean", "low", "high"):  # the same images in other batches: the same AUCs
        assert again["saliency"]["deletion"][key] == pytest.approx(summary["saliency"]["deletion"][key], rel=1e-5)
    table = M.format_table(summary)
    assert "| saliency |" in table and "deletion AUC" in table
    with pytest.raises(ValueError, match="labels"):
        M.evaluate(model, torch.randn(2, 3, 11, 11), methods, target="label")
    with pytest.raises(ValueError, match="metrics"):
        M.evaluate(model, data, methods, metrics=["auc"])


def test_evaluate_cli(tmp_path, capsys):
    from cnnviz_fast.cli import main

    out = tmp_path / "table.md"
    assert main(["evaluate", "--model", "zoo:digits", "--data", "digits", "--limit", "3", "--steps", "2",
                 "--methods", "saliency,random", "--out", str(out), "--quiet"]) == 0
    assert "| random |" in out.read_text() and "| saliency |" in capsys.readouterr().out
    assert main(["evaluate", "--methods", "lime_nope"]) == 2  # one line, exit 2, before any model loads
    assert "--methods must name" in capsys.readouterr().err


class WritesIntoItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = small_cnn()

    def forward(self, x):
        x.mul_(1.5)  # a careless model; the caller's tensor must not see it
        return self.net(x)


METRIC_CALLS = {
    "deletion": lambda m, x: M.deletion_curve(m, x, "predicted", torch.rand(2, 11, 11, dtype=x.dtype), steps=3),
    "insertion": lambda m, x: M.insertion_curve(m, x, 1, torch.rand(2, 11, 11, dtype=x.dtype), steps=3),
    "infidelity": lambda m, x: M.infidelity(m, x, "predicted", torch.rand_like(x), noise_perturbation,
                                            n_perturb_samples=2),
    "sensitivity_max": lambda m, x: M.sensitivity_max(m, x, 1, saliency, n_perturb_samples=2),
    "model_randomization": lambda m, x: M.model_randomization(m, x, 1, saliency),
}


@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad", "inference_mode"])
@pytest.mark.parametrize("name", sorted(METRIC_CALLS))
def test_inputs_never_modified_in_any_grad_mode(name, grad_mode):
    model = WritesIntoItsInput()
    x = torch.rand(2, 3, 11, 11, dtype=torch.float64)
    original = x.clone()
    mode = {"enabled": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with mode[grad_mode]():
        METRIC_CALLS[name](model, x)
    assert torch.equal(x, original)
