"""vargrad, smoothgrad_sq, gradient_x_input, gradient_shap against Captum (NoiseTunnel
vargrad / smoothgrad_sq, InputXGradient, GradientShap) and the registry entries of the
gradient family."""
import numpy as np
import pytest
import torch
from captum.attr import GradientShap, InputXGradient, NoiseTunnel, Saliency

import cnnviz_fast as cv
from cnnviz_fast import registry, zoo

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


@pytest.fixture(scope="module")
def digits():
    pixels, labels = zoo.digits()
    return zoo.digits_cnn(), zoo.DIGITS_NORMALIZE(pixels[:3]), labels[:3]


@pytest.fixture
def float64_default():
    """Captum makes its noise std with torch.tensor(float): in the default dtype. With it
    float64 the noise of a float64 input is drawn in float64, as ours."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --------------------------------------------------------------------------- VarGrad, SmoothGrad²
@pytest.mark.parametrize("use_abs", [True, False])
def test_vargrad_and_smoothgrad_sq_equal_captum_noise_tunnel(digits, float64_default, use_abs):
    """Same noise: Captum draws one [1, C, H, W] sample per partition from the global
    generator (nt_samples_batch_size=1); we draw one [C, H, W] per noisy image, so under the
    same torch seed both see identical noisy images. Compared: the maps, in float64."""
    model, x, labels = digits
    model, x = zoo.digits_cnn().double(), x[:1].double()
    noise, samples = 0.2, 3
    sigma = noise * float(x.max() - x.min())
    for kind, ours_fn in (("vargrad", cv.vargrad), ("smoothgrad_sq", cv.smoothgrad_sq)):
        kwargs = {"abs": use_abs} if kind == "vargrad" else {}
        torch.manual_seed(123)
        ref = NoiseTunnel(Saliency(model)).attribute(
            x, nt_type=kind, nt_samples=samples, nt_samples_batch_size=1, stdevs=sigma, target=int(labels[0]),
            abs=use_abs)
        torch.manual_seed(123)
        ours = ours_fn(model, x, int(labels[0]), samples=samples, noise=noise, batch_size=2, **kwargs)
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-12 * float(ref.abs().max()))
        assert float(ours.abs().max()) > 0


def test_vargrad_is_variance_of_smoothgrad_copies(digits):
    """Several images, batches across images: the variance equals mean(|g|^2) - mean(|g|)^2
    computed from our own smoothgrad and smoothgrad_sq with the same seed."""
    model, x, labels = digits
    x, labels = x[:2], labels[:2]
    kwargs = dict(samples=3, noise=0.1, batch_size=4, seed=7)
    var = cv.vargrad(model, x, labels, **kwargs)
    mean = cv.smoothgrad(model, x, labels, **kwargs)
    square = cv.smoothgrad_sq(model, x, labels, **kwargs)
    torch.testing.assert_close(var, (square - mean ** 2).clamp_min(0), rtol=1e-4, atol=1e-5 * float(square.max()))
    torch.testing.assert_close(square, cv.smoothgrad(model, x, labels, squared=True, **kwargs))
    assert (var >= 0).all() and var.max() > 0
    torch.testing.assert_close(cv.vargrad(model, x, labels, samples=3, noise=0.1, batch_size=16, seed=7), var)


# --------------------------------------------------------------------------- Input × Gradient
def test_gradient_x_input_equals_captum(digits):
    model, x, labels = digits
    torch.testing.assert_close(cv.gradient_x_input(model, x, labels),
                               InputXGradient(model).attribute(x, target=labels.tolist()).detach())
    torch.testing.assert_close(cv.gradient_x_input(model, x, 4), InputXGradient(model).attribute(x, target=4).detach())


# --------------------------------------------------------------------------- GradientSHAP
def our_draws(x, bases, samples, noise, seed):
    """The draws gradient_shap documents, in its order, from the same seeded generator."""
    g = torch.Generator().manual_seed(seed)
    n = len(x) * samples
    picks = torch.randint(len(bases), (n,), generator=g)
    alphas = torch.rand(n, generator=g, dtype=x.dtype)
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    rows = torch.arange(n) // samples
    noisy = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for _ in range(n)]) if noise else \
        torch.zeros((n,) + x.shape[1:], dtype=x.dtype)
    return picks, alphas, noisy * sigma[rows, None, None, None]


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_gradient_shap_equals_captum_on_the_same_draws(digits, monkeypatch, noise):
    """Captum draws the baseline indices (np.random.choice), the interpolation points
    (np.random.uniform) and the noise (NoiseTunnel._add_noise_to_input) itself; those three
    draws are replaced by the ones gradient_shap makes from the same seed. Everything else
    is Captum's code. Compared: the maps, in float64."""
    from captum.attr._core.noise_tunnel import NoiseTunnel as Tunnel

    model, x, labels = digits
    model, x = zoo.digits_cnn().double(), x.double()
    bases = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.double) - 0.5
    samples, seed = 3, 11
    picks, alphas, noise_rows = our_draws(x, bases, samples, noise, seed)
    monkeypatch.setattr(np.random, "choice", lambda k, n: picks.numpy()[:n])
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, n: alphas.numpy()[:n])
    monkeypatch.setattr(Tunnel, "_add_noise_to_input",
                        staticmethod(lambda t, std, n: t.repeat_interleave(n, dim=0) + noise_rows))
    ref = GradientShap(model).attribute(x, baselines=bases, target=labels.tolist(), n_samples=samples,
                                        stdevs=1.0).detach()
    ours = cv.gradient_shap(model, x, labels, baseline=bases, samples=samples, noise=noise, batch_size=4, seed=seed)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


def test_gradient_shap_reproducible_and_batch_size_independent(digits):
    model, x, labels = digits
    bases = torch.zeros(2, 1, 32, 32)
    a = cv.gradient_shap(model, x, labels, baseline=bases, samples=4, noise=0.1, batch_size=5, seed=3)
    b = cv.gradient_shap(model, x, labels, baseline=bases, samples=4, noise=0.1, batch_size=32,
                         generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(a, cv.gradient_shap(model, x, labels, baseline=bases, samples=4, noise=0.1, seed=4))
    maps, output = cv.gradient_shap(model, x, "predicted", return_output=True, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(output, model(x))
    torch.testing.assert_close(maps, cv.gradient_shap(model, x, output.argmax(1), seed=1))
    with pytest.raises(ValueError, match="baseline"):
        cv.gradient_shap(model, x, labels, baseline=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="samples"):
        cv.gradient_shap(model, x, labels, samples=0)
    with pytest.raises(ValueError, match="seed or generator"):
        cv.gradient_shap(model, x, labels, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="samples"):  # Captum's name answered with ours
        cv.gradient_shap(model, x, labels, n_samples=3)


# --------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name, rule", [("vargrad", "abs_max"), ("smoothgrad_sq", "abs_max"),
                                        ("gradient_shap", "sum"), ("deeplift", "sum"), ("deeplift_shap", "sum")])
def test_gradient_family_declared_once(digits, name, rule):
    model, x, _ = digits
    method = registry.get_method(name)
    assert method.family == "gradient" and method.map_rule == rule and not method.needs_layer
    assert registry.method_names("gradient").count(name) == 1
    options = {k: v for k, v in method.defaults().items() if v is not None}
    options.update(method.report_options)
    if "samples" in options:
        options["samples"] = 2
    maps, output = method.maps(model, x[:2], "predicted", **options)
    assert maps.shape == (2, 32, 32) and output.shape == (2, 10) and torch.isfinite(maps).all()
