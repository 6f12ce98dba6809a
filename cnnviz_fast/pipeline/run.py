"""The run loop: decode in workers, one forward + backward per batch in the main thread,
shards written by a background thread; resumable and sharded across torchrun ranks."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import registry
from ..registry import to_map
from ..core.preprocess import Normalize
from ..core.targets import is_predicted, resolve_target
from ..core.validation import check_choice, check_positive_int
from . import distributed
from .results import check_settings, write_index
from .sources import FileSource, StreamSource, PositionBatches, make_source
from .writer import BackgroundWriter, finished_shards, write_atomic

# name -> declared attribution Method (cnnviz_fast.registry): the pipeline runs every one of them
METHODS = {name: registry.get_method(name) for name in registry.attribution_methods()}
AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAP_DTYPES = ("float16", "float32")


@dataclass
class ExtraColumns:
    """Per-image numbers computed with each batch and stored next to its maps (extra columns
    of the shard CSVs and ``index.csv``; :class:`~cnnviz_fast.pipeline.Results` reads them).

    ``compute(model, inputs, classes, maps) -> Tensor[N, len(names)]`` gets the batch's model
    inputs, target classes ``LongTensor[N]`` and maps ``[N, H, W]`` (float32, before the cast
    to ``map_dtype``); ``settings`` (JSON) are recorded in run.json, so that a resumed run
    computes the same columns."""

    names: Sequence[str]
    settings: dict
    compute: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RunSummary:
    """What one call did (summed over ranks): ``images`` explained and ``skipped`` now,
    ``resumed_shards`` found finished at the start, ``seconds``; ``complete``: the index
    is written (``open_results(out)`` reads it)."""

    out: Path
    images: int
    skipped: int
    seconds: float
    resumed_shards: int
    complete: bool

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.images} images, {self.skipped} skipped, {self.seconds:.1f} s, {self.images_per_s:.1f} images/s"
                + (f" ({self.resumed_shards} shards already done)" if self.resumed_shards else "")
                + ("" if self.complete else "; index not written (shards missing here: see above)"))


def _pixels_to_inputs(normalize: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 pixels → model inputs. A :class:`Normalize` becomes one fused multiply-add
    (``x·1/(255σ) − μ/σ``): fewer passes over the batch than ``/255``, ``−μ``, ``/σ``."""
    if not isinstance(normalize, Normalize):
        normalize = copy.deepcopy(normalize).to(device)
        return lambda pixels: normalize(pixels.float().div_(255))
    scale = (1 / (255 * normalize.std)).to(device)
    shift = (-normalize.mean / normalize.std).to(device)
    return lambda pixels: torch.addcmul(shift, pixels.float(), scale)


def _layer(method, model: nn.Module, data, source, size, channels, layer, device, say: bool) -> str:
    """The layer ``method`` runs at: the given one (a name or module), else the registry's
    default for inputs shaped like ``data``'s (said on stderr when ``say``)."""
    if layer is not None:
        return registry.resolve_layer(method, model, None, layer)[0]
    if isinstance(data, torch.Tensor):
        probe = data[:1]
    elif isinstance(source, FileSource):
        probe = torch.zeros(1, channels, size, size)
    else:
        raise ValueError(f"layer: {method.name} needs one with Dataset or stream data (the default rule "
                         f"needs an input shape)")
    with torch.no_grad():
        first = next((p for p in model.parameters()), None)
        probe = probe.to(device if first is None else first.device, first.dtype if first is not None else probe.dtype)
    name, note = registry.resolve_layer(method, model, probe)
    if say:
        print(note, file=sys.stderr)
    return name


