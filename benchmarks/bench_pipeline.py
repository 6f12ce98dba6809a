"""Dataset-scale saliency (`cnnviz_fast.pipeline`) end to end on generated JPEGs.

    python benchmarks/bench_pipeline.py [--images 1000] [--resnet-images 128] [--rss 1000 5000]
                                        [--resume-images 2000] [--num-workers 1] [--no-write]

For the zoo digits model (32 px, gray) and a random-weight ResNet-18 (224 px, from 256 px JPEGs):
  pipeline_vs_bare    end-to-end images/s of saliency_maps(folder) vs the bare forward+backward
                      of the same model and batch size on pre-decoded tensors      target >= 0.9
  pipeline_vs_captum  vs a plain loop: DataLoader (Pillow decode + resize in the same number of
                      workers), a forward for the prediction, Captum Saliency, np.save per batch
                                                                                   target >= 1.5x
Digits model only (fast enough for thousands of images on a CPU):
  peak_rss            peak RSS of the main process (a fresh subprocess each) at --rss sizes;
                      largest / smallest                                           target <= 1.10
  resume              wall time of the same command rerun after a SIGKILL at ~50% of the shards,
                      over a full uninterrupted run (both subprocesses; medians of --rounds)
                                                                                   target <= 0.60
Throughputs: one pass over the images each (end to end for the pipeline and Captum: listing,
worker start, decoding, writing), in --rounds interleaved rounds, medians reported; the
machine's load average is recorded, as other work on a shared machine skews them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import device_argument, machine_description, synchronize, write_results  # noqa: E402

from cnnviz_fast import zoo  # noqa: E402
from cnnviz_fast.pipeline import saliency_maps  # noqa: E402
from cnnviz_fast.pipeline.writer import KILL_AFTER_SHARDS  # noqa: E402

MODELS = {  # name -> (factory, normalize, input size, JPEG size, channels)
    "digits": (zoo.digits_cnn, zoo.DIGITS_NORMALIZE, 32, 32, 1),
    "resnet18": (zoo.resnet18, zoo.IMAGENET_NORMALIZE, 224, 256, 3),
}


def make_jpegs(folder: Path, count: int, size: int, channels: int) -> Path:
    """``count`` JPEGs in 10 sub-folders: digits (gray) or smooth random colour fields."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    digits = (zoo.digits("all", size=size)[0][:, 0].numpy() * 255).astype(np.uint8) if channels == 1 else None
    for k in range(count):
        sub = folder / f"{k % 10}"
        sub.mkdir(exist_ok=True)
        if digits is not None:
            image = Image.fromarray(digits[k % len(digits)], "L")
        else:
            coarse = generator.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse, "RGB").resize((size, size), Image.BICUBIC)
        image.save(sub / f"{k:06d}.jpg", quality=90)
    return folder


