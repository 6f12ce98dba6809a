"""The command line behaves the same everywhere: every subcommand explains itself with an
example, bad input is one line and exit 2 before any model loads, and the defaults agree."""
import argparse

import pytest

from cnnviz_fast import cli, loading


def _subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


SUBCOMMANDS = sorted(_subcommands())


def run(capsys, *argv):
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_has_a_description_and_an_example(name, capsys):
    status, out, _ = run(capsys, name, "--help")
    assert status == 0
    assert "examples:" in out and f"cnnviz {name}" in out.split("examples:")[1]
    description = out.split("\n\n")[1]
    assert len(description.strip()) > 10 and not description.startswith("usage")


def test_every_command_that_runs_a_model_has_the_same_model_options():
    for name, parser in _subcommands().items():
        if not parser.get_default("runs_model"):
            continue
        flags = {o for a in parser._actions for o in a.option_strings}
        assert {"--model", "--weights", "--mean", "--std", "--size", "--resize", "--device"} <= flags, name
        model = next(a for a in parser._actions if a.dest == "model")
        assert model.default == loading.DEFAULT_MODEL, name


BAD = {  # subcommand -> arguments with one bad value, caught before the model loads
    "report": ["--images", "/no/such.png"],
    "saliency": ["--out", "o", "--method", "grad_cam", "--samples", "3"],
    "evaluate": ["--methods", "saliency,nope"],
    "visualize": ["--steps", "0"],
    "adversarial": ["--images", "/no/such.png"],
    "invert": ["--images", "photos", "--layers", "x", "--steps", "-1"],
    "dream": ["--images", "/no/such", "--layer", "x"],
    "texture": ["--images", "photos", "--layers", "x", "--size", "0"],
    "style": ["--content", "photos", "--style", "/no/such.png", "--content-layer", "a", "--style-layers", "b"],
    "filters": ["--weights", "/no/such.pt"],
    "activations": ["--images", "/no/such.png", "--layer", "x"],
    "features": ["--images", "photos", "--layer", "x", "--device", "gpu"],
    "neighbors": ["--images", "photos", "--layer", "x", "-k", "0"],
    "embed": ["--images", "/no/such", "--layer", "x"],
    "patches": ["--images", "photos", "--layer", "x", "-k", "0"],
    "layers": ["--size", "0"],
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_exit_2_before_the_model_loads(name, capsys, monkeypatch, tmp_path):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr("cnnviz_fast.cli.common.load_model", no_loading)
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, name, *BAD[name])
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "must not load" not in err, err


def test_every_command_with_bad_input_is_covered():
    runs_model = [n for n, p in _subcommands().items() if p.get_default("runs_model")]
    assert sorted(runs_model) == sorted(BAD)


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    status, _, err = run(capsys, "saliency", "--model", "zoo:digits", "--data", "digits", "--out", tmp_path / "file")
    assert status == 2 and "is not a folder" in err


def test_random_weights_are_said(capsys, tmp_path):
    status, _, err = run(capsys, "layers", "--model", "zoo:resnet18", "--size", "32")
    assert status == 0 and "random weights" in err


def test_saliency_with_a_cam_and_no_layer_picks_one_and_says_so(capsys, tmp_path):
    status, out, err = run(capsys, "saliency", "--model", "zoo:digits", "--data", "digits:test", "--method",
                           "grad_cam", "--out", tmp_path / "maps", "--quiet", "--batch-size", "256")
    assert status == 0, err
    assert "grad_cam: layer 'features.relu5'" in err


def test_train_digits_help(capsys):
    status, out, _ = run(capsys, "train-digits", "--help")
    assert status == 0 and "--epochs" in out
