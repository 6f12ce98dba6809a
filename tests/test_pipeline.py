"""Dataset-scale saliency: streamed file output, interruption safety, torchrun sharding, CLI."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnviz_fast import zoo
from cnnviz_fast.pipeline import saliency_maps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_inputs():
    pixels, labels = zoo.digits("test")
    return zoo.DIGITS_NORMALIZE(pixels[:20]), labels[:20]


def reference_saliency_maps(model, inputs):
    """Max |d score_pred / d x| over channels, one image at a time, by plain autograd."""
    maps, preds = [], []
    for image in inputs:
        x = image[None].clone().requires_grad_(True)
        out = model(x)
        pred = int(out.argmax(1))
        (grad,) = torch.autograd.grad(out[0, pred], x)
        maps.append(grad.abs().amax(1)[0])
        preds.append(pred)
    return torch.stack(maps), torch.tensor(preds)


def test_in_memory_matches_plain_autograd(digits_inputs):
    inputs, labels = digits_inputs
    model = zoo.digits_cnn()
    result = saliency_maps(model, inputs, "saliency", batch_size=7, progress=False)
    expected_maps, expected_preds = reference_saliency_maps(model, inputs)
    assert result.path is None and result.maps.shape == (20, 32, 32)
    torch.testing.assert_close(result.maps, expected_maps, rtol=1e-4, atol=1e-6)
    assert torch.equal(result.predictions, expected_preds)
    assert (result.predictions == labels).float().mean() > 0.9


def test_streams_to_npy_and_leaves_no_partial(tmp_path, digits_inputs):
    inputs, _ = digits_inputs
    out = tmp_path / "maps.npy"
    result = saliency_maps(zoo.digits_cnn(), inputs, "grad_cam", layer="features.conv4", out=out,
                           batch_size=8, progress=False)
    assert result.path == out and out.exists()
    assert not list(tmp_path.glob("*.partial"))
    on_disk = np.load(out)
    assert on_disk.shape == (20, 32, 32) and np.array_equal(on_disk, result.maps.numpy())
    assert np.load(tmp_path / "maps.predictions.npy").shape == (20,)


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, digits_inputs):
    inputs, _ = digits_inputs
    model = zoo.digits_cnn()
    calls = {"n": 0}

    def flaky(output):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return output[:, 0]

    import cnnviz_fast.pipeline as pipeline
    original = pipeline.METHODS["saliency"]
    pipeline.METHODS["saliency"] = lambda m, x, target, **k: original(m, x, flaky, **k)
    try:
        with pytest.raises(KeyboardInterrupt):
            saliency_maps(model, inputs, "saliency", out=tmp_path / "maps.npy", batch_size=8, progress=False)
    finally:
        pipeline.METHODS["saliency"] = original
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "magic"}, "method must be one of"),
    ({"target": "best"}, "target must be 'predicted'"),
])
def test_bad_arguments(kwargs, message, digits_inputs):
    with pytest.raises(ValueError, match=message):
        saliency_maps(zoo.digits_cnn(), digits_inputs[0], **kwargs)


def _run(args, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """Two CPU ranks (gloo) shard the digits and write one file equal to a single-process run."""
    out = tmp_path / "dist.npy"
    run = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                "-m", "cnnviz_fast", "saliency", "--data", "digits", "--method", "saliency",
                "--out", str(out), "--batch-size", "32", "--quiet"], OMP_NUM_THREADS="1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 rank(s)" in run.stdout
    pixels, _ = zoo.digits("test")
    single = saliency_maps(zoo.digits_cnn(), zoo.DIGITS_NORMALIZE(pixels), "saliency", progress=False)
    torch.testing.assert_close(torch.from_numpy(np.load(out)), single.maps, rtol=1e-4, atol=1e-6)
    assert np.array_equal(np.load(tmp_path / "dist.predictions.npy"), single.predictions.numpy())


def test_cli_info_and_saliency_pictures(tmp_path):
    info = _run([sys.executable, "-m", "cnnviz_fast", "info"])
    assert info.returncode == 0 and "compiled kernels" in info.stdout
    run = _run([sys.executable, "-m", "cnnviz_fast", "saliency", "--data", "digits", "--method",
                "guided_backprop", "--out", str(tmp_path / "g.npy"), "--pictures", "2", "--quiet"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((tmp_path / "g").glob("*.png"))) == 2
    bad = _run([sys.executable, "-m", "cnnviz_fast", "saliency", "--model", "alexnet", "--out", "x.npy"])
    assert bad.returncode != 0 and "--model must be one of" in bad.stderr
