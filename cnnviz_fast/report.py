"""A static, self-contained HTML report (PNG files next to ``report.html``, relative links,
no network): :class:`Report` collects sections; :func:`model_sections` adds every method
of the package for one image classifier and a few images (``cnnviz report``, and the
ImageNet part of ``cnnviz demo``).

Each section says in one sentence what it shows and with which parameters; a section
that fails shows its error and the others still run.
"""
from __future__ import annotations

import html
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import attribution, features, ops, registry, synthesis
from .core import Normalize, get_layer
from .loading import class_names
from .pictures import colorize, heatmap_overlay, image_grid, save_png
from .registry import candidate_layers

# The sections of model_sections, in order (cnnviz report --sections); synthesis and
# feature methods name theirs in the registry.
SECTIONS = ("predictions", "attribution", "class_visualization", "adversarial", "inversion", "dream",
            "texture_style", "filters", "activations")


@dataclass
class Section:
    title: str
    summary: str = ""
    pictures: List[Tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    notes: List[str] = field(default_factory=list)
    table: str = ""  # a Markdown table (as format_table writes it), an HTML table on the page
    # a picture table: column headers, then (row label, one picture file per column)
    grid_header: List[str] = field(default_factory=list)
    grid_rows: List[Tuple[str, List[str]]] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""


class Report:
    """Sections written as PNGs into ``out``; :meth:`write` renders report.html / report.md."""

    def __init__(self, out: Path, quick: bool = False, progress: bool = True):
        self.out, self.quick, self.progress = Path(out), quick, progress
        self.sections: List[Section] = []
        self.start = time.perf_counter()

    def steps(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def save(self, section: Section, name: str, image: torch.Tensor, caption: str = "", upscale: int = 1) -> None:
        path = save_png(image, self.out / name, upscale=upscale)
        section.pictures.append((path.name, caption))

    def tick(self, what: str, done: int, total: int, started: float) -> None:
        """A progress line with an estimate of the time left (on stdout when ``progress``)."""
        if self.progress and done and total:
            elapsed = time.perf_counter() - started
            print(f"  {what}: {done}/{total}, ~{elapsed / done * (total - done):.0f} s left", flush=True)

    def run(self, title: str, body: Callable[[Section], None]) -> Section:
        section = Section(title)
        start = time.perf_counter()
        try:
            body(section)
        except Exception:  # the report says which method failed and why; the rest still runs
            section.error = traceback.format_exc()
        section.seconds = time.perf_counter() - start
        self.sections.append(section)
        if self.progress:
            print(f"[{'FAILED' if section.error else 'ok':>6}] {title} ({section.seconds:.1f} s)", flush=True)
        return section

    @property
    def failed(self) -> List[str]:
        return [s.title for s in self.sections if s.error]

    def write(self, title: str, intro: str) -> Path:
        total = time.perf_counter() - self.start
        kernels = "compiled C++ kernels" if ops.has_extension() else "pure-PyTorch reference ops"
        intro = f"{intro} {kernels}; total {total:.1f} s{' (--quick)' if self.quick else ''}."
        md = [f"# {title}\n", intro + "\n"]
        page = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
                f"<title>{html.escape(title)}</title>",
                "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em}"
                "figure{display:inline-block;margin:6px;vertical-align:top}"
                "img{max-width:100%;border:1px solid #ccc;image-rendering:pixelated}"
                "figcaption{font-size:.85em;color:#444;max-width:1100px}.summary{font-style:italic}"
                "pre{color:#a00;white-space:pre-wrap}table{border-collapse:collapse}"
                "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
                ".strip td,.strip th{padding:2px;text-align:center;font-size:.8em}.strip img{width:96px}"
                "</style></head><body>",
                f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p><ul>"]
        page += [f"<li><a href='#s{i}'>{html.escape(s.title)}</a>{' (FAILED)' if s.error else ''}</li>"
                 for i, s in enumerate(self.sections)]
        page.append("</ul>")
        for index, s in enumerate(self.sections):
            md.append(f"## {s.title} ({s.seconds:.1f} s){' FAILED' if s.error else ''}\n")
            page.append(f"<h2 id='s{index}'>{html.escape(s.title)} <small>({s.seconds:.1f} s)</small></h2>")
            if s.summary:
                md.append(f"*{s.summary}*\n")
                page.append(f"<p class='summary'>{html.escape(s.summary)}</p>")
            for note in s.notes:
                md.append(f"- {note}")
                page.append(f"<p>{html.escape(note)}</p>")
            if s.table:
                md.append(f"\n{s.table}\n")
                page.append(_html_table(s.table))
            if s.grid_header:
                md.append("\n| " + " | ".join(s.grid_header) + " |\n|" + "---|" * len(s.grid_header))
                md += ["| " + label + " | " + " | ".join(f"![]({p})" if p else "" for p in files) + " |"
                       for label, files in s.grid_rows]
                page.append("<table class='strip'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.grid_header)
                            + "</tr>" + "".join(
                                f"<tr><th>{html.escape(label)}</th>" + "".join(
                                    f"<td><img src='{html.escape(p)}' alt='{html.escape(h)}'></td>" if p else "<td></td>"
                                    for p, h in zip(files, s.grid_header[1:])) + "</tr>"
                                for label, files in s.grid_rows) + "</table>")
            for picture, caption in s.pictures:
                md.append(f"\n![{caption or picture}]({picture})")
                page.append(f"<figure><img src='{html.escape(picture)}' alt='{html.escape(caption or picture)}'>"
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            if s.error:
                md.append(f"\n```\n{s.error}```")
                page.append(f"<pre>{html.escape(s.error)}</pre>")
            md.append("")
        page.append("</body></html>")
        (self.out / "report.md").write_text("\n".join(md), encoding="utf-8")
        report = self.out / "report.html"
        report.write_text("\n".join(page), encoding="utf-8")
        return report


def _html_table(markdown: str) -> str:
    """A Markdown table (header, ``|---|`` rule, rows) as an HTML table."""
    rows = [[html.escape(cell.strip()) for cell in line.strip().strip("|").split("|")]
            for line in markdown.strip().splitlines()]
    head, body = rows[0], rows[2:]
    return ("<table><tr>" + "".join(f"<th>{cell}</th>" for cell in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in body) + "</table>")


def _pick(layers: Sequence[str], fractions: Sequence[float]) -> List[str]:
    picked = [layers[min(len(layers) - 1, round(f * (len(layers) - 1)))] for f in fractions]
    return list(dict.fromkeys(picked))


def _label(names: Sequence[str], index: int, prob: Optional[float] = None) -> str:
    return f"{names[index]} ({index})" + (f" {prob:.0%}" if prob is not None else "")


def model_sections(report: Report, model: nn.Module, normalize: Normalize, pixels: torch.Tensor,
                   names: Sequence[str], classes: Optional[Sequence[str]] = None, title: str = "model",
                   layers: Optional[Sequence[str]] = None, visualize_classes: Optional[Sequence[int]] = None,
                   seed: int = 0, max_images: Optional[int] = None, prefix: str = "",
                   sections: Optional[Sequence[str]] = None, methods: Optional[Sequence[str]] = None) -> None:
    """Every method of the package for an image classifier: the registry's attribution
    methods side by side, class visualization, adversarial examples, feature inversion from
    several depths, DeepDream, texture synthesis and style transfer, first-layer filters.

    ``pixels``: ``[M, C, H, W]`` in [0, 1] (the first ``max_images`` are explained; default:
    all); ``classes``: class names (default from the output size); ``layers``: the layers for
    inversion/dream/texture/style (default: picked along the depth); ``visualize_classes``:
    classes to visualize (default: the images' predictions); ``sections``: which of
    :data:`SECTIONS` (default: all); ``methods``: the attribution methods shown (default:
    every registered one with ``report=True``). Picture files start with ``prefix``."""
    sections = list(SECTIONS) if sections is None else list(sections)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise ValueError(f"sections must be some of {', '.join(SECTIONS)}, got {', '.join(unknown)}")
    shown_methods = [m for m in registry.attribution_methods() if registry.get_method(m).report] \
        if methods is None else [registry.get_method(m, "methods").name for m in methods]
    for layer in layers or ():
        get_layer(model, layer, "layers")  # a ValueError naming the closest layers, before any work
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
    model = model.eval()
    device = next((p.device for p in model.parameters()), pixels.device)
    pixels = pixels[:max_images].to(device)
    names = list(names)[:max_images]
    inputs = normalize(pixels)
    shown = pixels.cpu()  # pictures are drawn on the CPU
    with torch.no_grad():
        probs = model(inputs).softmax(1)
    labels = class_names(classes, probs.shape[1])
    confidence, predicted = probs.max(1)
    found = candidate_layers(model, inputs)
    all_layers = [n for n, _ in found]
    spatial = [n for n, s in found if s[-1] > 1]
    chosen = list(layers) if layers else _pick(spatial, (0.15, 0.4, 0.65)) if spatial else []
    size = pixels.shape[-1]
    small = min(size, 64 if report.quick else 128)  # synthesis resolution: CPU time grows with pixels
    channels = pixels.shape[1]

    def small_pixels(x):
        return torch.nn.functional.interpolate(x, size=(small, small), mode="bilinear", antialias=True,
                                               align_corners=False).clamp(0, 1)

    def predictions(s):
        s.summary = (f"{title} classifies each image ({size}×{size} px); top-1 class and probability "
                     "(the target of the attributions below).")
        s.notes += [f"{name}: {_label(labels, int(p), float(c))}" for name, p, c in zip(names, predicted, confidence)]
        if all_layers:
            s.notes.append(f"{len(all_layers)} layers with image-shaped outputs, e.g. {', '.join(all_layers[:3])} … "
                           f"{all_layers[-1]}; inversion/dream/texture use {chosen}")

    def attributions(s):
        y = predicted
        s.summary = ("Which pixels matter for the predicted class: one row per image, one column per registered "
                     "attribution method (options below). Each map is drawn with the colour scale shown, low → high "
                     "per picture: maps of one sign (CAMs, magnitudes) from their minimum to their maximum, signed "
                     "maps by |value|.")
        s.grid_header = ["image"] + shown_methods
        report.save(s, f"{prefix}colour-scale.png", _colour_scale(), "colour scale: low (left) → high (right)")
        columns = {}
        started = time.perf_counter()
        for done, name in enumerate(shown_methods):
            method = registry.get_method(name)
            options = _report_options(method, size, report)
            layer, note = registry.resolve_layer(method, model, inputs)
            try:
                maps, _ = method.maps(model, inputs, y, layer, **options)
            except ValueError as error:  # e.g. guided backprop on SiLU networks: say why, go on
                s.notes.append(f"{name}: not shown ({str(error).splitlines()[0]})")
                columns[name] = None
                continue
            described = ", ".join(f"{k}={v}" for k, v in options.items())
            s.notes.append(f"{name}: {method.summary}" + (f" [{described}]" if described else "")
                           + (f"; layer {layer}" if layer else ""))
            columns[name] = maps.detach().float().cpu()
            report.tick("attribution methods", done + 1, len(shown_methods), started)
        grabcut = None
        if columns.get("grad_cam") is not None:
            try:  # saliency → segmentation: GrabCut seeded from the Grad-CAM map
                grabcut = attribution.saliency_to_mask(shown.expand(-1, 3, -1, -1), columns["grad_cam"]).cpu()
                s.grid_header.append("GrabCut from grad_cam")
            except ImportError as error:
                s.notes.append(f"GrabCut skipped: {error}")
        upscale = max(1, 96 // size)
        for index, image_name in enumerate(names):
            files = [f"{prefix}attribution-{index}-image.png"]
            save_png(shown[index].expand(3, -1, -1), report.out / files[0], upscale=upscale)
            for name in shown_methods:
                if columns[name] is None:
                    files.append("")
                    continue
                file = f"{prefix}attribution-{index}-{name}.png"
                save_png(heatmap_overlay(shown[index], _unit_map(columns[name][index])), report.out / file,
                         upscale=upscale)
                files.append(file)
            if grabcut is not None:
                file = f"{prefix}attribution-{index}-grabcut.png"
                save_png(shown[index].expand(3, -1, -1) * (0.25 + 0.75 * grabcut[index][None].float()),
                         report.out / file, upscale=upscale)
                files.append(file)
            s.grid_rows.append((f"{image_name}: {_label(labels, int(y[index]), float(confidence[index]))}", files))

    def class_visualization(s):
        targets = list(visualize_classes) if visualize_classes else list(dict.fromkeys(predicted.tolist()))[:4]
        steps = report.steps(128, 6)
        s.summary = (f"Images that maximise a class score ({steps} Adam steps at {small}×{small} px, Fourier "
                     "parameterization, jitter, scale 0.8–1.2 and ±15° rotation as regularizers): "
                     + ", ".join(_label(labels, t) for t in targets) + ".")
        result = synthesis.visualize_class(model, targets, (channels, small, small), normalize=normalize,
                                           steps=steps, lr=0.05, seed=seed, progress=report.progress)
        with torch.no_grad():
            reached = model(normalize(result.images.to(device))).softmax(1)
        for index, target in enumerate(targets):
            report.save(s, f"{prefix}class-{target}.png", result.images[index].cpu(),
                        f"{_label(labels, target)}: model probability {float(reached[index, target]):.2f}",
                        upscale=max(1, 128 // small))

    def adversarial(s):
        eps, steps = 2 / 255, report.steps(10, 2)
        s.summary = (f"Untargeted PGD (L∞ ε = 2/255, {steps} steps) against the predicted class: clean image, "
                     "adversarial image, perturbation ×50 around grey, with the model's labels.")
        result = synthesis.adversarial(model, pixels, predicted, "pgd", eps=eps, steps=steps, normalize=normalize,
                                       seed=seed, progress=report.progress)
        with torch.no_grad():
            adv_probs = model(normalize(result.images.to(device))).softmax(1)
        for index, name in enumerate(names):
            after = int(result.predictions[index])
            adv = result.images[index].cpu()
            delta = (0.5 + 50 * (adv - shown[index])).clamp(0, 1)
            report.save(s, f"{prefix}adversarial-{index}-{name}.png",
                        image_grid([shown[index], adv, delta], nrow=3, scale=False),
                        f"{name}: {_label(labels, int(predicted[index]), float(confidence[index]))} → "
                        f"{_label(labels, after, float(adv_probs[index, after]))}", upscale=max(1, 96 // size))
        s.notes.append(f"attack success: {float(result.success.float().mean()):.0%}; "
                       f"L∞ {float(result.linf.max()) * 255:.2f}/255")

    def inversion(s):
        steps = report.steps(150, 5)
        s.summary = (f"Feature inversion: an image whose activations at a layer match those of the photo "
                     f"({steps} Adam steps at {small}×{small} px, total-variation and α-norm regularizers), "
                     f"from shallow to deep: {', '.join(chosen)}.")
        x = small_pixels(pixels[:2])
        rows = [x.cpu()]
        for layer in chosen:
            result = synthesis.invert_features(model, x, layer, normalize=normalize, steps=steps, seed=seed,
                                               progress=report.progress)
            rows.append(result.images.cpu())
            s.notes.append(f"{layer}: relative feature error "
                           f"{', '.join(f'{float(e):.2f}' for e in result.relative_error)}")
        report.save(s, f"{prefix}inversion.png", image_grid(torch.cat(rows), nrow=len(x), scale=False),
                    "rows: original, then one row per layer, shallow to deep", upscale=max(1, 128 // small))

    def dream(s):
        layer = chosen[len(chosen) // 2]
        steps = report.steps(10, 2)
        s.summary = (f"DeepDream: gradient ascent on the activations of {layer} from the photo "
                     f"({steps} steps per octave, 3 octaves, at {small}×{small} px).")
        image = small_pixels(pixels[:1])
        result = synthesis.deep_dream(model, image, layer, normalize=normalize, steps=steps, seed=seed,
                                      progress=report.progress)
        report.save(s, f"{prefix}deep-dream.png", image_grid(torch.cat([image.cpu(), result.images.cpu()]), nrow=2,
                                                              scale=False), "photo | dream", upscale=max(1, 256 // small))

    gram = [None]  # the Gram synthesis of texture_and_style, shown again beside the traditional methods

    def texture_and_style(s):
        style_layers = _pick(spatial, (0.05, 0.2, 0.35, 0.5)) if not layers else list(layers)
        content_layer = style_layers[-1]
        steps = report.steps(60, 3)
        texture, content = small_pixels(pixels[-1:]), small_pixels(pixels[:1])
        s.summary = (f"Texture synthesis (Gram matrices of {', '.join(style_layers)}, {steps} L-BFGS steps at "
                     f"{small}×{small} px) from the last image, and style transfer of the first image in its "
                     f"style (content layer {content_layer}).")
        made = gram[0] = synthesis.synthesize_texture(model, texture, style_layers, normalize=normalize, steps=steps,
                                            seed=seed, progress=report.progress)
        started = time.perf_counter()
        styled = synthesis.style_transfer(model, content, texture, content_layer, style_layers, normalize=normalize,
                                          steps=steps, style_weight=10.0, seed=seed, progress=report.progress)
        optimised = time.perf_counter() - started
        report.save(s, f"{prefix}texture-and-style.png",
                    image_grid(torch.cat([texture.cpu(), made.images.cpu(), content.cpu(), styled.images.cpu()]), nrow=4,
                               scale=False), "texture | synthesized | content | content in the texture's style "
                    f"(style transfer: {optimised:.2g} s)", upscale=max(1, 128 // small))
        if channels == 3 and size >= 16:  # one forward pass: at the photo's own size
            _fast_style(report, s, pixels[:1], optimised, steps, prefix, upscale=max(1, 128 // size))

    def filters(s):
        first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            s.notes.append("no nn.Conv2d layer")
            return
        weight = model.get_submodule(first).weight
        s.summary = (f"The filters of the first convolution {first} ({weight.shape[0]} filters "
                     f"{weight.shape[2]}×{weight.shape[3]}), each min-max scaled.")
        report.save(s, f"{prefix}filters.png", features.filter_grid(model, first), first, upscale=8)

    def texture_with_and_without_network(s):
        """texture_and_style, then the traditional approach beside the Gram synthesis: no network,
        pixels copied from the source (Efros-Leung at half the side: its time grows with output
        pixels x source windows)."""
        texture_and_style(s)
        texture = small_pixels(pixels[-1:])
        patch, half = max(3, min(48, small // 4)), max(8, small // 2)
        window = min(11, half if half % 2 else half - 1)
        quilted = synthesis.texture_quilt(texture, small, patch=patch, seed=seed)
        grown = synthesis.texture_efros_leung(torch.nn.functional.interpolate(texture, size=half, mode="area"),
                                              half, window=window, seed=seed)
        grown = torch.nn.functional.interpolate(grown, size=small, mode="nearest")
        s.notes.append(f"Without a network, from the same texture: image quilting (Efros & Freeman 2001, patches "
                       f"{patch} px, minimum-error cuts) and non-parametric sampling (Efros & Leung 1999, window "
                       f"{window}, at {half} px, shown enlarged): every pixel copied from the source.")
        report.save(s, f"{prefix}texture.png",
                    image_grid(torch.cat([texture.cpu(), gram[0].images.cpu(), quilted.cpu(), grown.cpu()]), nrow=4,
                               scale=False), "source | Gram synthesis | image quilting | Efros–Leung",
                    upscale=max(1, 128 // small))

    def activations(s):
        layer = chosen[-1]
        result = features.activation_grid(model, inputs[:2], layer, top_k=64)
        tiles = result.tiles.shape
        s.summary = (f"The feature maps of {layer} for the first images ({tiles[2]}×{tiles[3]} each): its {tiles[1]} "
                     f"channels of largest mean activation, by decreasing mean, each min-max scaled (the "
                     f"deep-visualization toolbox's view), next to the filters above.")
        for index in range(len(result.grids)):
            report.save(s, f"{prefix}activations-{index}.png", result.grids[index],
                        f"{names[index]}: channels {', '.join(map(str, result.channels[index, :8].tolist()))} …",
                        upscale=max(1, 256 // result.grids.shape[-1]))

    bodies = {"predictions": ("predictions", predictions),
              "attribution": ("which pixels matter (attribution side by side)", attributions),
              "class_visualization": ("class visualization", class_visualization),
              "adversarial": ("adversarial examples", adversarial),
              "inversion": ("feature inversion from several depths", inversion),
              "dream": ("DeepDream", dream),
              "texture_style": ("texture synthesis and style transfer", texture_with_and_without_network),
              "filters": ("first-layer filters", filters),
              "activations": ("activations of a layer", activations)}
    for key in sections:
        if key in ("inversion", "dream", "texture_style", "activations") and not chosen:
            continue  # no layer with a spatial output to work on
        heading, body = bodies[key]
        report.run(f"{title}: {heading}", body)


def _fast_style(report: Report, s: Section, content: torch.Tensor, optimised: float, steps: int, prefix: str,
                upscale: int) -> None:
    """Feed-forward style transfer beside the optimisation: the content in each style of
    the shipped network (:func:`cnnviz_fast.zoo.fast_style_network`), one forward pass."""
    from .zoo import fast_style_network  # the network ships with the zoo, loaded only here

    network = fast_style_network()
    content = content.cpu()
    batch, styles = content.expand(len(network.styles), -1, -1, -1), list(range(len(network.styles)))
    timings = []
    for _ in range(3):  # the first call of a shape pays for the convolutions' set-up: the best of three
        started = time.perf_counter()
        fast = synthesis.stylize(batch, styles, network)
        timings.append((time.perf_counter() - started) / len(styles))
    seconds = min(timings)
    s.notes.append(f"fast style transfer (Johnson et al. 2016, one network for {len(network.styles)} styles by "
                   f"conditional instance norm): {seconds * 1000:.0f} ms per image at {content.shape[-1]} px on the "
                   f"CPU, against {optimised:.2g} s for the optimisation above ({steps} L-BFGS steps at a smaller "
                   "size, in the texture's style)")
    report.save(s, f"{prefix}fast-style.png", image_grid(torch.cat([content, fast]), nrow=len(fast) + 1, scale=False),
                f"content | feed-forward in the shipped styles: {', '.join(network.styles)} "
                f"({seconds * 1000:.0f} ms per image, one forward pass)", upscale=upscale)


def _report_options(method, size: int, report: Report) -> dict:
    """The method's report settings; occlusion's window follows the image size."""
    options = dict(method.report_options)
    if method.name == "occlusion":
        window = max(2, size // report.steps(7, 4))
        options.update(window=window, stride=max(1, window // report.steps(2, 1)))
    if report.quick:
        for name, quick in (("samples", 4), ("steps", 4), ("masks", 200)):
            if name in method.defaults() or name in options:
                options[name] = min(options.get(name, quick), quick)
    return options


def _unit_map(heatmap: torch.Tensor) -> torch.Tensor:
    """A map for drawing: magnitudes of signed maps, then scaled to [0, 1] per picture."""
    heatmap = heatmap.abs() if float(heatmap.min()) < 0 else heatmap
    low, high = float(heatmap.min()), float(heatmap.max())
    return (heatmap - low) / (high - low) if high > low else torch.zeros_like(heatmap)


def _colour_scale() -> torch.Tensor:
    return colorize(torch.linspace(0, 1, 256).expand(12, -1))
