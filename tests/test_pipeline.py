"""Dataset-scale saliency: every source kind, equality with the attribution API, bad files,
kill-and-resume (one process and two torchrun ranks), settings refusal, merge, the reader."""
import csv
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from cnnviz_fast import attribution, zoo
from cnnviz_fast.core.npy_writer import NpyWriter
from cnnviz_fast.pipeline import decode_image, merge, open_results, saliency_maps, to_map
from cnnviz_fast.pipeline.sources import decode_on_device
from cnnviz_fast.pipeline.writer import KILL_AFTER_SHARDS, KILL_RANK, finished_shards

ROOT = Path(__file__).resolve().parents[1]
CLOSE = dict(rtol=1e-4, atol=1e-6)  # float32 maps; batch composition may change the last bits
N_FILES = 20


@pytest.fixture(scope="module")
def model():
    return zoo.digits_cnn()


@pytest.fixture(scope="module")
def pixels():
    return zoo.digits("test")[0][:30]


@pytest.fixture(scope="module")
def inputs(pixels):
    return zoo.DIGITS_NORMALIZE(pixels)


def expected(model, inputs):
    """Maps, predictions and scores straight from the attribution API."""
    maps, output = attribution.saliency(model, inputs, "predicted", return_output=True)
    predicted = output.argmax(1)
    return to_map(maps), predicted, output.gather(1, predicted[:, None])[:, 0]


