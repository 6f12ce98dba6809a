"""The benchmark harness shared by every ``bench_*.py``: time, build rows, describe the
machine, write results.

    python benchmarks/bench_<suite>.py [--quick] [--no-write] [--results-dir DIR] [--threads N]

    from common import argument_parser, finish, interleaved, row   # before importing cnnviz_fast
    t = interleaved({"ours": ours, "anchor": anchor}, rounds=5)     # seconds per call
    rows = [row("saliency vs bare autograd", t["ours"], t["anchor"], "<= 1.05x")]
    finish(args, "attribution", rows, notes=...)  # -> results/attribution-<machine-tag>.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils import benchmark

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # time this checkout's cnnviz_fast, not an installed copy
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, Any]:
    """CPU model, cores, torch threads/version and the GPU (if any)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        load = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
        "tf32": (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32) if gpu else None,
        "load_avg_1min": load,
    }


def machine_description(m: Optional[Dict[str, Any]] = None) -> str:
    m = m or machine()
    s = f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}"
    s += f", GPU {m['gpu']}" if m["gpu"] else ", no GPU"
    if m.get("load_avg_1min") is not None:
        s += f" (1-min load average at start: {m['load_avg_1min']})"
    return s


def machine_tag(m: Optional[Dict[str, Any]] = None) -> str:
    """Short file-name-safe tag, e.g. 'amd-epyc-2c' or 'amd-epyc-2c-nvidia-h100-80gb-hbm3'."""
    m = m or machine()
    slug = lambda s: re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")  # noqa: E731
    tag = f"{slug(m['cpu'])}-{m['cores']}c"
    if m["gpu"]:
        tag += "-" + slug(m["gpu"])
    return tag


# --------------------------------------------------------------------------- timing
# The one statistic: the MINIMUM over rounds. Other jobs on a shared machine only ever add
# time, so each contender's fastest round is its least disturbed one; interleaving the
# contenders round by round makes a slow spell hit them alike. (A median would still carry
# the load of the rounds it picks.)
TIMING = ("torch.utils.benchmark.Timer (CUDA synchronised, all torch threads); the contenders timed "
          "in turn, round after round, each measurement after Timer's own 2 untimed warm-up calls; "
          "statistic: the minimum over rounds.")


def interleaved(contenders: Dict[str, Callable[[], Any]], rounds: int, number: int = 1) -> Dict[str, float]:
    """Seconds per call of each contender: in each of ``rounds`` rounds every contender in
    turn makes ``number`` timed calls (their mean is the round's time); the minimum over
    rounds. ``Timer.timeit`` first makes max(number // 100, 2) untimed calls, so each
    contender is timed warm even right after another one ran (a call costs 3x its time)."""
    # Timer runs with 1 thread unless told: time with the threads machine() reports
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
              for name, fn in contenders.items()}
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.timeit(number).mean)
    return {name: min(t) for name, t in times.items()}


def assert_same_up_to_rounding(ours: torch.Tensor, anchor: torch.Tensor, what: str, tolerance: float = 1e-2) -> None:
    """Equal up to the order of float32 sums, norm-wise: channels-last batches
    (cnnviz_fast.core.layout) sum in another order, which can flip a ReLU or max-pool
    decision within rounding of a tie and reroute a whole gradient path (0.6% on a random
    ResNet-18 batch), so an elementwise check would fail where the computation is the same."""
    error = float((ours - anchor).norm() / anchor.norm())
    assert error < tolerance, f"{what}: relative difference {error:.2e} (at most {tolerance:g})"


# --------------------------------------------------------------------------- rows
UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "GiB": 1.0}  # GiB rows pass GiB as ours / anchor


def row(name: str, ours: float, anchor: float, target: str = "", unit: str = "ms", **extra: Any) -> Dict[str, Any]:
    """One results row (the schema of every benchmark), printed as it is made.

    ``ours`` and ``anchor`` are seconds (stored in ``unit``). ``target`` is '>= k x', '<= k x'
    or '' (information only). The ratio follows the target's direction: anchor / ours (a
    speedup) for '>=' and for no target, ours / anchor (a slowdown or a share) for '<='.
    ``result`` is PASS, MISS or ''. ``extra`` fields are appended as they are.
    """
    match = re.fullmatch(r"(>=|<=)\s*([0-9.]+)\s*x", target.strip())
    if target and not match:
        raise ValueError(f"target must look like '>= 1.3x' or '<= 1.05x', got {target!r}")
    at_most = bool(match) and match.group(1) == "<="
    ratio = ours / anchor if at_most else anchor / ours
    if not match:
        result = ""
    else:
        bound = float(match.group(2))
        result = "PASS" if (ratio <= bound if at_most else ratio >= bound) else "MISS"
    scale = UNITS[unit]
    r = {"name": name, "ours": ours * scale, "anchor": anchor * scale, "unit": unit, "ratio": ratio,
         "target": target, "result": result, **extra}
    print(f"{name:66s} ours {r['ours']:9.3g} {unit} | anchor {r['anchor']:9.3g} {unit} | ratio {ratio:6.3g}"
          + (f" (target {target}: {result})" if target else ""), flush=True)
    return r