def bare_throughput(model, inputs: torch.Tensor, batch_size: int, dtype: str = "fp32") -> float:
    """Images/s of forward + backward to the inputs (top-class score) on decoded tensors, under
    autocast for ``dtype`` bf16 / fp16 (the same dtype as the pipeline's run)."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)

    def step(x):
        x = x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, amp, enabled=amp is not None):
            output = model(x)
        score = output.gather(1, output.argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(score, x)
        return grad.abs().amax(1)

    step(inputs[:batch_size])
    synchronize(inputs.device)
    start = time.perf_counter()
    for first in range(0, len(inputs), batch_size):
        step(inputs[first:first + batch_size])
    synchronize(inputs.device)
    return len(inputs) / (time.perf_counter() - start)


class PlainFolder(Dataset):
    """What a user writes: Pillow open, convert, resize, to tensor, normalise."""

    def __init__(self, files, size, channels, normalize):
        self.files, self.size, self.mode, self.normalize = files, size, "RGB" if channels == 3 else "L", normalize

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = Image.open(self.files[index]).convert(self.mode).resize((self.size, self.size), Image.BILINEAR)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        array = array.permute(2, 0, 1) if array.dim() == 3 else array[None]
        return self.normalize(array[None])[0]


def captum_loop(model, folder: Path, size, channels, normalize, batch_size, workers, out: Path) -> float:
    from captum.attr import Saliency

    files = sorted(folder.rglob("*.jpg"))
    loader = DataLoader(PlainFolder(files, size, channels, normalize), batch_size=batch_size, num_workers=workers)
    saliency = Saliency(model)
    device = next(model.parameters()).device
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for index, x in enumerate(loader):
        x = x.to(device)
        with torch.no_grad():
            predicted = model(x).argmax(1)
        maps = saliency.attribute(x, target=predicted, abs=True).amax(1)
        np.save(out / f"batch{index:06d}.npy", maps.cpu().numpy())
    return len(files) / (time.perf_counter() - start)


def pipeline_throughput(model, folder, size, normalize, batch_size, workers, out, decode="pil",
                        dtype="fp32") -> float:
    start = time.perf_counter()
    summary = saliency_maps(model, folder, out, normalize=normalize, size=size, batch_size=batch_size,
                            num_workers=workers, shard_size=batch_size * 8, progress=False, decode=decode,
                            dtype=dtype)
    assert summary.complete
    return summary.images / (time.perf_counter() - start)


def decoded(folder: Path, size, channels, normalize) -> torch.Tensor:
    files = sorted(folder.rglob("*.jpg"))
    return torch.stack([PlainFolder(files, size, channels, normalize)[k] for k in range(len(files))])


def cli(folder: Path, out: Path, shard_size: int, workers: int, **env) -> tuple:
    """Run ``cnnviz saliency`` on the digits in a subprocess; (seconds, return code, stderr)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
    code = ("import sys; from cnnviz_fast.cli import main; main(sys.argv[1:]); "
            "print('peak_rss_kb', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    command = [sys.executable, "-c", code, "saliency", "--model", "digits", "--data", str(folder),
               "--out", str(out), "--shard-size", str(shard_size), "--num-workers", str(workers),
               "--batch-size", "64", "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    return time.perf_counter() - start, done.returncode, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="digits JPEGs for the throughputs")
    parser.add_argument("--resnet-images", type=int, default=128, help="224 px JPEGs for ResNet-18")
    parser.add_argument("--rss", type=int, nargs=2, default=(1000, 5000), help="sizes for the peak-RSS check")
    parser.add_argument("--resume-images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--only", default="throughput,rss,resume")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--device", type=device_argument, default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--decode", choices=("pil", "gpu", "torchcodec", "auto"), default="pil",
                        help="the pipeline's decoding: Pillow in the workers, torchvision's nvJPEG on the GPU, "
                             "TorchCodec (batched nvJPEG on a GPU), or the pipeline's choice")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype of both the pipeline and the bare anchor (the pipeline's GPU default "
                             "is bf16 with channels-last)")
    args = parser.parse_args()
    print(machine_description())
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        if "throughput" in args.only:
            for name, count in (("digits", args.images), ("resnet18", args.resnet_images)):
                factory, normalize, size, jpeg, channels = MODELS[name]
                model = factory().eval().to(args.device)
                folder = make_jpegs(work / f"{name}-jpegs", count, jpeg, channels)
                tensors = decoded(folder, size, channels, normalize).to(args.device)
                speeds = {"bare": [], "cnnviz": [], "captum": []}
                for round_ in range(args.rounds):  # interleaved: load changes hit all three alike
                    speeds["bare"].append(bare_throughput(model, tensors, args.batch_size, args.dtype))
                    speeds["cnnviz"].append(pipeline_throughput(model, folder, size, normalize, args.batch_size,
                                                                args.num_workers, work / f"{name}-out{round_}",
                                                                args.decode, args.dtype))
                    speeds["captum"].append(captum_loop(model, folder, size, channels, normalize, args.batch_size,
                                                        args.num_workers, work / f"{name}-captum{round_}"))
                    print(name, {k: round(v[-1], 1) for k, v in speeds.items()})
                ours = statistics.median(speeds["cnnviz"])
                for task, anchor, limit in (("pipeline_vs_bare", "bare", 0.9), ("pipeline_vs_captum", "captum", 1.5)):
                    # the ratio within each round (same load on both sides), median over rounds
                    ratios = [a / b for a, b in zip(speeds["cnnviz"], speeds[anchor])]
                    ratio = statistics.median(ratios)
                    rows.append({"task": task, "model": name, "device": args.device, "decode": args.decode,
                                 "dtype": args.dtype,
                                 "images": count, "batch": args.batch_size,
                                 "workers": args.num_workers, "anchor_img_s": statistics.median(speeds[anchor]),
                                 "cnnviz_img_s": ours, "ratio": ratio,
                                 "round_ratios": " ".join(f"{r:.2f}" for r in ratios),
                                 "target": f">= {limit}" + ("x" if limit > 1 else ""),
                                 "result": "PASS" if ratio >= limit else "MISS"})
                    print(rows[-1])
        if "rss" in args.only:
            peaks = {}
            for count in args.rss:
                folder = make_jpegs(work / f"rss-{count}", count, 32, 1)
                seconds, code, text = cli(folder, work / f"rss-out-{count}", 256, args.num_workers)
                assert code == 0, text[-2000:]
                peaks[count] = int(text.split("peak_rss_kb")[1].split()[0]) / 1024
                print(f"peak RSS at {count} images: {peaks[count]:.0f} MiB ({seconds:.1f} s)")
            small, large = min(args.rss), max(args.rss)
            ratio = peaks[large] / peaks[small]
            rows.append({"task": "peak_rss", "model": "digits", "images": f"{small} vs {large}",
                         "anchor_img_s": "", "cnnviz_img_s": "", "rss_mib": f"{peaks[small]:.0f} vs {peaks[large]:.0f}",
                         "ratio": ratio, "target": "<= 1.10", "result": "PASS" if ratio <= 1.10 else "MISS"})
            print(rows[-1])
        if "resume" in args.only:
            count, shard = args.resume_images, 128
            folder = make_jpegs(work / f"resume-{count}", count, 32, 1)
            half = -(-count // shard) // 2
            fulls, resumes = [], []
            for round_ in range(args.rounds):  # interleaved rounds, medians
                full, code, text = cli(folder, work / f"full{round_}", shard, args.num_workers)
                assert code == 0, text[-2000:]
                resumed_out = work / f"resumed{round_}"
                _, code, text = cli(folder, resumed_out, shard, args.num_workers, **{KILL_AFTER_SHARDS: str(half)})
                assert code == -9, text[-2000:]
                resumed, code, text = cli(folder, resumed_out, shard, args.num_workers)
                assert code == 0 and f"{half} shards already done" in text, text[-2000:]
                fulls.append(full)
                resumes.append(resumed)
                print(f"resume round {round_}: full {full:.1f} s, resumed {resumed:.1f} s")
            full, resumed = statistics.median(fulls), statistics.median(resumes)
            ratios = [b / a for a, b in zip(fulls, resumes)]
            ratio = statistics.median(ratios)
            rows.append({"task": "resume", "model": "digits", "images": count, "anchor_s": full,
                         "cnnviz_s": resumed, "ratio": ratio, "round_ratios": " ".join(f"{r:.2f}" for r in ratios),
                         "target": "<= 0.60",
                         "result": "PASS" if ratio <= 0.6 else "MISS",
                         "note": f"killed after {half} of {-(-count // shard)} shards; whole commands "
                                 "(process start included)"})
            print(rows[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_write:
        notes = (f"Generated JPEGs: digits {args.images} (32 px gray), ResNet-18 {args.resnet_images} "
                 f"(256 px colour, resized to 224); batch {args.batch_size}, {args.num_workers} decode worker(s); "
                 f"{args.rounds} interleaved rounds, ratio = median of the per-round ratios. On a CPU the decoding "
                 "worker, the writer thread and the compute share the same cores (and on this shared machine, "
                 "other jobs' too: small ops that torch parallelises stall when a thread is descheduled), so "
                 "decoding cannot be hidden as it is next to a GPU. Against Captum the saving is one forward of "
                 "three passes (forward + backward ~ 3 forwards), so ~1.33x is the compute-bound ceiling on a CPU "
                 "for equal passes; beyond it decode/writing overlap and, for large colour batches on a CPU, "
                 "the channels-last layout (cnnviz_fast.core.layout; digits are 1-channel and stay contiguous).")
        suffix = {"pil": "", "gpu": "-nvjpeg"}.get(args.decode, "-" + args.decode)
        suffix += "" if args.dtype == "fp32" else "-" + args.dtype
        print(write_results("pipeline" + suffix, rows, notes=notes, title="Dataset-scale saliency pipeline"))


if __name__ == "__main__":
    main()