def run(model, data, out, **kwargs):
    kwargs.setdefault("map_dtype", "float32")
    kwargs.setdefault("progress", False)
    kwargs.setdefault("shard_size", 8)
    return saliency_maps(model, data, out, normalize=zoo.DIGITS_NORMALIZE, size=32, **kwargs)


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pixels):
    """Digits as files of many kinds, in nested folders, plus files that cannot be decoded."""
    root = tmp_path_factory.mktemp("images")
    for k in range(N_FILES):
        gray = Image.fromarray(as_uint8(pixels[k]), "L")
        sub = root / ("a" if k % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        kind = k % 7
        if kind == 0:
            gray.save(sub / f"{k:02d} gray, spaced.png")
        elif kind == 1:
            gray.convert("RGB").save(sub / f"{k:02d}-rgb.jpg", quality=95)
        elif kind == 2:
            gray.convert("RGBA").save(sub / f"{k:02d}-rgba.png")
        elif kind == 3:
            gray.convert("P").save(sub / f"{k:02d}-palette.png")
        elif kind == 4:
            gray.convert("CMYK").save(sub / f"{k:02d}-cmyk.jpg", quality=95)
        elif kind == 5:
            sixteen = (np.asarray(gray).astype(np.uint16) * 257)
            Image.fromarray(sixteen).save(sub / f"{k:02d}-16bit.png")
        else:
            gray.resize((64, 48)).save(sub / f"{k:02d}-ü-large.png")
    (root / "b" / "zero.png").write_bytes(b"")
    (root / "a" / "not-an-image.jpg").write_text("hello")
    data = (root / "a" / "01-rgb.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not listed: wrong suffix")
    return root


BAD = {"b/zero.png", "a/not-an-image.jpg", "b/truncated.jpg"}


def test_decode_converts_every_mode(folder, pixels):
    """Each kind decodes to the digit's pixels (exactly for lossless files, closely for JPEG)."""
    for path in sorted(folder.rglob("*")):
        if path.suffix not in (".png", ".jpg") or path.relative_to(folder).as_posix() in BAD:
            continue
        k = int(path.name[:2])
        decoded = decode_image(path, 32, 1)[:, :, 0].astype(int)
        truth = as_uint8(pixels[k]).astype(int)
        if "large" in path.name:
            continue  # resized twice: only the shape is checked
        error = np.abs(decoded - truth)
        if path.suffix == ".png":
            assert error.max() <= 1, path.name
        else:
            assert error.mean() < 4, path.name
    assert decode_image(folder / "a" / "01-rgb.jpg", 16, 3).shape == (16, 16, 3)


def test_tensor_source_equals_attribution_api(tmp_path, model, inputs):
    forwards = []
    handle = model.register_forward_hook(lambda module, args, output: forwards.append(len(args[0])))
    try:
        summary = run(model, inputs, tmp_path / "out", batch_size=7)
    finally:
        handle.remove()
    assert forwards == [7, 1] * 3 + [6]  # one forward per batch; batches stop at shard ends
    assert summary.complete and summary.images == 30 and summary.skipped == 0
    results = open_results(tmp_path / "out")
    maps, predicted, scores = expected(model, inputs)
    assert len(results) == 30 and [r["item"] for r in results] == list(range(30))
    torch.testing.assert_close(torch.from_numpy(results.maps()), maps, **CLOSE)
    assert np.array_equal(results.predicted, predicted.numpy())
    assert np.array_equal(results.targets, predicted.numpy())
    np.testing.assert_allclose(results.scores, scores.detach().numpy(), rtol=1e-5)
    assert len(finished_shards(tmp_path / "out")) == 4  # 30 items, shards of 8
    # float16 by default, close to the float32 maps; a class target is kept as given
    run(model, inputs[:10], tmp_path / "half", map_dtype="float16", target=3)
    half = open_results(tmp_path / "half")
    assert half[0]["map"].dtype == np.float16 and set(half.targets) == {3}
    torch.testing.assert_close(torch.from_numpy(half.maps()).float(),
                               to_map(attribution.saliency(model, inputs[:10], 3)), rtol=1e-3, atol=1e-5)


class Stream(IterableDataset):
    def __init__(self, inputs):
        self.inputs = inputs

    def __iter__(self):
        return iter(self.inputs)


def test_dataset_iterable_and_dataloader_sources(tmp_path, model, inputs):
    maps = expected(model, inputs)[0]
    labelled = TensorDataset(inputs, torch.arange(30))
    for name, data in [("dataset", labelled), ("iterable", Stream(inputs)),
                       ("loader", DataLoader(labelled, batch_size=4))]:
        summary = run(model, data, tmp_path / name, batch_size=5, num_workers=1 if name == "dataset" else 0)
        assert summary.complete and summary.images == 30, name
        torch.testing.assert_close(torch.from_numpy(open_results(tmp_path / name).maps()), maps, **CLOSE)


def test_folder_and_list_sources_with_bad_files(tmp_path, model, folder):
    summary = run(model, folder, tmp_path / "out", batch_size=6, num_workers=2, overlays=3)
    assert summary.complete and (summary.images, summary.skipped) == (N_FILES, len(BAD))
    results = open_results(tmp_path / "out")
    errors = results.errors()
    assert {e["path"] for e in errors} == BAD and all(e["reason"] for e in errors)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*")
                   if p.suffix in (".png", ".jpg") and p.relative_to(folder).as_posix() not in BAD)
    assert results.paths == names  # sorted relative paths, skips left out
    decoded = torch.stack([torch.from_numpy(decode_image(folder / n, 32, 1)).permute(2, 0, 1) for n in names])
    maps = expected(model, zoo.DIGITS_NORMALIZE(decoded.float() / 255))[0]
    torch.testing.assert_close(torch.from_numpy(results.maps()), maps, **CLOSE)
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3
    # a text file of paths (relative to it, or absolute) gives the same maps for those files
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / names[4]}\n{os.path.relpath(folder / names[1], tmp_path)}\n")
    run(model, listing, tmp_path / "listed")
    listed = open_results(tmp_path / "listed")
    torch.testing.assert_close(torch.from_numpy(listed.maps()), maps[[4, 1]], **CLOSE)
    assert listed.get(str(folder / names[4]))["item"] == 0