def astronaut(size: int) -> torch.Tensor:
    """scikit-image's astronaut photo resized to ``size`` x ``size``: ``[1, 3, size, size]`` in [0, 1]."""
    from skimage import data
    from skimage.transform import resize
    image = resize(data.astronaut(), (size, size), anti_aliasing=True)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


FLOOR_BATCHES = (8, 16, 32, 64)
FLOOR_ROWS = 64  # rows timed per batch size (the per-row time is what counts)


def forward_floor(model: torch.nn.Module, image: torch.Tensor, target: int, passes: int) -> Dict[str, Any]:
    """The least time ``passes`` forward passes of copies of ``image [1, C, H, W]`` take on
    the CPU as our perturbation passes run them (the batch-norm-folded copy, channels-last
    batches), at the fastest of FLOOR_BATCHES rows per pass, with no masking and no other
    work: the time of the forward passes alone. A method that runs the same passes as its
    anchor cannot beat the anchor by more than ``anchor time / floor`` (its ceiling).
    Returns ``{"floor_s": seconds, "floor_batch": rows per pass}``."""
    from cnnviz_fast.attribution.perturbation._chunks import scoring_model
    with torch.no_grad():
        scores = model(image)[:, target]
        runner = scoring_model(model, image, target, scores)
        per_row = {}
        for batch in FLOOR_BATCHES:
            x = image.expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
            runner(x)  # the first pass of a shape pays oneDNN's set-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(max(1, FLOOR_ROWS // batch)):
                    runner(x)
                times.append((time.perf_counter() - start) / (max(1, FLOOR_ROWS // batch) * batch))
            per_row[batch] = sorted(times)[1]
    batch = min(per_row, key=per_row.get)
    return {"floor_s": round(per_row[batch] * passes, 4), "floor_batch": batch}


def ceiling(anchor_seconds: float, floor: Dict[str, Any]) -> Dict[str, Any]:
    """``floor`` with ``ceiling`` = anchor / floor: the most a method running the anchor's
    forward passes can gain (see :func:`forward_floor`)."""
    return {**floor, "ceiling": round(anchor_seconds / floor["floor_s"], 2)}


# --------------------------------------------------------------------------- command line, results
def argument_parser(doc: str, sections: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The options every bench script shares: --quick, --no-write, --results-dir and, given
    ``sections``, --only (a comma-separated subset, parsed into a list)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, few rounds: a smoke run (written as <name>-quick)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where to write (default: benchmarks/results)")
    parser.add_argument("--threads", type=int, action=_SetThreads,
                        help="torch intra-op threads (default: torch's; 1 steadies timings on a busy machine)")
    parser.add_argument("--device", type=device_argument, default="cpu",
                        help="where the models and data live: cpu (default) or cuda")
    if sections:
        def only(text: str) -> List[str]:
            chosen = [s for s in text.split(",") if s]
            unknown = sorted(set(chosen) - set(sections))
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {list(sections)}")
            return chosen
        parser.add_argument("--only", type=only, default=list(sections),
                            help=f"comma-separated subset of {','.join(sections)}")
    return parser


def device_argument(text: str) -> str:
    """``--device``: 'cpu' or 'cuda', refused up front when no GPU is visible."""
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda: no CUDA device is visible")
    if text == "cuda":  # IEEE float32 on both sides: cuDNN's default TF32 moves results by ~1e-3, which
        # the equality checks before timing would flag; machine() records the setting
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return text


def synchronize(device: str) -> None:
    """Waits for queued GPU work, so that a host clock read after it times the work."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class _SetThreads(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        if value < 1:
            parser.error(f"--threads must be >= 1, got {value}")
        torch.set_num_threads(value)  # before anything is timed; machine() then reports it
        setattr(namespace, self.dest, value)


def finish(args: argparse.Namespace, name: str, rows: List[Dict[str, Any]], notes: str = "",
           title: Optional[str] = None, timing: str = TIMING) -> Optional[str]:
    """Writes the rows of a benchmark (timed by ``interleaved`` unless ``timing`` says how)
    unless --no-write; a --quick run is written as ``<name>-quick`` so that it never
    replaces a full run's results."""
    missed = [r["name"] for r in rows if r.get("result") == "MISS"]
    print("all targets met" if not missed else f"targets missed: {missed}", flush=True)
    if args.no_write:
        return None
    path = write_results(name + ("-quick" if args.quick else ""), rows, notes, title,
                         directory=args.results_dir, timing=timing)
    print("wrote", path, flush=True)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_results(name: str, rows: List[Dict[str, Any]], notes: str = "", title: Optional[str] = None,
                  directory: Optional[str] = None, timing: Optional[str] = None) -> str:
    """Writes ``<directory>/<name>-<machine-tag>.md`` (a table of ``rows``) and ``.json``;
    returns the md path. ``directory`` defaults to benchmarks/results; ``timing`` (how the
    times were taken) is written beside the machine."""
    directory = directory or RESULTS_DIR
    os.makedirs(directory, exist_ok=True)
    m = machine()
    base = os.path.join(directory, f"{name}-{machine_tag(m)}")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    record = {"name": name, "date": stamp, "machine": m, "rows": rows, "notes": notes}
    if timing:
        record["timing"] = timing
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=2)
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = [f"# {title or name}", "", f"Machine: {machine_description(m)}  "]
    if timing:
        lines += [f"Timing: {timing}  "]
    lines += [f"Date: {stamp}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return base + ".md"
