"""Benchmarks of the feature-space suite against what people use today (timed in the same run,
interleaved round by round so that load on a shared machine hits both sides alike).

    python benchmarks/bench_features.py [--quick] [--no-write] [--only nn,tsne,patches]

  nearest_neighbors   100,000 × 512 float32, 1,000 queries, k=10 (--quick: 20,000 × 512, 200 queries)
                      vs scikit-learn NearestNeighbors(algorithm="brute").kneighbors   target >= 1.0x
                      and FAISS IndexFlatL2.search (ratio reported; no target)
  embed(tsne)         10,000 × 64 (--quick: 2,000) vs scikit-learn's default TSNE      target >= 1.0x
  max_activating_patches  digits CNN features.conv5 (128 channels × 8×8), k=9, over the 1,797
                      digits (--quick: 600), vs the naive way (keep every activation, sort once at the
                      end, cut the patches)                                             target >= 1.0x

Results are checked before timing: neighbours' indices equal (except ties) and distances
allclose; both t-SNE embeddings separate the clusters (5-NN accuracy); top units identical.
Results: benchmarks/results/features-<machine>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import machine_description, write_results  # noqa: E402

from cnnviz_fast import embed, max_activating_patches, nearest_neighbors, receptive_field, zoo  # noqa: E402
from cnnviz_fast.core import forward_to_layers  # noqa: E402


def race(functions, rounds):
    """Median seconds per call of each function, calling them in turn round after round."""
    for fn in functions.values():
        fn()  # warm-up (and first-call costs such as JIT compilation)
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
            times[name].append(timer.timeit(1).median)
    return {name: statistics.median(values) for name, values in times.items()}


def verdict(ratio, target):
    return "PASS" if ratio >= target else "MISS"


def report(rows, task, shape, anchor, t_anchor, t_ours, target, **extra):
    ratio = t_anchor / t_ours
    row = {"task": task, "shape": shape, "anchor": anchor, "anchor_s": t_anchor, "cnnviz_s": t_ours,
           "speedup": ratio, "target": f">= {target}x" if target else "",
           "result": verdict(ratio, target) if target else ""}
    row.update(extra)
    rows.append(row)
    print(f"{task:24s} {shape:26s} {anchor:34s} anchor {t_anchor:8.3f} s | cnnviz {t_ours:8.3f} s | "
          f"{ratio:5.2f}x" + (f" (target {target}x: {row['result']})" if target else ""), flush=True)


# --- nearest neighbours -------------------------------------------------------------------

def bench_neighbors(rows, quick):
    from sklearn.neighbors import NearestNeighbors
    count, queries_count, width, k = (20_000, 200, 512, 10) if quick else (100_000, 1_000, 512, 10)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(count, width)).astype(np.float32)
    queries = rng.normal(size=(queries_count, width)).astype(np.float32)
    features_t, queries_t = torch.from_numpy(features), torch.from_numpy(queries)
    sklearn_index = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(features)

    ours_d, ours_i = nearest_neighbors(features_t, queries_t, k)
    sk_d, sk_i = sklearn_index.kneighbors(queries)
    check_neighbors("scikit-learn", ours_d, ours_i, sk_d, sk_i)
    functions = {"cnnviz": lambda: nearest_neighbors(features_t, queries_t, k),
                 "sklearn": lambda: sklearn_index.kneighbors(queries)}
    try:
        import faiss
        faiss_index = faiss.IndexFlatL2(width)
        faiss_index.add(features)
        fa_d, fa_i = faiss_index.search(queries, k)
        check_neighbors("FAISS", ours_d, ours_i, np.sqrt(np.maximum(fa_d, 0)), fa_i)
        functions["faiss"] = lambda: faiss_index.search(queries, k)
    except ImportError:
        print("faiss not installed: pip install faiss-cpu to compare against IndexFlatL2")
    times = race(functions, rounds=3 if quick else 5)
    shape = f"{count}x{width}, {queries_count} q, k={k}"
    report(rows, "nearest_neighbors", shape, "sklearn NearestNeighbors(brute)", times["sklearn"],
           times["cnnviz"], 1.0)
    if "faiss" in times:
        report(rows, "nearest_neighbors", shape, "faiss IndexFlatL2", times["faiss"], times["cnnviz"], None)


def check_neighbors(name, ours_d, ours_i, their_d, their_i):
    ours_d, ours_i = ours_d.numpy(), ours_i.numpy()
    np.testing.assert_allclose(ours_d, their_d, rtol=1e-4, atol=1e-4, err_msg=f"distances differ from {name}")
    differ = ours_i != their_i
    # A differing index is only allowed where the distances tie.
    np.testing.assert_allclose(ours_d[differ], np.asarray(their_d)[differ], rtol=1e-5)
    print(f"  checked against {name}: distances allclose, indices equal on {1 - differ.mean():.4%}"
          " (the rest are ties)")


# --- t-SNE --------------------------------------------------------------------------------

def knn_accuracy(points, labels, k=5):
    _, indices = nearest_neighbors(torch.as_tensor(points, dtype=torch.float32), None, k, exclude_self=True)
    votes = torch.nn.functional.one_hot(labels[indices], int(labels.max()) + 1).sum(1)
    return (votes.argmax(1) == labels).float().mean().item()


def bench_tsne(rows, quick):
    from sklearn.manifold import TSNE
    count, width, centres = (2_000, 64, 10) if quick else (10_000, 64, 10)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % centres
    points = (torch.randn(centres, width, generator=generator) * 3)[labels] + torch.randn(
        count, width, generator=generator)
    points_np = points.double().numpy()
    results = {}

    def ours():
        results["cnnviz"] = embed(points, "tsne", seed=0)

    def sklearn():
        results["sklearn"] = TSNE(random_state=0).fit_transform(points_np)

    # One call each (tens of seconds at 10k); interleaved over rounds.
    times = {name: [] for name in ("cnnviz", "sklearn")}
    for _ in range(1 if not quick else 2):
        for name, fn in (("cnnviz", ours), ("sklearn", sklearn)):
            times[name].append(benchmark.Timer(stmt="fn()", globals={"fn": fn}).timeit(1).median)
    accuracy = {name: knn_accuracy(results[name], labels) for name in results}
    print(f"  5-NN accuracy of the 2-D embeddings: cnnviz {accuracy['cnnviz']:.3f}, "
          f"scikit-learn {accuracy['sklearn']:.3f}")
    assert accuracy["cnnviz"] >= accuracy["sklearn"] - 0.02, "our embedding separates the clusters worse"
    backend = "openTSNE" if _has("openTSNE") else "scikit-learn"
    report(rows, "embed(tsne)", f"{count}x{width} (backend {backend})", "sklearn TSNE()",
           statistics.median(times["sklearn"]), statistics.median(times["cnnviz"]), 1.0,
           knn_accuracy_cnnviz=accuracy["cnnviz"], knn_accuracy_sklearn=accuracy["sklearn"])


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# --- maximally activating patches ---------------------------------------------------------

def naive_top_patches(model, inputs, layer, k, batch_size):
    """What one writes first: keep every activation, sort each channel once at the end,
    then cut the patches of the winners one by one."""
    with torch.inference_mode():
        activation = torch.cat([forward_to_layers(model, inputs[i:i + batch_size], [layer])[layer]
                                for i in range(0, len(inputs), batch_size)])
    count, channels, height, width = activation.shape
    flat = activation.transpose(0, 1).reshape(channels, -1)
    order = flat.argsort(dim=1, descending=True, stable=True)[:, :k]
    values = flat.gather(1, order)
    rf = receptive_field(model, layer, tuple(inputs.shape[1:]))
    padded = torch.nn.functional.pad(inputs, (rf.size[1],) * 2 + (rf.size[0],) * 2)
    patches = torch.empty(channels, k, inputs.shape[1], *rf.size)
    for c in range(channels):
        for j in range(k):
            unit = int(order[c, j])
            n, y, x = unit // (height * width), unit % (height * width) // width, unit % width
            top, left, _, _ = rf.box(y, x)
            patches[c, j] = padded[n, :, top + rf.size[0]:top + 2 * rf.size[0], left + rf.size[1]:left + 2 * rf.size[1]]
    return values, order // (height * width), patches


def bench_patches(rows, quick):
    model = zoo.digits_cnn()
    pixels, _ = zoo.digits("all")
    inputs = zoo.DIGITS_NORMALIZE(pixels[:600] if quick else pixels)
    layer, k, batch_size = "features.conv5", 9, 256
    top = max_activating_patches(model, inputs, layer, k=k, batch_size=batch_size, progress=False)
    values, indices, patches = naive_top_patches(model, inputs, layer, k, batch_size)
    assert torch.equal(top.values, values) and torch.equal(top.indices, indices)
    assert torch.equal(top.patches, patches)
    print("  checked: identical top units and patches")
    times = race({"cnnviz": lambda: max_activating_patches(model, inputs, layer, k=k, batch_size=batch_size,
                                                           progress=False),
                  "naive": lambda: naive_top_patches(model, inputs, layer, k, batch_size)},
                 rounds=2 if quick else 3)
    stored_mib = len(inputs) * 128 * 8 * 8 * 4 / 2 ** 20
    report(rows, "max_activating_patches", f"{len(inputs)} digits, conv5, k={k}",
           "store all activations + sort", times["naive"], times["cnnviz"], 1.0,
           inputs_per_s=len(inputs) / times["cnnviz"], naive_activation_mib=stored_mib)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    parser.add_argument("--only", default="nn,tsne,patches", help="comma-separated subset")
    args = parser.parse_args(argv)
    print(machine_description(), flush=True)
    rows = []
    chosen = set(args.only.split(","))
    if "nn" in chosen:
        bench_neighbors(rows, args.quick)
    if "patches" in chosen:
        bench_patches(rows, args.quick)
    if "tsne" in chosen:
        bench_tsne(rows, args.quick)
    if not args.no_write:
        notes = ("Timed on a shared machine (other engineers' jobs running): ratios are indicative; "
                 "both sides are timed in the same run, interleaved round by round." +
                 (" --quick sizes." if args.quick else ""))
        print("wrote", write_results("features" + ("-quick" if args.quick else ""), rows, notes=notes,
                                     title="Feature-space suite benchmarks"))


if __name__ == "__main__":
    main()
