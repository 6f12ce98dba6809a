"""Texture synthesis without a network (issue 23): time of image quilting and Efros-Leung
sampling, and the acceptance numbers (nearest source patches against a random-noise and a
shuffled-tile baseline).

    python benchmarks/bench_texture.py [--quick] [--device cpu|cuda] [--no-write] [--only quilt,efros_leung,quality]

No anchor library implements these methods in PyTorch, so each timing row's anchor is a
plain implementation of the same algorithm:
  quilt        texture_quilt at 128 and 256 px from a 128 px source (patch 32, overlap 5); anchor:
               the same algorithm with the overlap errors of every source patch computed the plain
               way (all source patches unfolded, masked squared differences summed). Checked before
               timing: its error map of a placement equals ours (relative 1e-4).
  efros_leung  texture_efros_leung (window 11, 64 boundary pixels per step) at 64 px from a 64 px
               source, and at 128 px from 64 and 128 px sources; anchor: the paper's order, one pixel
               per step (batch=1), at 64 px (rows without an anchor repeat ours: ratio 1).
  quality      mean (and 90th percentile) distance of each 5 x 5 output patch to its nearest source
               patch, against a uniform-noise image and the source's tiles in random order (tiles of
               the quilting patch / the Efros-Leung window): brick, gravel and grass of scikit-image;
               quilting 256 px from 128 px, Efros-Leung 64 px from 128 px.
Results: benchmarks/results/texture-<machine>.{md,json}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import argument_parser, finish, interleaved, machine_description, row, synchronize

import cnnviz_fast as cv
from cnnviz_fast.synthesis import nonparametric as N

PATCH, OVERLAP, WINDOW = 32, 5, 11


def texture(name: str, size: int, device: str) -> torch.Tensor:
    """A scikit-image texture (gray, 512 px) reduced to ``size`` px: ``[1, size, size]``."""
    from skimage import data
    pixels = torch.from_numpy(getattr(data, name)()).float().div(255)[None, None]
    return F.interpolate(pixels, size=size, mode="area")[0].clamp(0, 1).to(device)


# --- the plain quilting anchor ----------------------------------------------------------------

def plain_errors(pixels, old, patch, overlap, left, top):
    """Overlap SSD of every source patch, the plain way: unfold them all, mask, sum."""
    patches = F.unfold(pixels[None], patch)[0].T.reshape(-1, pixels.shape[0], patch, patch)
    mask = torch.zeros(patch, patch, dtype=torch.bool, device=pixels.device)
    if left:
        mask[:, :overlap] = True
    if top:
        mask[:overlap, :] = True
    return ((patches - old[None]).square() * mask).sum((1, 2, 3))


def plain_quilt(source, size, patch, overlap, seed=0, tolerance=0.1):
    pixels = source
    c, h, w = pixels.shape
    generator = N.make_generator(seed)
    step = patch - overlap
    blocks = -(-(size - overlap) // step)
    canvas = pixels.new_zeros(c, blocks * step + overlap, blocks * step + overlap)
    cols = w - patch + 1
    for by in range(blocks):
        for bx in range(blocks):
            y, x = by * step, bx * step
            old = canvas[:, y:y + patch, x:x + patch]
            left, top = bx > 0, by > 0
            if left or top:
                errors = plain_errors(pixels, old, patch, overlap, left, top)
                scale = old[:, :, :overlap].square().sum() + old[:, :overlap, :].square().sum()
                chosen = int(N._pick_among(N._within(errors[None], tolerance, scale.reshape(1, 1)), generator))
            else:
                chosen = int(torch.randint((h - patch + 1) * cols, (1,), generator=generator))
            py, px = divmod(chosen, cols)
            new = pixels[:, py:py + patch, px:px + patch]
            keep = torch.ones(patch, patch, dtype=torch.bool, device=pixels.device)
            if left:
                keep &= N._cut_mask(old, new, overlap)
            if top:
                keep &= N._cut_mask(old.transpose(1, 2), new.transpose(1, 2), overlap).T
            canvas[:, y:y + patch, x:x + patch] = torch.where(keep, new, old)
    return canvas[None, :, :size, :size]


def check_errors_equal(source, device):
    """Our strip errors of one placement (left and top overlaps) against the plain ones."""
    made = cv.texture_quilt(source, 64, patch=PATCH, overlap=OVERLAP, seed=0)[0]
    old = made[:, 10:10 + PATCH, 12:12 + PATCH]  # any patch-sized block of a texture
    strips = N._StripErrors(source, PATCH)
    ours = strips(old[:, :OVERLAP, :]) + strips(old[:, OVERLAP:, :OVERLAP], dy=OVERLAP)
    plain = plain_errors(source, old, PATCH, OVERLAP, True, True).reshape(ours.shape)
    error = float((ours.double() - plain.double()).norm() / plain.double().norm())
    assert error < 1e-4, f"quilting overlap errors differ from the plain ones: {error:.2e}"
    return error


# --- sections ---------------------------------------------------------------------------------

def bench_quilt(rows, quick, device):
    source = texture("brick", 64 if quick else 128, device)
    error = check_errors_equal(source, device)
    print(f"overlap errors equal the plain ones (relative {error:.1e})", flush=True)
    for size in ((64, 128) if quick else (128, 256)):
        def ours():
            cv.texture_quilt(source, size, patch=PATCH, overlap=OVERLAP, seed=0)
            synchronize(device)

        def plain():
            plain_quilt(source, size, PATCH, OVERLAP, seed=0)
            synchronize(device)
        t = interleaved({"ours": ours, "plain": plain}, rounds=1 if quick else 2)
        rows.append(row(f"texture_quilt {size} px from {source.shape[-1]} px (patch {PATCH}) vs plain unfold",
                        t["ours"], t["plain"], "", unit="s"))


def bench_efros_leung(rows, quick, device):
    size = 32 if quick else 64
    source = texture("brick", size, device)

    def ours():
        cv.texture_efros_leung(source, size, window=WINDOW, seed=0)
        synchronize(device)

    def paper_order():
        cv.texture_efros_leung(source, size, window=WINDOW, seed=0, batch=1)
        synchronize(device)
    t = interleaved({"ours": ours, "batch1": paper_order}, rounds=1)
    rows.append(row(f"texture_efros_leung {size} px from {size} px (window {WINDOW}, batch 64) vs batch 1",
                    t["ours"], t["batch1"], "", unit="s"))
    big = 2 * size
    for source in (source, texture("brick", big, device)):
        def ours_big():
            cv.texture_efros_leung(source, big, window=WINDOW, seed=0)
            synchronize(device)
        t = interleaved({"ours": ours_big}, rounds=1)
        rows.append(row(f"texture_efros_leung {big} px from {source.shape[-1]} px (window {WINDOW}, batch 64)",
                        t["ours"], t["ours"], "", unit="s"))


QUALITY_ROWS = []


def bench_quality(rows, quick, device):
    """Acceptance numbers: ours / baseline of the mean nearest-source-patch distance."""
    src_q, out_q, src_e, out_e = (64, 96, 64, 32) if quick else (128, 256, 128, 64)
    for name in ("brick", "gravel", "grass"):
        for method in ("quilt", "efros-leung"):
            if method == "quilt":
                source = texture(name, src_q, device)
                made = cv.texture_quilt(source, out_q, patch=PATCH, overlap=OVERLAP, seed=0)
                tile, stride = PATCH, 2
            else:
                source = texture(name, src_e, device)
                made = cv.texture_efros_leung(source, out_e, window=WINDOW, seed=0)
                tile, stride = WINDOW, 1
            side = made.shape[-1]
            noise = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(0)).to(device)
            tiles = N.shuffled_tiles(source, side, tile, seed=0)
            ours, noisy, shuffled = (N.nearest_patch_distance(image, source, 5, stride=stride)
                                     for image in (made, noise, tiles))
            QUALITY_ROWS.append((name, method, f"{side} px from {source.shape[-1]} px", float(ours.mean()),
                                 float(noisy.mean()), float(shuffled.mean()), tile,
                                 float(ours.quantile(0.9)), float(shuffled.quantile(0.9))))
            r = QUALITY_ROWS[-1]
            print(f"{name:7s} {method:12s} ours {r[3]:.2e} | noise {r[4]:.2e} (x{r[3] / r[4]:.3f}) | "
                  f"tiles {r[5]:.2e} (x{r[3] / r[5]:.3f})", flush=True)


SECTIONS = {"quilt": bench_quilt, "efros_leung": bench_efros_leung, "quality": bench_quality}


def main():
    args = argument_parser(__doc__, SECTIONS).parse_args()
    print(machine_description(), flush=True)
    rows = []
    for name in args.only:
        SECTIONS[name](rows, args.quick, args.device)
    import os
    notes = [
        "No anchor library implements image quilting or Efros-Leung sampling in PyTorch: the timing rows' "
        "anchors are plain versions of the same algorithms (quilting: every source patch unfolded and its "
        "masked squared difference summed per placement, same draws and cuts; Efros-Leung: the paper's "
        "order, one pixel per step). ratio = anchor / ours. Times are whole calls (minimum over rounds). "
        f"Load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
        "on a shared 2-core machine: times are noisy upper bounds.",
    ]
    if QUALITY_ROWS:
        notes += [
            "",
            "Acceptance (issue 23): mean squared difference per value between each 5 x 5 output patch and its "
            "nearest source patch (every source position; output patches every 2 px for quilting, every pixel "
            "for Efros-Leung), against a uniform-noise image and the source's tiles shuffled (tiles the size "
            "of the quilting patch / the Efros-Leung window). Seed 0. tests/test_activations_texture.py "
            "asserts ours <= 0.05 x noise and <= 0.6 x (quilting) / 0.75 x (Efros-Leung) tiles on brick.",
            "",
            "| texture | method | size | ours | noise | ours / noise | shuffled tiles (tile) | ours / tiles "
            "| ours p90 / tiles p90 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        notes += [f"| {n} | {m} | {s} | {o:.2e} | {z:.2e} | {o / z:.4f} | {t:.2e} ({tile} px) | {o / t:.3f} "
                  f"| {p / pt:.3f} |" for n, m, s, o, z, t, tile, p, pt in QUALITY_ROWS]
    finish(args, "texture", rows, notes="\n".join(notes), title="Texture synthesis without a network")


if __name__ == "__main__":
    main()
