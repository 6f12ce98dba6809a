"""``cnnviz demo``: every method of the package on the embedded default, in one command.

The digits CNN of the zoo (trained by the project, shipped with the package) and
scikit-learn's digits and sample photos; a random-weight VGG for textures and style.
Writes one PNG per method and ``report.html`` / ``report.md`` (pictures, timings and
the numbers each method is judged by) into the output folder.
"""
from __future__ import annotations

import html
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import torch

from . import attribution, features, ops, synthesis, zoo
from .core import Neuron
from .pictures import colorize, heatmap_overlay, image_grid, save_png


@dataclass
class Section:
    title: str
    pictures: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""


class Demo:
    def __init__(self, out: Path, quick: bool):
        self.out, self.quick = out, quick
        self.model = zoo.digits_cnn()
        self.normalize = zoo.DIGITS_NORMALIZE
        pixels, labels = zoo.digits("all")
        self.pixels, self.labels = pixels, labels
        self.inputs = self.normalize(pixels)
        # one test digit of each class
        first = [int((labels == c).nonzero()[0]) for c in range(10)]
        self.sample_pixels = pixels[first]
        self.sample_labels = labels[first]
        self.sections: List[Section] = []

    def steps(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def save(self, section: Section, name: str, image: torch.Tensor, upscale: int = 1) -> None:
        path = save_png(image, self.out / name, upscale=upscale)
        section.pictures.append(path.name)

    def run(self, title: str, body: Callable[[Section], None]) -> None:
        section = Section(title)
        start = time.perf_counter()
        try:
            body(section)
        except Exception:  # the report says which method failed and why; the rest still runs
            section.error = traceback.format_exc()
        section.seconds = time.perf_counter() - start
        self.sections.append(section)
        status = "FAILED" if section.error else "ok"
        print(f"[{status:>6}] {title} ({section.seconds:.1f} s)", flush=True)

    # --- filters and features ------------------------------------------------------
    def filters(self, s: Section) -> None:
        self.save(s, "filters-conv1.png", features.filter_grid(self.model, "features.conv1"), upscale=8)
        self.save(s, "filters-conv2.png", features.filter_grid(self.model, "features.conv2"), upscale=4)
        s.notes.append("conv1: 16 filters 3×3 (grayscale input); conv2: one row per filter, "
                       "one grayscale tile per input channel")

    def feature_space(self, s: Section) -> None:
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
        s.pictures.append("pca.png")
        subset = slice(None) if not self.quick else slice(0, 600)
        tsne = features.embed(feats[subset], "tsne")
        features.plot_embedding(tsne, self.labels[subset], path=self.out / "tsne.png", title="t-SNE of fc1 features")
        features.plot_embedding(tsne, images=self.pixels[subset], path=self.out / "tsne-thumbnails.png")
        s.pictures += ["tsne.png", "tsne-thumbnails.png"]

    def patches(self, s: Section) -> None:
        rf = features.receptive_field(self.model, (1, 32, 32), "features.conv4")
        top = features.max_activating_patches(self.model, self.inputs, "features.conv4", channels=range(8), k=8,
                                              guided=True, progress=False)
        self.save(s, "max-patches-conv4.png", features.patch_grid(top, inverse=self.normalize.inverse), upscale=3)
        s.notes.append(f"conv4 receptive field: {rf}; per channel the 8 strongest patches (left) and their "
                       "guided backprop (right)")

    # --- which pixels matter ---------------------------------------------------------
    def attributions(self, s: Section) -> None:
        x, y = self.normalize(self.sample_pixels), self.sample_labels
        methods = {
            "saliency": lambda: attribution.saliency(self.model, x, y),
            "smoothgrad": lambda: attribution.smoothgrad(self.model, x, y, samples=self.steps(50, 10)),
            "integrated gradients": lambda: attribution.integrated_gradients(self.model, x, y, steps=self.steps(64, 16)),
            "guided backprop": lambda: attribution.guided_backprop(self.model, x, y),
            "deconvnet": lambda: attribution.deconvnet(self.model, x, y),
            "grad-cam (conv4)": lambda: attribution.grad_cam(self.model, x, "features.conv4", y),
            "guided grad-cam": lambda: attribution.guided_grad_cam(self.model, x, "features.conv4", y),
            "occlusion 6×6/2": lambda: attribution.occlusion(self.model, x, y, window=(6, 6), stride=(2, 2)),
        }
        rows = [self.sample_pixels.expand(-1, 3, -1, -1)]
        for name, method in methods.items():
            start = time.perf_counter()
            maps = method()
            maps = maps.abs().amax(1) if maps.dim() == 4 else maps
            rows.append(torch.stack([colorize(m) for m in maps]))
            s.notes.append(f"row {len(rows)}: {name} ({time.perf_counter() - start:.2f} s for 10 digits)")
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
        result = synthesis.visualize_class(self.model, list(range(10)), (1, 32, 32), normalize=self.normalize,
                                           steps=self.steps(200, 40), progress=False)
        with torch.no_grad():
            probs = self.model(self.normalize(result.images)).softmax(1).diagonal()
        self.save(s, "class-visualization.png", image_grid(result.images, nrow=10), upscale=4)
        s.notes.append("model probability of the intended class: " + ", ".join(f"{p:.2f}" for p in probs))
        neurons = synthesis.visualize_neuron(self.model, [Neuron("features.conv5", c) for c in range(8)],
                                             (1, 32, 32), normalize=self.normalize, steps=self.steps(150, 30),
                                             progress=False)
        self.save(s, "neuron-visualization.png", image_grid(neurons.images, nrow=8), upscale=4)
        s.notes.append("neuron-visualization.png: conv5 channels 0-7")

    def adversarial(self, s: Section) -> None:
        x, y = self.sample_pixels, self.sample_labels
        result = synthesis.adversarial(self.model, x, y, "pgd", eps=8 / 255, normalize=self.normalize,
                                       progress=False)
        perturbation = (result.images - x)
        self.save(s, "adversarial-pgd.png", image_grid(torch.cat([x, result.images, perturbation]), nrow=10),
                  upscale=3)
        s.notes.append(f"PGD ε=8/255 untargeted: success {float(result.success.float().mean()):.0%}, "
                       f"predictions {result.predictions.tolist()} (true {y.tolist()})")
        fooled = synthesis.adversarial(self.model, x, (y + 1) % 10, "ascent", targeted=True,
                                       normalize=self.normalize, progress=False)
        s.notes.append(f"gradient ascent toward (label+1) mod 10: success {float(fooled.success.float().mean()):.0%}")

    def inversion(self, s: Section) -> None:
        x = self.sample_pixels[:5]
        rows = [x]
        for layer in ("features.relu2", "features.relu4"):
            result = synthesis.invert_features(self.model, x, layer, normalize=self.normalize,
                                               steps=self.steps(300, 60), progress=False)
            rows.append(result.images)
            s.notes.append(f"{layer}: relative feature error {[round(float(e), 3) for e in result.relative_error]}")
        self.save(s, "inversion.png", image_grid(torch.cat(rows), nrow=5), upscale=4)

    def dream(self, s: Section) -> None:
        image = zoo.sample_images(size=96)["china"]
        vgg = zoo.vgg("vgg11", width_divisor=4)
        result = synthesis.deep_dream(vgg, image, "features.10", normalize=zoo.IMAGENET_NORMALIZE,
                                      steps=self.steps(20, 5), progress=False)
        self.save(s, "deep-dream.png", image_grid(torch.cat([image, result.images]), nrow=2, scale=False), upscale=2)
        s.notes.append("random-weight VGG-11 (¼ width), layer features.10")

    def textures(self, s: Section) -> None:
        photos = zoo.sample_images(size=64)
        vgg = zoo.vgg("vgg19", width_divisor=4)
        layers = ["features.1", "features.6", "features.11", "features.20"]
        texture = synthesis.synthesize_texture(vgg, photos["flower"], layers, (64, 64),
                                               normalize=zoo.IMAGENET_NORMALIZE, steps=self.steps(200, 30),
                                               progress=False)
        styled = synthesis.style_transfer(vgg, photos["china"], photos["flower"], "features.20", layers,
                                          normalize=zoo.IMAGENET_NORMALIZE, steps=self.steps(100, 10),
                                          progress=False)
        self.save(s, "texture-and-style.png", image_grid(torch.cat(
            [photos["flower"], texture.images, photos["china"], styled.images]), nrow=4, scale=False), upscale=2)
        s.notes.append("flower texture | synthesized texture | content | content in the flower's style "
                       f"(Gram loss on the {'compiled' if ops.has_extension() else 'reference'} operator)")


def _write_report(demo: Demo, total: float) -> Path:
    kernels = "compiled C++ kernels" if ops.has_extension() else "pure-PyTorch reference ops"
    md = [f"# cnnviz_fast demo\n", f"Embedded digits CNN; {kernels}; total {total:.1f} s.\n"]
    page = ["<!doctype html><meta charset='utf-8'><title>cnnviz_fast demo</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{image-rendering:pixelated;"
            "max-width:100%;margin:4px;border:1px solid #ccc}pre{color:#a00}</style>",
            f"<h1>cnnviz_fast demo</h1><p>Embedded digits CNN; {kernels}; total {total:.1f} s.</p>"]
    for s in demo.sections:
        md.append(f"## {s.title} ({s.seconds:.1f} s){' FAILED' if s.error else ''}\n")
        page.append(f"<h2>{html.escape(s.title)} <small>({s.seconds:.1f} s)</small></h2>")
        for note in s.notes:
            md.append(f"- {note}")
            page.append(f"<p>{html.escape(note)}</p>")
        for picture in s.pictures:
            md.append(f"\n![{picture}]({picture})")
            page.append(f"<img src='{picture}' alt='{picture}'>")
        if s.error:
            md.append(f"\n```\n{s.error}```")
            page.append(f"<pre>{html.escape(s.error)}</pre>")
        md.append("")
    (demo.out / "report.md").write_text("\n".join(md))
    report = demo.out / "report.html"
    report.write_text("\n".join(page))
    return report


def run_demo(out: Path, quick: bool = False) -> Path:
    """Run every method, write pictures and the report into ``out``; returns the HTML report's
    path. Raises RuntimeError naming the sections that failed (after writing the report)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    demo = Demo(out, quick)
    demo.run("First-layer and deeper filters", demo.filters)
    demo.run("Feature space: nearest neighbours, PCA, t-SNE", demo.feature_space)
    demo.run("Maximally activating patches", demo.patches)
    demo.run("Which pixels matter: attribution methods", demo.attributions)
    demo.run("Class and neuron visualization", demo.class_images)
    demo.run("Adversarial examples", demo.adversarial)
    demo.run("Feature inversion", demo.inversion)
    demo.run("DeepDream", demo.dream)
    demo.run("Texture synthesis and style transfer", demo.textures)
    report = _write_report(demo, time.perf_counter() - start)
    failed = [s.title for s in demo.sections if s.error]
    if failed:
        raise RuntimeError(f"demo sections failed: {failed}; see {report}")
    return report
