"""Fast feed-forward style transfer (zoo.fast_style_network) against the optimisation
(style_transfer), on the held-out photos, at the same loss network, layers and weights.

    python benchmarks/bench_fast_style.py [--quick] [--no-write] [--weights PATH]

  For each shipped style (brick, stain) and the HELD-OUT photos of
  cnnviz_fast.zoo.train_fast_style (chelsea, coffee, rocket; never trained on), at 256x256:
  - optimisation: style_transfer(EfficientNet-Lite0, the photos, the style image at 256 px,
    content _blocks.8._act0, style _blocks.1._act0 _blocks.3._act0 _blocks.5._act1
    _blocks.8._act0, style_weight 10, its defaults: 200 L-BFGS steps from the content),
    one call for the three photos, timed once (minutes);
  - feed-forward: stylize(photos, style), one forward pass, timed with torch.utils.benchmark.
  Rows: style loss and content loss of the feed-forward result over the optimisation's
  (mean over the photos, as style_transfer defines them; target <= 1.5x each), the weighted
  objective both minimise (information), and the time per image (target >= 100x).
  --quick: 128 px, one photo, 5 L-BFGS steps (a smoke run, written as fast-style-quick).

Before timing: style_losses at the content image equals style_transfer's loss at its first
step (same definitions). Pictures: benchmarks/results/fast-style-held-out.png (rows: photo,
optimisation, feed-forward per style).
Results: benchmarks/results/fast-style-<machine>.{md,json}.
"""
from __future__ import annotations

import os
import time

import torch
import torch.utils.benchmark as tb

from common import RESULTS_DIR, argument_parser, row, write_results

from cnnviz_fast import synthesis, zoo
from cnnviz_fast.pictures import image_grid, save_png
from cnnviz_fast.synthesis.fast_style import StyleNetwork, style_losses
from cnnviz_fast.zoo import train_fast_style as recipe


def loss_row(name: str, fast: float, optimised: float, target: str = "") -> dict:
    """A row of losses (unitless) in the harness's schema: ratio = feed-forward / optimisation."""
    ratio = fast / optimised
    result = "" if not target else "PASS" if ratio <= float(target.strip("<= x")) else "MISS"
    print(f"{name:66s} fast {fast:9.4g} | optimisation {optimised:9.4g} | ratio {ratio:6.3g}"
          + (f" (target {target}: {result})" if target else ""), flush=True)
    return {"name": name, "ours": fast, "anchor": optimised, "unit": "loss", "ratio": ratio, "target": target,
            "result": result}


