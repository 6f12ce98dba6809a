"""The dataset pipeline over files (issue 22, item 4): a rerun redoes what changed on
disk, a link loop lists each image once, odd names are processed, a bad ``out`` is a
ValueError naming it."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cnnviz_fast import zoo
from cnnviz_fast.pipeline import open_results, saliency_maps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return zoo.digits_cnn()


@pytest.fixture(scope="module")
def pixels():
    return zoo.digits("test")[0][:12]


def save(pixels, k, path):
    Image.fromarray((pixels[k][0].numpy() * 255).round().astype(np.uint8), "L").save(path, format="PNG")


def run(model, data, out, **kwargs):
    return saliency_maps(model, data, out, normalize=zoo.DIGITS_NORMALIZE, size=32, map_dtype="float32",
                         progress=False, shard_size=2, **kwargs)


def maps_by_path(out):
    results = open_results(out)
    return {results[i]["path"]: np.asarray(results[i]["map"]) for i in range(len(results))}


def test_a_rerun_redoes_the_shards_whose_files_changed(tmp_path, model, pixels):
    data, out = tmp_path / "images", tmp_path / "out"
    data.mkdir()
    for k in range(6):
        save(pixels, k, data / f"{k}.png")
    first = run(model, data, out)
    assert first.images == 6
    before = maps_by_path(out)
    again = run(model, data, out)  # nothing changed: nothing redone
    assert again.images == 0 and again.resumed_shards == 3
    save(pixels, 9, data / "3.png")  # same name, new content (shard 1: 2.png, 3.png)
    stat = os.stat(data / "3.png")
    os.utime(data / "3.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock still sees it
    rerun = run(model, data, out)
    assert rerun.images == 2 and rerun.resumed_shards == 2
    after = maps_by_path(out)
    fresh = maps_by_path(run(model, data, tmp_path / "fresh") and tmp_path / "fresh")
    assert after.keys() == fresh.keys()
    for path in after:
        np.testing.assert_array_equal(after[path], fresh[path])
    assert not np.array_equal(after["3.png"], before["3.png"])
    np.testing.assert_array_equal(after["0.png"], before["0.png"])


def test_a_link_loop_lists_each_image_once(tmp_path, model, pixels):
    data = tmp_path / "images"
    (data / "sub").mkdir(parents=True)
    for k in range(3):
        save(pixels, k, data / ("sub" if k else ".") / f"{k}.png")
    os.symlink(".", data / "loop")
    os.symlink("..", data / "sub" / "up")
    summary = run(model, data, tmp_path / "out")
    assert summary.images == 3
    assert sorted(open_results(tmp_path / "out").paths) == ["0.png", "sub/1.png", "sub/2.png"]


def test_dot_dot_png_is_processed(tmp_path, model, pixels):
    data = tmp_path / "images"
    data.mkdir()
    save(pixels, 0, data / "..png")
    save(pixels, 1, data / ".png")
    summary = run(model, data, tmp_path / "out")
    assert summary.images == 2 and sorted(open_results(tmp_path / "out").paths) == ["..png", ".png"]


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_a_bad_out_is_a_value_error_naming_it(tmp_path, model, pixels, where):
    data = tmp_path / "images"
    data.mkdir()
    save(pixels, 0, data / "0.png")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"^out "):
        run(model, data, a_file if where == "a file" else a_file / "maps")
