"""The benchmark harness (benchmarks/common.py): the verdicts and files every speed claim rests on."""
import importlib.util
import json
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "common.py")
_spec = importlib.util.spec_from_file_location("benchmarks_common", _PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_ratio_follows_the_target_direction():
    faster = common.row("x", ours=0.5, anchor=1.0, target=">= 1.5x")
    assert faster["ratio"] == 2.0 and faster["result"] == "PASS"
    assert common.row("x", ours=0.8, anchor=1.0, target=">= 1.5x")["result"] == "MISS"
    overhead = common.row("x", ours=1.2, anchor=1.0, target="<= 1.10x", unit="s")
    assert overhead["ratio"] == pytest.approx(1.2) and overhead["result"] == "MISS"
    assert overhead["ours"] == pytest.approx(1.2) and overhead["unit"] == "s"
    info = common.row("x", ours=0.25, anchor=1.0, extra_field=7)
    assert info["ratio"] == 4.0 and info["result"] == "" and info["extra_field"] == 7
    assert info["ours"] == 250.0  # ms by default


def test_bad_target_is_refused():
    with pytest.raises(ValueError, match="target"):
        common.row("x", 1.0, 1.0, "> 1x")


def test_interleaved_times_every_contender():
    calls = []
    times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # Timer's 2 warm-up calls, 1 timed, in turn


def test_quick_runs_never_replace_full_results(tmp_path):
    args = common.argument_parser("doc", ["one", "two"]).parse_args(
        ["--quick", "--only", "two", "--results-dir", str(tmp_path)])
    assert args.only == ["two"]
    path = common.finish(args, "demo", [common.row("x", 1.0, 2.0, ">= 1x")])
    assert os.path.basename(path).startswith("demo-quick-") and "Timing:" in open(path).read()
    record = json.load(open(path[:-3] + ".json"))
    assert record["rows"][0]["result"] == "PASS" and "minimum" in record["timing"]
    with pytest.raises(SystemExit):
        common.argument_parser("doc", ["one"]).parse_args(["--only", "three"])


def test_threads_option_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        common.argument_parser("doc").parse_args(["--threads", "1"])
        assert torch.get_num_threads() == 1 and common.machine()["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)
