"""Small shared helpers for the benchmarks: describe the machine, write results.

    from common import machine, write_results
    write_results("ops", rows, notes=...)   # -> benchmarks/results/ops-<machine-tag>.md + .json
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from typing import Any, Dict, List, Optional

import torch

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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_results(name: str, rows: List[Dict[str, Any]], notes: str = "", title: Optional[str] = None) -> str:
    """Writes ``results/<name>-<machine-tag>.md`` (a table of ``rows``) and ``.json``; returns the md path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    m = machine()
    base = os.path.join(RESULTS_DIR, f"{name}-{machine_tag(m)}")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(base + ".json", "w") as f:
        json.dump({"name": name, "date": stamp, "machine": m, "rows": rows, "notes": notes}, f, indent=2)
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = [
        f"# {title or name}",
        "",
        f"Machine: {machine_description(m)}  ",
        f"Date: {stamp}",
        "",
    ]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return base + ".md"
