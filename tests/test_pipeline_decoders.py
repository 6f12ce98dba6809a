"""The pipeline's decoder choice (cnnviz_fast.pipeline.decoders): ``--decode auto|pil|gpu|torchcodec``,
per-file fallbacks to Pillow, skips, and the device defaults (bf16 + channels-last on a GPU only).
The device decode paths run here on the CPU (their logic; nvJPEG itself runs in the CUDA test)."""
import numpy as np
import pytest
import torch
from PIL import Image

from cnnviz_fast import zoo
from cnnviz_fast.loading import decode_file
from cnnviz_fast.pipeline import open_results, saliency_maps
from cnnviz_fast.pipeline import decoders
from cnnviz_fast.pipeline.run import device_defaults

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
HAS_TORCHCODEC = decoders.torchcodec_available()
needs_torchcodec = pytest.mark.skipif(not HAS_TORCHCODEC, reason="needs torchcodec")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Digits as JPEG (RGB, gray, CMYK), PNG (8- and 16-bit, a larger one), and 3 bad files."""
    root = tmp_path_factory.mktemp("decoders")
    pixels = zoo.digits("test")[0][:8]
    kinds = ["rgb.jpg", "gray.jpg", "cmyk.jpg", "gray.png", "16bit.png", "large.png", "rgb.jpg", "gray.jpg"]
    for k, kind in enumerate(kinds):
        gray = Image.fromarray((pixels[k, 0].numpy() * 255).round().astype(np.uint8), "L")
        path = root / f"{k:02d}-{kind}"
        if kind == "rgb.jpg":
            gray.convert("RGB").save(path, quality=95)
        elif kind == "gray.jpg":
            gray.save(path, quality=95)
        elif kind == "cmyk.jpg":
            gray.convert("CMYK").save(path, quality=95)
        elif kind == "16bit.png":
            Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(path)
        elif kind == "large.png":
            gray.resize((64, 48)).save(path)
        else:
            gray.save(path)
    data = (root / "00-rgb.jpg").read_bytes()
    (root / "90-truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "91-not-an-image.jpg").write_text("hello")
    (root / "92-zero.png").write_bytes(b"")
    return root


GOOD = 8  # the first 8 files decode; the last 3 are skipped


def raw_bytes(folder):
    return [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) if path.stat().st_size
            else torch.empty(0, dtype=torch.uint8) for path in sorted(folder.iterdir())]


def pillow(path, size=32, channels=1):
    return torch.from_numpy(decode_file(path, size, channels)).permute(2, 0, 1)


# ------------------------------------------------------------------ the choice


def test_auto_picks_pillow_on_a_cpu_and_torchcodec_on_a_gpu_when_installed(monkeypatch):
    assert decoders.choose_decoder("auto", CPU) == "pil"
    monkeypatch.setattr(decoders, "torchcodec_available", lambda: True)
    assert decoders.choose_decoder("auto", CUDA) == "torchcodec"
    assert decoders.choose_decoder("auto", CPU) == "pil"
    for name in ("pil", "gpu", "torchcodec"):
        assert decoders.choose_decoder(name, CUDA) == name
    monkeypatch.setattr(decoders, "torchcodec_available", lambda: False)
    assert decoders.choose_decoder("auto", CUDA) == "pil"


def test_unusable_choices_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"decode must be one of \['auto', 'pil', 'gpu', 'torchcodec'\], got 'dali'"):
        decoders.choose_decoder("dali", CPU)
    with pytest.raises(ValueError, match="decode='gpu' needs a CUDA device"):
        decoders.choose_decoder("gpu", CPU)
    monkeypatch.setattr(decoders, "torchcodec_available", lambda: False)
    with pytest.raises(ValueError, match="decode='torchcodec' needs the torchcodec package"):
        decoders.choose_decoder("torchcodec", CPU)


def test_device_decoding_only_for_device_decoders_on_a_gpu():
    assert decoders.runs_on_device("gpu", CUDA) and decoders.runs_on_device("torchcodec", CUDA)
    assert not decoders.runs_on_device("torchcodec", CPU) and not decoders.runs_on_device("pil", CUDA)


def test_device_defaults_bf16_and_channels_last_on_a_gpu_only():
    assert device_defaults("auto", None, CPU) == (None, False)
    assert device_defaults("auto", None, CUDA) == ("bf16", True)
    assert device_defaults("fp32", False, CUDA) == (None, False)
    assert device_defaults(None, None, CUDA) == (None, True)
    assert device_defaults("fp16", True, CPU) == ("fp16", True)


def test_cli_takes_every_decoder_and_the_new_defaults():
    from cnnviz_fast.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["saliency", "--out", "x"])
    assert (args.decode, args.dtype, args.channels_last) == ("auto", "auto", None)
    for name in decoders.DECODE_CHOICES:
        assert parser.parse_args(["saliency", "--out", "x", "--decode", name]).decode == name
    args = parser.parse_args(["saliency", "--out", "x", "--dtype", "fp32", "--no-channels-last"])
    assert (args.dtype, args.channels_last) == ("fp32", False)


# ------------------------------------------------------------------ decoding and fallbacks


@pytest.mark.parametrize("decode", ["gpu", pytest.param("torchcodec", marks=needs_torchcodec)])
def test_device_path_keeps_good_files_and_skips_bad_ones(folder, decode):
    kept, pixels, failed = decoders.decode_on_device(raw_bytes(folder), 32, 1, CPU, decode=decode)
    assert kept == list(range(GOOD)) and [i for i, _ in failed] == [8, 9, 10]
    assert pixels.shape == (GOOD, 1, 32, 32) and pixels.dtype == torch.uint8
    for row, path in zip(pixels, sorted(folder.iterdir())):
        difference = (row.int() - pillow(path).int()).abs().float().mean()
        assert difference < 4, (path.name, difference)  # another JPEG decoder and resize: close


@needs_torchcodec
def test_what_torchcodec_refuses_goes_to_pillow(folder, monkeypatch):
    import torchcodec.decoders as tc

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported by this decoder")

    def sixteen_bit(data, mode="RGB"):  # a 16-bit result must not be clamped to 255
        return torch.full((1, 32, 32), 40000, dtype=torch.uint16)

    monkeypatch.setattr(tc, "decode_jpeg", refuse)
    monkeypatch.setattr(tc, "decode_image", sixteen_bit)
    kept, pixels, failed = decoders.decode_on_device(raw_bytes(folder), 32, 1, CPU, decode="torchcodec")
    assert kept == list(range(GOOD)) and [i for i, _ in failed] == [8, 9, 10]
    for row, path in zip(pixels, sorted(folder.iterdir())):
        assert torch.equal(row, pillow(path)), path.name  # every file by Pillow, exactly


@needs_torchcodec
def test_torchcodec_in_a_cpu_worker_matches_pillow_closely(folder):
    for path in sorted(folder.iterdir())[:GOOD]:
        for channels in (1, 3):
            ours = decoders.decode_in_worker(str(path), 24, channels, "crop", "torchcodec")
            assert ours.shape == (24, 24, channels) and ours.dtype == np.uint8
            reference = decode_file(path, 24, channels)
            assert np.abs(ours.astype(int) - reference.astype(int)).mean() < 4, path.name
    with pytest.raises(Exception):  # what neither decoder reads raises, and the run skips it
        decoders.decode_in_worker(str(folder / "91-not-an-image.jpg"), 24, 1, "crop", "torchcodec")


@pytest.mark.parametrize("decode", ["auto", pytest.param("torchcodec", marks=needs_torchcodec)])
def test_pipeline_runs_each_cpu_decoder_with_the_same_skips(folder, tmp_path, decode):
    model = zoo.digits_cnn()
    runs = {}
    for name in ("pil", decode):
        summary = saliency_maps(model, folder, tmp_path / name, normalize=zoo.DIGITS_NORMALIZE, size=32,
                                decode=name, num_workers=0, progress=False, map_dtype="float32")
        assert summary.images == GOOD and summary.skipped == 3
        runs[name] = open_results(tmp_path / name)
    assert runs[decode].paths == runs["pil"].paths
    assert (runs[decode].predicted == runs["pil"].predicted).mean() >= 0.75
    run_json = (tmp_path / decode / "run.json").read_text()
    assert '"dtype": null' in run_json  # on a CPU the defaults stay float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode", ["gpu", pytest.param("torchcodec", marks=needs_torchcodec)])
def test_cuda_device_decoders_match_pillow_closely(folder, decode):
    kept, pixels, failed = decoders.decode_on_device(raw_bytes(folder), 32, 1, CUDA, decode=decode)
    assert kept == list(range(GOOD)) and [i for i, _ in failed] == [8, 9, 10]
    assert pixels.device.type == "cuda"
    for row, path in zip(pixels.cpu(), sorted(folder.iterdir())):
        assert (row.int() - pillow(path).int()).abs().float().mean() < 4, path.name