def model_fingerprint(model: nn.Module) -> str:
    """Class and a hash of every parameter and buffer: a resumed run must use the same model."""
    digest = hashlib.sha1(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _jsonable(value):
    return json.loads(json.dumps(value, default=repr))


def saliency_maps(
    model: nn.Module, data, out: Union[str, Path], method: str = "saliency",
    target: Union[str, int] = "predicted", *, normalize: Optional[nn.Module] = None, size: Optional[int] = None,
    batch_size: int = 64, num_workers: Optional[int] = None, device: Union[str, torch.device, None] = None,
    dtype: Optional[str] = None, channels_last: bool = False, map_dtype: str = "float16",
    shard_size: int = 1024, overlays: int = 0, decode: str = "pil", progress: bool = True,
    extra: Optional[ExtraColumns] = None, resize: str = "crop", **method_kwargs,
) -> RunSummary:
    """Attribution maps for every input of ``data`` with one method, streamed to the folder ``out``.

    Args:
        model: the network (moved to ``device``; left in its mode, hooks and memory format).
        data: a folder of images (recursive), a text file of image paths, a ``Tensor[M, C, H,
            W]``, a map-style ``Dataset``, an ``IterableDataset`` or a ``DataLoader``. Files are
            decoded to ``size``² pixels and passed through ``normalize``; tensors and dataset
            items are model inputs already.
        out: output folder (see :mod:`cnnviz_fast.pipeline.results`); read it with
            :func:`~cnnviz_fast.pipeline.open_results`. Rerunning into it resumes; other
            settings against it raise ``ValueError``.
        method: a declared attribution method (:data:`METHODS`, from :mod:`cnnviz_fast.registry`);
            ``method_kwargs`` go to it (``layer=``, ``window=``, …). A method that needs a layer
            and gets none uses the registry's default layer (said on stderr, recorded in
            run.json). Each attribution becomes one map per image by the method's
            ``map_rule`` (gradient magnitudes: max |·| over channels; signed additive
            attributions: sum over channels; CAMs and occlusion: as returned).
        target: ``"predicted"`` (each input's top class, from the same forward pass) or a class.
        batch_size: inputs per forward + backward; ``shard_size``: items per output shard.
        num_workers: decoding processes (default for files: up to 8 next to a GPU, 1 on a
            CPU; 0 for other sources).
        device: default the model's (under torchrun: ``cuda:LOCAL_RANK`` when GPUs exist).
        dtype: ``"bf16"`` / ``"fp16"`` to run under autocast; ``channels_last``: NHWC layout.
        map_dtype: ``"float16"`` (default) or ``"float32"`` on disk.
        overlays: also write PNG overlays of the first ``overlays`` items.
        decode: ``"pil"`` (Pillow in the workers) or ``"gpu"`` (nvJPEG on the device).
        resize: how files become ``size``² pixels: ``"crop"`` (default: shorter side, centre
            crop), ``"squash"`` or ``"pad"`` (:mod:`cnnviz_fast.core.images`).
        progress: a progress bar and a summary line on rank 0.
        extra: per-image numbers computed from each batch and stored with it (see
            :class:`ExtraColumns`; :func:`cnnviz_fast.metrics.evaluate_dataset` uses it).
    """
    check_choice(method, METHODS, "method")
    if not (is_predicted(target) or (isinstance(target, int) and not isinstance(target, bool))):
        raise ValueError(f"target must be 'predicted' or a class index, got {target!r}")
    check_choice(dtype, AUTOCAST, "dtype")
    check_choice(map_dtype, MAP_DTYPES, "map_dtype")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(shard_size, "shard_size")
    check_positive_int(overlays, "overlays", minimum=0)
    rank, world = distributed.rank_world()
    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    if decode == "gpu" and device.type != "cuda":
        raise ValueError(f"decode='gpu' needs a CUDA device, got device={str(device)!r}"
                         + ("" if torch.cuda.is_available() else " (no GPU is present)"))
    channels = normalize.channels if normalize is not None else None
    source = make_source(data, size=size, channels=channels, decode=decode, batch_size=batch_size, resize=resize)
    if source.pixels and normalize is None:
        raise ValueError("normalize is required to turn decoded pixels into model inputs")
    declared = METHODS[method]
    if declared.needs_layer:
        method_kwargs["layer"] = _layer(declared, model, data, source, size, channels, method_kwargs.get("layer"),
                                        device, rank == 0)
    if num_workers is None:  # on a CPU, decoding processes take cores from the compute
        num_workers = 0 if not isinstance(source, FileSource) else (
            min(8, os.cpu_count() or 1) if device.type == "cuda" else 1)
    check_positive_int(num_workers, "num_workers", minimum=0)

    out = Path(out)
    settings = _jsonable({
        "method": method, "method_kwargs": method_kwargs, "target": target, "model": model_fingerprint(model),
        "normalize": None if normalize is None else [normalize.mean.flatten().tolist(), normalize.std.flatten().tolist()],
        "size": size, "dtype": dtype, "map_dtype": map_dtype, "shard_size": shard_size, "source": source.describe(),
        **({"extra": {"columns": list(extra.names), **extra.settings}} if extra is not None else {}),
    })
    check_settings(out, settings)
    done = set(finished_shards(out))
    writer = BackgroundWriter(out, shard_size, np.dtype(map_dtype), rank=rank, overlays=overlays,
                              extra_columns=extra.names if extra is not None else ())
    on_gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast(device.type, AUTOCAST[dtype])) if dtype else contextlib.nullcontext
    to_inputs = _pixels_to_inputs(normalize, device) if source.pixels else None

    if isinstance(source, StreamSource):
        batches, total = source.batches(num_workers, on_gpu), None
        mine = lambda shard: shard % world == rank and shard not in done  # noqa: E731
    else:
        shards = -(-source.length // shard_size)
        pending = [k for k in range(shards) if k % world == rank and k not in done]
        sampler = PositionBatches(pending, shard_size, source.length, batch_size)
        batches = source.batches(sampler, num_workers, on_gpu)
        total = sum(min((k + 1) * shard_size, source.length) - k * shard_size for k in pending)
        mine = None

    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="img", desc=f"{method} (rank {rank} of {world})", file=sys.stderr,
               disable=not progress or rank != 0, smoothing=0.1)
    model = model.to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    formats = {name: p.is_contiguous(memory_format=torch.channels_last) for name, p in model.named_parameters()}
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images = skipped = seen = 0
    start = time.perf_counter()
    try:
        for batch in batches:
            seen = max(seen, int(batch.positions[-1]) + 1) if len(batch.positions) else seen
            if mine is not None:  # a stream: keep this rank's unfinished shards
                keep = [k for k, p in enumerate(batch.positions) if mine(int(p) // shard_size)]
                if not keep:
                    continue
                if len(keep) < len(batch.positions):
                    batch.positions, batch.ids = batch.positions[keep], [batch.ids[k] for k in keep]
                    batch.inputs = batch.inputs[keep]
            if isinstance(batch.inputs, list):  # raw bytes: decode on the GPU
                batch = source.decode_batch(batch, device)
            skipped += len(batch.skipped)
            if not len(batch.positions):
                writer.put((batch.positions, [], np.empty((0, 0, 0)), [], [], [], None, batch.skipped, None, None))
                bar.update(len(batch.skipped))
                continue
            x = batch.inputs.to(device, non_blocking=True)
            if source.pixels:
                x = to_inputs(x)
            x = x.contiguous(memory_format=layout)
            with autocast():
                attributions, output = declared(model, x, target=target, return_output=True, **method_kwargs)
            output = output.float()
            classes = resolve_target(target, output) if is_predicted(target) else torch.full(
                (output.shape[0],), target, dtype=torch.long, device=output.device)
            maps = to_map(attributions.detach(), declared.map_rule)
            columns = [maps.to(getattr(torch, map_dtype)), output.argmax(1), classes,
                       output.gather(1, classes[:, None])[:, 0]]
            if extra is not None:
                columns.append(extra.compute(model, x, classes, maps.float()).double())
            pixels = None
            if int(batch.positions[0]) < overlays:
                first = int(np.searchsorted(batch.positions, overlays))
                pixels = (batch.inputs[:first].float() / 255 if source.pixels else
                          normalize.inverse(x[:first].float()).clamp(0, 1) if normalize is not None else
                          _unit(x[:first].float())).cpu()
            if on_gpu:  # copies into pinned memory; the writer waits on the event
                host = [torch.empty(c.shape, dtype=c.dtype, pin_memory=True) for c in columns]
                for h, c in zip(host, columns):
                    h.copy_(c.detach(), non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                host, ready = [c.detach() for c in columns], None
            writer.put((batch.positions, batch.ids, host[0], host[1].numpy(), host[2].numpy(), host[3].numpy(),
                        ready, batch.skipped, pixels, host[4].numpy() if extra is not None else None))
            images += len(batch.positions)
            bar.update(len(batch.positions) + len(batch.skipped))
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    finally:
        bar.close()
        if channels_last:
            for name, p in model.named_parameters():
                if not formats[name]:
                    p.data = p.data.contiguous()
    seconds = time.perf_counter() - start
    if isinstance(source, StreamSource):
        length = int(distributed.all_max([seen])[0])
        write_atomic(out / "length.json", json.dumps({"length": length}) + "\n")
    images, skipped = distributed.all_sum([images, skipped])
    seconds = distributed.all_max([seconds])[0]
    distributed.barrier()
    complete = False
    if rank == 0:
        try:
            write_index(out)
            complete = True
        except ValueError as error:
            print(f"cnnviz saliency: {error}", file=sys.stderr)
    summary = RunSummary(out, int(images), int(skipped), seconds, len(done), complete)
    if progress and rank == 0:
        print(f"{method}: {summary.line()}", file=sys.stderr)
    return summary


def _unit(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    low, high = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
    return (x - low) / (high - low).clamp_min(1e-12)
