"""Benchmarks of the feature-space suite against what people use today (timed in the same run,
interleaved round by round so that load on a shared machine hits both sides alike).

    python benchmarks/bench_features.py [--quick] [--no-write] [--only nn,patches,tsne]

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

import numpy as np
import torch

from common import argument_parser, finish, interleaved, machine_description, row

from cnnviz_fast import embed, max_activating_patches, nearest_neighbors, receptive_field, zoo
from cnnviz_fast.core import forward_to_layers


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
    times = interleaved(functions, rounds=3 if quick else 5)
    label = f"nearest_neighbors {count}x{width}, {queries_count} queries, k={k}"
    rows.append(row(f"{label} vs sklearn NearestNeighbors(brute)", times["cnnviz"], times["sklearn"], ">= 1x",
                    unit="s"))
    if "faiss" in times:
        rows.append(row(f"{label} vs faiss IndexFlatL2", times["cnnviz"], times["faiss"], unit="s"))


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

    times = interleaved({"cnnviz": ours, "sklearn": sklearn}, rounds=1)  # tens of seconds a call at 10k
    accuracy = {name: knn_accuracy(results[name], labels) for name in results}
    print(f"  5-NN accuracy of the 2-D embeddings: cnnviz {accuracy['cnnviz']:.3f}, "
          f"scikit-learn {accuracy['sklearn']:.3f}")
    assert accuracy["cnnviz"] >= accuracy["sklearn"] - 0.02, "our embedding separates the clusters worse"
    backend = "openTSNE" if _has("openTSNE") else "scikit-learn"
    rows.append(row(f"embed(tsne) {count}x{width} (backend {backend}) vs sklearn TSNE()", times["cnnviz"],
                    times["sklearn"], ">= 1x", unit="s", knn_accuracy_cnnviz=accuracy["cnnviz"],
                    knn_accuracy_sklearn=accuracy["sklearn"]))


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
    rf = receptive_field(model, tuple(inputs.shape[1:]), layer)
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
    times = interleaved({"cnnviz": lambda: max_activating_patches(model, inputs, layer, k=k, batch_size=batch_size,
                                                                  progress=False),
                         "naive": lambda: naive_top_patches(model, inputs, layer, k, batch_size)},
                        rounds=2 if quick else 3)
    stored_mib = len(inputs) * 128 * 8 * 8 * 4 / 2 ** 20
    rows.append(row(f"max_activating_patches {len(inputs)} digits, conv5, k={k} vs store all activations + sort",
                    times["cnnviz"], times["naive"], ">= 1x", unit="s", inputs_per_s=len(inputs) / times["cnnviz"],
                    naive_activation_mib=stored_mib))


SECTIONS = {"nn": bench_neighbors, "patches": bench_patches, "tsne": bench_tsne}


def main(argv=None):
    args = argument_parser(__doc__, SECTIONS).parse_args(argv)
    print(machine_description(), flush=True)
    rows = []
    for name in args.only:
        SECTIONS[name](rows, args.quick)
    finish(args, "features", rows, title="Feature-space suite benchmarks",
           notes="ratio = anchor / ours (speedup). Timed on a shared machine (other engineers' jobs running): "
                 "ratios are indicative. t-SNE: one round.")


if __name__ == "__main__":
    main()