def _load(path: str) -> StyleNetwork:
    """A StyleNetwork file, or a training checkpoint of train_style_network (its network)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    return StyleNetwork.from_checkpoint(data.get("network", data)).eval()


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--weights", help="a StyleNetwork checkpoint instead of the shipped one")
    args = parser.parse_args()
    size, steps = (128, 5) if args.quick else (256, 200)
    load = os.getloadavg()[0]
    model = zoo.efficientnet_lite0().to(args.device)
    normalize = zoo.EFFICIENTNET_LITE0_NORMALIZE.to(args.device)
    network = zoo.fast_style_network() if not args.weights else \
        _load(args.weights)
    network = network.to(args.device)
    photos = recipe.held_out_photos(size)
    names = list(photos)[:1] if args.quick else list(photos)
    content = torch.cat([photos[n] for n in names]).to(args.device)
    styles = recipe.style_images()
    layers = list(recipe.STYLE_LAYERS)
    rows, pictures, per_photo = [], [content.cpu()], []
    for style_name in network.styles:
        style = styles[style_name].to(args.device)
        measure = dict(normalize=normalize)
        # same definitions: at the content image (the optimisation's start) the content loss is 0
        # and the objective is style_weight x the style loss
        start_content, start_style = style_losses(model, content, content, style, recipe.CONTENT_LAYER, layers,
                                                  **measure)
        started = time.perf_counter()
        optimised = synthesis.style_transfer(model, content, style, recipe.CONTENT_LAYER, layers, normalize=normalize,
                                             style_weight=recipe.STYLE_WEIGHT, steps=steps, progress=False)
        optimise_seconds = time.perf_counter() - started
        first = optimised.history[0].to(start_style)
        assert float(start_content.abs().max()) == 0.0
        torch.testing.assert_close(first, recipe.STYLE_WEIGHT * start_style, rtol=1e-4, atol=0)

        fast = synthesis.stylize(content, style_name, network)
        timer = tb.Timer("stylize(content, style, network)", globals={
            "stylize": synthesis.stylize, "content": content, "style": style_name, "network": network})
        fast_seconds = min(timer.timeit(3).mean for _ in range(5))

        opt_c, opt_s = style_losses(model, optimised.images, content, style, recipe.CONTENT_LAYER, layers, **measure)
        fast_c, fast_s = style_losses(model, fast, content, style, recipe.CONTENT_LAYER, layers, **measure)
        for i, name in enumerate(names):
            per_photo.append(f"{style_name} / {name}: style {float(fast_s[i]):.3g} vs {float(opt_s[i]):.3g}, "
                             f"content {float(fast_c[i]):.3g} vs {float(opt_c[i]):.3g}")
            print("  " + per_photo[-1], flush=True)
        where = f"{style_name}, {len(names)} held-out photos at {size}x{size}"
        rows.append(loss_row(f"style loss, feed-forward / optimisation ({where})", float(fast_s.mean()),
                             float(opt_s.mean()), "<= 1.5x"))
        rows.append(loss_row(f"content loss, feed-forward / optimisation ({where})", float(fast_c.mean()),
                             float(opt_c.mean()), "<= 1.5x"))
        weight = recipe.STYLE_WEIGHT
        rows.append(loss_row(f"objective content + {weight:g} x style, feed-forward / optimisation ({where})",
                             float((fast_c + weight * fast_s).mean()), float((opt_c + weight * opt_s).mean())))
        rows.append(row(f"time per image, stylize vs style_transfer ({steps} L-BFGS steps; {where})",
                        fast_seconds / len(names), optimise_seconds / len(names), ">= 100x", unit="ms"))
        pictures += [optimised.images.cpu(), fast.cpu()]
    if not args.no_write and not args.quick:  # 128 px tiles: a small file to commit
        shown = torch.nn.functional.interpolate(torch.cat(pictures), size=(128, 128), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
        save_png(image_grid(shown, nrow=len(names), scale=False),
                 os.path.join(args.results_dir or RESULTS_DIR, "fast-style-held-out.png"))
    notes = (f"Shipped network: {sum(p.numel() for p in network.parameters())} parameters, styles "
             f"{', '.join(network.styles)} (trained by cnnviz_fast.zoo.train_fast_style, "
             f"{recipe.TRAIN_STEPS} Adam steps of 4 crops at 128 px, on "
             f"{', '.join(recipe.TRAIN_PHOTOS)}); held out: {', '.join(names)}. Losses as style_transfer defines them "
             f"(relative to their targets; ratio = feed-forward / optimisation, lower is better for the "
             f"feed-forward network). The optimisation is timed once over its whole run (all photos in one call), "
             f"stylize with torch.utils.benchmark (min of 5 rounds of 3 calls). 1-min load average at start: "
             f"{load:.2f} (a machine shared with other sessions). Per photo (feed-forward vs optimisation): "
             + "; ".join(per_photo) + ". Pictures: fast-style-held-out.png (rows: photos, then per style the "
             "optimisation and the feed-forward result).")
    timing = ("style_transfer: one run timed with time.perf_counter (its whole optimisation, divided by the "
              "photos); stylize: torch.utils.benchmark.Timer, the minimum over 5 rounds of the mean of 3 calls")
    missed = [r["name"] for r in rows if r.get("result") == "MISS"]
    print("all targets met" if not missed else f"targets missed: {missed}", flush=True)
    if not args.no_write:
        path = write_results("fast-style" + ("-quick" if args.quick else ""), rows, notes,
                             "Fast feed-forward style transfer vs optimisation", directory=args.results_dir,
                             timing=timing)
        print("wrote", path, flush=True)


if __name__ == "__main__":
    main()
