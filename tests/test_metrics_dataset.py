"""Faithfulness at dataset scale (metrics.evaluate_dataset, `cnnviz evaluate --stream`):
values equal to the curve functions, kill-and-resume equal to an uninterrupted run, the
report's pictures, argument errors."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnviz_fast.metrics as M
from cnnviz_fast import attribution, zoo
from cnnviz_fast.cli import main
from cnnviz_fast.metrics._common import interval95
from cnnviz_fast.pipeline import open_results, to_map
from cnnviz_fast.pipeline.writer import KILL_AFTER_SHARDS, finished_shards

ROOT = Path(__file__).resolve().parents[1]
LAYER = "features.conv5"
STEPS = 6


@pytest.fixture(scope="module")
def model():
    return zoo.digits_cnn()


@pytest.fixture(scope="module")
def pixels():
    return zoo.digits("test")[0][:12]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pixels):
    """12 digit PNGs and one file that does not decode."""
    root = tmp_path_factory.mktemp("digits")
    for k, image in enumerate(pixels):
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8), "L").save(root / f"{k:02d}.png")
    (root / "broken.png").write_text("not a png")
    return root


def test_values_equal_the_curve_functions(tmp_path, model, pixels):
    inputs = zoo.DIGITS_NORMALIZE(pixels)
    methods = {"saliency": {}, "grad_cam": {"layer": LAYER}}
    summary = M.evaluate_dataset(model, inputs, tmp_path, methods, steps=STEPS, shard_size=5, batch_size=3,
                                 curve_batch_size=16, map_dtype="float32", normalize=zoo.DIGITS_NORMALIZE,
                                 progress=False)
    for name, kwargs in methods.items():
        maps, output = getattr(attribution, name)(model, inputs, target="predicted", return_output=True, **kwargs)
        maps = to_map(maps)
        results = open_results(tmp_path / name)
        assert np.array_equal(results.targets, output.argmax(1).numpy())
        torch.testing.assert_close(torch.from_numpy(results.maps()), maps, rtol=1e-4, atol=1e-6)
        for metric, curve_function in (("deletion", M.deletion_curve), ("insertion", M.insertion_curve)):
            curve = curve_function(model, inputs, "predicted", maps, steps=STEPS)
            np.testing.assert_allclose(results.extra[f"{metric}_auc"], curve.auc.numpy(), rtol=1e-6, atol=1e-9)
            stored = np.stack([results.extra[f"{metric}_{k}"] for k in range(STEPS + 1)], 1)
            np.testing.assert_allclose(stored, curve.scores.numpy(), rtol=1e-6, atol=1e-9)
            mean, low, high, n = interval95(curve.auc)
            assert summary[name][metric]["n"] == n == 12
            assert summary[name][metric]["mean"] == pytest.approx(mean, rel=1e-6)
            assert summary[name][metric]["high"] - summary[name][metric]["low"] == pytest.approx(high - low, rel=1e-5)
            np.testing.assert_allclose(M.mean_curves(tmp_path)[name][metric], curve.scores.mean(0).numpy(),
                                       rtol=1e-6)
    assert M.summarize(tmp_path) == {name: summary[name] for name in sorted(methods)}
    assert "| grad_cam |" in M.format_table(summary)


def _cli(*args, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "cnnviz_fast", "evaluate", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_killed_run_resumed_gives_the_uninterrupted_table(tmp_path, model, folder):
    """SIGKILL after 2 of saliency's 4 shards; the same command resumes (grad_cam then runs
    whole) and the table and every per-image value equal a run that was never killed."""
    command = ["--model", "zoo:digits", "--data", str(folder), "--methods", "saliency,grad_cam", "--steps", str(STEPS), "--shard-size", "4",
               "--images-per-batch", "3", "--quiet"]
    killed = _cli(*command, "--stream", str(tmp_path / "killed"), **{KILL_AFTER_SHARDS: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert finished_shards(tmp_path / "killed" / "saliency") == [0, 1]
    assert not (tmp_path / "killed" / "grad_cam").exists() and not (tmp_path / "killed" / "summary.md").exists()
    first = tmp_path / "killed" / "saliency" / "shards" / "000000.npy"
    written = first.stat().st_mtime_ns
    resumed = _cli(*command, "--stream", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert first.stat().st_mtime_ns == written  # a finished shard is kept, not recomputed
    whole = _cli(*command, "--stream", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    table = (tmp_path / "killed" / "summary.md").read_text()
    assert table == (tmp_path / "whole" / "summary.md").read_text() and "(n=12)" in table
    for name in ("saliency", "grad_cam"):
        again, once = open_results(tmp_path / "killed" / name), open_results(tmp_path / "whole" / name)
        assert again.paths == once.paths and len(again) == 12
        assert again.errors() == once.errors() and [e["path"] for e in once.errors()] == ["broken.png"]
        for column in once.extra:
            assert np.array_equal(again.extra[column], once.extra[column]), (name, column)
    assert not list((tmp_path / "killed").rglob("*.partial"))
    # the finished run refuses other settings rather than mixing them into its table
    other = _cli(*command[:-1], "--steps", "3", "--stream", str(tmp_path / "whole"))
    assert other.returncode == 2 and "other settings" in other.stderr and "steps" in other.stderr


def test_cli_writes_table_and_report_with_valid_pngs(tmp_path, folder, capsys):
    out = tmp_path / "run"
    assert main(["evaluate", "--model", "zoo:digits", "--data", str(folder), "--stream", str(out), "--methods", "saliency,grad_cam",
                 "--steps", "4", "--shard-size", "8", "--sanity", "2", "--quiet", "--out", str(tmp_path / "t.md")]) == 0
    table = (out / "summary.md").read_text()
    assert table == (tmp_path / "t.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "AUC" not in line]
    assert [line.split("|")[1].strip() for line in rows] == ["saliency", "grad_cam"]
    assert "lower is better" in table and "model: zoo:digits" in table
    assert "| saliency |" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "FAILED" not in page and "<table>" in page and "<td>grad_cam</td>" in page
    assert "model randomization" in page
    pictures = re.findall(r"<img src='([^']+)'", page)
    assert sorted(pictures) == ["curves.png", "sanity.png"]
    for picture in pictures:
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / picture) as image:
            image.verify()


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": ["lime"]}, "methods must be one of"),
    ({"methods": "saliency"}, "methods must be a non-empty list"),
    ({"metrics": ["auc"]}, "metrics must be"),
    ({"steps": 0}, "steps"),
    ({"baseline": torch.zeros(1)}, "baseline must be a number"),
    ({"curve_batch_size": 0}, "curve_batch_size"),
])
def test_bad_arguments_name_the_argument(tmp_path, model, pixels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        M.evaluate_dataset(model, zoo.DIGITS_NORMALIZE(pixels[:2]), tmp_path, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--methods", "random"], "--methods must name"),
    (["--sanity", "-1"], "--sanity must be >= 0"),
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--limit", "3"], "--limit applies to digits"),
])
def test_cli_bad_arguments_exit_2(tmp_path, folder, capsys, args, message):
    assert main(["evaluate", "--model", "zoo:digits", "--data", str(folder), "--stream", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err


def test_sanity_needs_stream(capsys):
    assert main(["evaluate", "--sanity", "2"]) == 2
    assert "--sanity needs --stream" in capsys.readouterr().err
