"""extract_features: every kind of data, pooling, streaming to .npy, constant memory,
interrupted runs, argument errors."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from cnnviz_fast import extract_features

ROOT = Path(__file__).resolve().parents[1]


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).train()


def reference(model, x, layer_index, pool=None):
    """Activations of model[:layer_index + 1] computed directly (eval mode)."""
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model[:layer_index + 1](x)
        model.train(was)
    if pool == "avg":
        out = out.flatten(2).mean(2)
    elif pool == "max":
        out = out.flatten(2).amax(2)
    return out.flatten(1)


class Items(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("kind", ["tensor", "dataset", "loader", "tuples", "generator"])
def test_every_kind_of_data_gives_the_same_features(kind):
    model = small_model()
    x, y = torch.randn(23, 2, 6, 6), torch.arange(23)
    data = {
        "tensor": lambda: x,
        "dataset": lambda: Items(x, y),
        "loader": lambda: DataLoader(TensorDataset(x, y), batch_size=7),
        "tuples": lambda: [(x[i:i + 5], y[i:i + 5]) for i in range(0, 23, 5)],
        "generator": lambda: (x[i:i + 4] for i in range(0, 23, 4)),
    }[kind]()
    features = extract_features(model, data, "1", batch_size=6, progress=False)
    torch.testing.assert_close(features, reference(model, x, 1))
    assert model.training and model[3].training, "the model must be back in training mode"
    assert not features.is_inference(), "the result must be usable outside inference mode"


def test_a_loader_with_a_subset_sampler_or_drop_last(tmp_path):
    model = small_model()
    x = torch.randn(20, 2, 6, 6)
    subset = DataLoader(x, batch_size=4, sampler=list(range(3, 14)))
    torch.testing.assert_close(extract_features(model, subset, "1", out=tmp_path / "a.npy", progress=False),
                               reference(model, x[3:14], 1))
    dropping = DataLoader(x, batch_size=6, drop_last=True)
    torch.testing.assert_close(extract_features(model, dropping, "1", progress=False),
                               reference(model, x[:18], 1))


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_global_pooling(pool):
    model = small_model()
    x = torch.randn(9, 2, 6, 6)
    features = extract_features(model, x, "2", pool=pool, progress=False)
    assert features.shape == (9, 4)
    torch.testing.assert_close(features, reference(model, x, 2, pool))


def test_the_forward_pass_stops_at_the_layer():
    model = small_model()
    calls = []
    model[5].register_forward_hook(lambda *args: calls.append(1))
    extract_features(model, torch.randn(4, 2, 6, 6), "1", progress=False)
    assert not calls


@pytest.mark.parametrize("known_length", [True, False])
def test_out_streams_to_a_complete_npy(tmp_path, known_length):
    model = small_model()
    x = torch.randn(30, 2, 6, 6)
    out = tmp_path / "sub" / "features.npy"
    data = x if known_length else (x[i:i + 7] for i in range(0, 30, 7))
    features = extract_features(model, data, "4", batch_size=8, out=out, progress=False)
    expected = reference(model, x, 4)
    torch.testing.assert_close(features, expected)
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["features.npy"], "no leftovers"
    assert isinstance(np.load(out, mmap_mode="r"), np.memmap)


def test_length_for_an_iterable_checks_the_count(tmp_path):
    model = small_model()
    x = torch.randn(12, 2, 6, 6)
    batches = lambda: (x[i:i + 5] for i in range(0, 12, 5))
    features = extract_features(model, batches(), "1", out=tmp_path / "f.npy", length=12, progress=False)
    torch.testing.assert_close(features, reference(model, x, 1))
    with pytest.raises(ValueError, match="length=13"):
        extract_features(model, batches(), "1", out=tmp_path / "g.npy", length=13, progress=False)
    with pytest.raises(ValueError, match="length=10"):
        extract_features(model, batches(), "1", length=10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy"]


@pytest.mark.parametrize("known_length", [True, False])
def test_an_interrupted_run_leaves_no_file(tmp_path, known_length):
    model = small_model()

    class Broken(IterableDataset):
        def __iter__(self):
            for i in range(10):
                if i == 6:
                    raise RuntimeError("disk on fire")
                yield torch.randn(4, 2, 6, 6)

    out = tmp_path / "features.npy"
    with pytest.raises(RuntimeError, match="disk on fire"):
        extract_features(model, Broken(), "1", out=out, length=40 if known_length else None, progress=False)
    assert list(tmp_path.iterdir()) == [], "neither a partial nor a final file may remain"
    assert model.training


def test_bad_arguments_name_the_argument():
    model = small_model()
    x = torch.randn(3, 2, 6, 6)
    with pytest.raises(ValueError, match="layer 'nope'"):
        extract_features(model, x, "nope")
    with pytest.raises(ValueError, match="pool"):
        extract_features(model, x, "1", pool="median")
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(model, x, "1", batch_size=0)
    with pytest.raises(ValueError, match="length"):
        extract_features(model, x, "1", length=4)
    with pytest.raises(ValueError, match="data is empty"):
        extract_features(model, [], "1")


_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from torch.utils.data import Dataset
    from cnnviz_fast import extract_features

    folder = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())  # 1024 floats per input

    class Generated(Dataset):  # made on the fly: the data itself costs no memory
        def __init__(self, n):
            self.n = n
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            return torch.full((1, 8, 8), float(i % 97))

    def batches(n):  # an iterable of unknown length
        for start in range(0, n, 500):
            yield torch.randn(min(500, n - start), 1, 8, 8)

    def peak_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])

    def run(n, known):
        path = f"{folder}/features_{n}_{known}.npy"
        features = extract_features(model, Generated(n) if known else batches(n), "1", out=path,
                                    batch_size=500, progress=False)
        assert features.shape == (n, 1024)
        del features

    run(1000, True), run(1000, False)  # warm up the allocator and the code paths
    before = peak_kib()
    for n in (5_000, 50_000):
        run(n, True), run(n, False)
        print(n, (peak_kib() - before) / 1024)  # peak growth so far, MiB
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) to read VmHWM")
def test_streaming_memory_does_not_grow_with_the_dataset(tmp_path):
    # 50,000 inputs × 1024 float32 = 195 MiB of features: held in memory they would show.
    # Runs in a fresh process so the peak resident set (VmHWM) is this test's own.
    script = tmp_path / "measure.py"
    script.write_text(_MEMORY_SCRIPT)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    growth = dict(line.split() for line in done.stdout.strip().splitlines())
    small, large = float(growth["5000"]), float(growth["50000"])
    assert large < small + 16, f"peak RSS grew by {large:.0f} MiB after 50k inputs vs {small:.0f} MiB after 5k"
    assert large < 48, f"peak RSS grew by {large:.0f} MiB while streaming"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = small_model()
    x = torch.randn(10, 2, 6, 6)
    cpu = extract_features(model, x, "4", progress=False)
    gpu = extract_features(model.cuda(), x.cuda(), "4", progress=False)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