def test_reader(tmp_path, model, inputs, folder):
    run(model, folder, tmp_path / "out", batch_size=8)
    results = open_results(tmp_path / "out")
    first, last = results[0], results[-1]
    assert results.get(first["path"])["item"] == first["item"] and last["item"] == results[len(results) - 1]["item"]
    assert np.array_equal(results.get(last["path"])["map"], last["map"]) and last["map"].shape == (32, 32)
    assert [r["path"] for r in results] == results.paths
    with pytest.raises(IndexError):
        results[len(results)]
    with pytest.raises(KeyError):
        results.get("missing.png")
    # the index is plain CSV and the maps plain .npy: no cnnviz_fast needed to read them
    with open(tmp_path / "out" / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    row = rows[5]
    shard = np.load(tmp_path / "out" / "shards" / f"{int(row['shard']):06d}.npy")
    assert np.array_equal(shard[int(row["row"])], results[5]["map"]) and row["path"] == results.paths[5]
    with pytest.raises(ValueError, match="no index.csv"):
        open_results(tmp_path)


def test_refuses_other_settings(tmp_path, model, inputs):
    run(model, inputs[:8], tmp_path / "out")
    run(model, inputs[:8], tmp_path / "out")  # the same settings: nothing to do, accepted
    with pytest.raises(ValueError, match="other settings.*method: 'saliency' in the folder, 'grad_cam' now"):
        saliency_maps(model, inputs[:8], tmp_path / "out", "grad_cam", layer="features.conv4",
                      map_dtype="float32", shard_size=8, progress=False, normalize=zoo.DIGITS_NORMALIZE, size=32)
    with pytest.raises(ValueError, match="map_dtype"):
        run(model, inputs[:8], tmp_path / "out", map_dtype="float16")
    other = zoo.digits_cnn()
    with torch.no_grad():
        other.features.conv1.weight.add_(1)
    with pytest.raises(ValueError, match="model"):
        run(other, inputs[:8], tmp_path / "out")
    with pytest.raises(ValueError, match="source"):
        run(model, inputs[:9], tmp_path / "out")
    # a run that stopped before finishing any shard holds nothing to protect: replaced
    with pytest.raises(ValueError, match="layer"):
        run(model, inputs[:8], tmp_path / "new", method="grad_cam", layer="no.such.layer")
    run(model, inputs[:8], tmp_path / "new", method="grad_cam", layer="features.conv4")
    assert open_results(tmp_path / "new").settings["method_kwargs"] == {"layer": "features.conv4"}


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "magic"}, "method must be one of"),
    ({"target": "best"}, "target must be 'predicted'"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"batch_size": 0}, "batch_size must be"),
    ({"data": [1, 2]}, "data must be a folder"),
    ({"data": "/no/such/folder"}, "no such folder"),
])
def test_bad_arguments(tmp_path, model, inputs, kwargs, message):
    kwargs = {"data": inputs[:4], **kwargs}
    with pytest.raises(ValueError, match=message):
        run(model, out=tmp_path / "out", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_decode_without_gpu_is_a_clear_error(tmp_path, model, folder):
    with pytest.raises(ValueError, match="decode='gpu' needs a CUDA device.*no GPU is present"):
        run(model, folder, tmp_path / "out", decode="gpu")


def test_decode_on_device_keeps_good_files_and_reports_bad(folder):
    """The GPU decoder's logic, run on the CPU: JPEG batch, PNG fallback, one bad file."""
    names = ["a/01-rgb.jpg", "b/c/00 gray, spaced.png", "b/truncated.jpg", "a/not-an-image.jpg"]
    raw = [torch.from_numpy(np.frombuffer((folder / n).read_bytes(), np.uint8).copy()) for n in names]
    kept, images, failed = decode_on_device(raw, 32, 1, torch.device("cpu"))
    assert kept[:2] == [0, 1] and images.shape[1:] == (1, 32, 32) and images.dtype == torch.uint8
    assert 3 in [i for i, _ in failed]
    for k, name in zip(kept[:2], names[:2]):
        pillow = torch.from_numpy(decode_image(folder / name, 32, 1)).permute(2, 0, 1).int()
        assert (images[kept.index(k)].int() - pillow).abs().float().mean() < 4


def _python(*args, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_cli_kill_and_resume_matches_python_api(tmp_path, model, folder):
    """SIGKILL after 2 of 4 shards; the same command resumes, and the result equals a
    fresh run of the Python API."""
    out = tmp_path / "cli"
    command = ["-m", "cnnviz_fast", "saliency", "--model", "zoo:digits", "--data", str(folder), "--out", str(out), "--shard-size", "6",
               "--batch-size", "4", "--map-dtype", "float32", "--num-workers", "1", "--quiet"]
    killed = _python(*command, **{KILL_AFTER_SHARDS: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert finished_shards(out) == [0, 1] and not (out / "index.csv").exists()
    for leftover in (out / "shards").iterdir():  # whatever was in flight is visibly unfinished
        assert leftover.name.endswith(".partial") or int(leftover.name[:6]) in (0, 1)
    (out / "shards" / "000003.csv.999.partial").write_text("left by a kill during a CSV write")
    resumed = _python(*command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "2 shards already done" in resumed.stdout
    fresh = tmp_path / "fresh"
    run(model, folder, fresh, shard_size=6, batch_size=4)
    cli, api = open_results(out), open_results(fresh)
    assert cli.paths == api.paths and np.array_equal(cli.predicted, api.predicted)
    torch.testing.assert_close(torch.from_numpy(cli.maps()), torch.from_numpy(api.maps()), **CLOSE)
    assert cli.errors() == api.errors()
    assert not [p for p in out.rglob("*.partial")]
    bad = _python("-m", "cnnviz_fast", "saliency", "--model", "zoo:digits", "--data", str(folder), "--out", str(out), "--method",
                  "guided_backprop", "--quiet")
    assert bad.returncode == 2 and "cnnviz saliency: error:" in bad.stderr and "other settings" in bad.stderr


def test_torchrun_two_ranks_killed_and_resumed_equal_one_process(tmp_path, model, inputs):
    """2 gloo ranks; rank 1 is killed after its first shard; the rerun finishes the rest and
    the result equals a single-process run, nothing lost or duplicated."""
    out = tmp_path / "dist"
    with socket.socket() as probe:  # a free port: other test runs may share this machine
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "cnnviz_fast", "saliency", "--model", "zoo:digits", "--data", "digits", "--out", str(out), "--shard-size", "64",
               "--batch-size", "32", "--map-dtype", "float32", "--quiet"]
    killed = _python(*command, **{KILL_AFTER_SHARDS: "1", KILL_RANK: "1"})
    assert killed.returncode != 0 and not (out / "index.csv").exists()
    assert 1 in finished_shards(out)
    done_before = len(finished_shards(out))
    resumed = _python(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # at least those shards are skipped; once, on a heavily loaded machine, rank 0 of the killed
    # run committed 3 more shards after torchrun had returned (its SIGTERM lands late), so the
    # count may be higher. Committed shards are whole and equal to recomputed ones either way.
    resumed_count = re.search(r"\((\d+) shards already done\)", resumed.stdout)
    assert "2 rank(s)" in resumed.stdout and resumed_count and int(resumed_count.group(1)) >= done_before
    results = open_results(out)
    digits = zoo.DIGITS_NORMALIZE(zoo.digits("test")[0])
    assert [r["item"] for r in results] == list(range(len(digits)))
    fresh = tmp_path / "one"
    saliency_maps(model, digits, fresh, normalize=zoo.DIGITS_NORMALIZE, size=32, shard_size=64, batch_size=32,
                  map_dtype="float32", progress=False)
    single = open_results(fresh)
    assert np.array_equal(results.predicted, single.predicted)
    torch.testing.assert_close(torch.from_numpy(results.maps()), torch.from_numpy(single.maps()), **CLOSE)


def test_merge_joins_node_folders(tmp_path, model, inputs, capsys):
    """A run split over two "nodes" without a shared folder, joined by `cnnviz merge`."""
    from cnnviz_fast.cli import main

    fresh = tmp_path / "one"
    run(model, inputs, fresh)
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    for node, keep in ((node0, 0), (node1, 1)):
        (node / "shards").mkdir(parents=True)
        (node / "run.json").write_bytes((fresh / "run.json").read_bytes())
        for shard in finished_shards(fresh)[keep::2]:
            for suffix in (".npy", ".csv"):
                name = f"{shard:06d}{suffix}"
                (node / "shards" / name).write_bytes((fresh / "shards" / name).read_bytes())
    with pytest.raises(ValueError, match="2 of 4 shards are not finished here"):
        merge(tmp_path / "partial", [node0])
    assert main(["merge", str(node0), str(node0), str(node1)]) == 0  # into one of them
    assert "index of 30 images, 0 skipped" in capsys.readouterr().out
    merged, single = open_results(node0), open_results(fresh)
    assert merged.paths == single.paths and np.array_equal(merged.maps(), single.maps())
    other = tmp_path / "other"
    run(model, inputs[:5], other)
    with pytest.raises(ValueError, match="differs"):
        merge(tmp_path / "x", [node1, other])


def test_output_names_never_escape_out(tmp_path, model, pixels):
    """Input names with separators, dots, commas, quotes, unicode and absolute paths only ever
    appear inside index.csv; every file written lies under out."""
    images = tmp_path / "in"
    names = ["unused", "..x.png", 'q"uote,comma.png', "é ü.png", "-rf.png", "$(x).png"]
    (images / "sub").mkdir(parents=True)
    written = []
    for k, name in enumerate(names[1:]):
        path = images / "sub" / name
        Image.fromarray(as_uint8(pixels[k]), "L").save(path, format="PNG")
        written.append(path)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(written[0]), f"in/sub/../sub/{names[2]}", "../../../../etc/passwd.png"]))
    before = set(tmp_path.rglob("*"))
    for data, out in ((images, tmp_path / "o1"), (listing, tmp_path / "o2")):
        run(model, data, out, overlays=5)
    created = set(tmp_path.rglob("*")) - before
    assert created and all(p.is_relative_to(tmp_path / "o1") or p.is_relative_to(tmp_path / "o2") for p in created)
    assert open_results(tmp_path / "o1").paths == sorted(f"sub/{n}" for n in names[1:])
    assert open_results(tmp_path / "o2").errors()[0]["path"] == "../../../../etc/passwd.png"


def test_error_mid_run_commits_only_whole_shards(tmp_path, model, inputs):
    """An exception in the main loop leaves finished shards, no partial shard, and a
    rerun completes the same result."""
    calls = []

    def fail_on_fourth(module, args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(fail_on_fourth)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run(model, inputs[:24], tmp_path / "out", batch_size=4)
    finally:
        handle.remove()
    assert finished_shards(tmp_path / "out") == [0]  # shard 1 had only half its items
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["000000.csv", "000000.npy"]
    summary = run(model, inputs[:24], tmp_path / "out", batch_size=4)
    assert summary.resumed_shards == 1 and summary.images == 16 and summary.complete
    torch.testing.assert_close(torch.from_numpy(open_results(tmp_path / "out").maps()),
                               expected(model, inputs[:24])[0], **CLOSE)


def test_autocast_and_channels_last(tmp_path, model, inputs):
    maps, predicted, _ = expected(model, inputs)
    run(model, inputs, tmp_path / "nhwc", channels_last=True, batch_size=8)
    torch.testing.assert_close(torch.from_numpy(open_results(tmp_path / "nhwc").maps()), maps, **CLOSE)
    assert all(p.is_contiguous() for p in model.parameters())  # layout restored
    run(model, inputs, tmp_path / "bf16", dtype="bf16", batch_size=8)
    low = open_results(tmp_path / "bf16")
    assert low.settings["dtype"] == "bf16" and np.isfinite(low.maps()).all()
    assert (low.predicted == predicted.numpy()).mean() >= 0.9
    correlation = np.corrcoef(low.maps().ravel(), maps.numpy().ravel())[0, 1]
    assert correlation > 0.9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pinned_overlapped_and_gpu_decode(tmp_path, model, folder):
    """On a GPU: pinned batches, non-blocking copies both ways, nvJPEG decode; same maps as the CPU."""
    cpu = open_results(run(model, folder, tmp_path / "cpu").out)
    gpu_model = zoo.digits_cnn().cuda()
    for decode in ("pil", "gpu"):
        summary = run(gpu_model, folder, tmp_path / decode, device="cuda", decode=decode, num_workers=2)
        assert summary.complete and summary.skipped == len(BAD)
        result = open_results(tmp_path / decode)
        assert result.paths == cpu.paths
        if decode == "pil":
            # float16 shards: equal float32 maps up to rounding may land one half-precision
            # step (2^-10 relative) apart; allow two
            torch.testing.assert_close(torch.from_numpy(result.maps()), torch.from_numpy(cpu.maps()),
                                       rtol=2e-3, atol=1e-5)
        else:  # another JPEG decoder and resize: close pixels, so mostly the same predictions
            assert (result.predicted == cpu.predicted).mean() >= 0.8


def test_cli_data_factory_gives_model_inputs(tmp_path, model, inputs, monkeypatch, capsys):
    """`--data module:factory` (a Dataset here) is used as model inputs, as from Python."""
    from cnnviz_fast.cli import main

    (tmp_path / "my_factory.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        f"def data():\n    return TensorDataset(torch.load({str(tmp_path / 'x.pt')!r}))\n")
    torch.save(inputs[:6].clone(), tmp_path / "x.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["saliency", "--model", "zoo:digits", "--data", "my_factory:data", "--out", str(tmp_path / "out"),
                 "--map-dtype", "float32", "--quiet"]) == 0
    assert "6 images, 0 skipped" in capsys.readouterr().out
    torch.testing.assert_close(torch.from_numpy(open_results(tmp_path / "out").maps()),
                               expected(model, inputs[:6])[0], **CLOSE)


def test_npy_writer_commits_atomically(tmp_path):
    rows = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    writer = NpyWriter(tmp_path / "a.npy", (2, 3), np.float16)  # length unknown
    writer.write(rows[:3])
    writer.write(rows[3:])
    assert not (tmp_path / "a.npy").exists() and (tmp_path / "a.npy.partial").exists()
    writer.finish()
    assert np.array_equal(np.load(tmp_path / "a.npy"), rows.astype(np.float16))
    assert not (tmp_path / "a.npy.partial").exists()
    sized = NpyWriter(tmp_path / "b.npy", (2, 3), np.float32, length=5, durable=True)
    sized.write(rows)
    with pytest.raises(ValueError, match="yielded 4 inputs, expected length=5"):
        sized.finish()
    assert list(tmp_path.glob("b.npy*")) == []
    with pytest.raises(ValueError, match="rows must have shape"):
        NpyWriter(tmp_path / "c.npy", (2, 3), np.float32).write(rows[:, :1])


def test_device_decode_falls_back_to_pillow(folder, monkeypatch):
    """Files torchvision's decoders refuse (nvJPEG has no CMYK, say) are decoded by Pillow as on
    the CPU path; only files Pillow cannot read either are skipped."""
    import torchvision.io as tio

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported by this decoder")

    monkeypatch.setattr(tio, "decode_jpeg", refuse)
    monkeypatch.setattr(tio, "decode_image", refuse)
    files = [folder / "a" / "01-rgb.jpg", folder / "a" / "not-an-image.jpg", next(folder.rglob("*-cmyk.jpg"))]
    raw = [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in files]
    kept, pixels, failed = decode_on_device(raw, 32, 1, torch.device("cpu"))
    assert kept == [0, 2] and [i for i, _ in failed] == [1]
    for row, path in zip(pixels, [files[0], files[2]]):
        assert torch.equal(row, torch.from_numpy(decode_image(path, 32, 1)).permute(2, 0, 1))
