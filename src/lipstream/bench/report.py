"""Timing and result files shared by every benchmark.

Each benchmark times with `median_ms` (wall clock, or CUDA events on a GPU) or, to compare with a
baseline on the CPU, `interleaved_median_ms`, prints a table with
`format_table`, and records its rows with `write_results` as
`bench/results/<name>-<device>-<date>.json` holding device, commit, date, settings and medians."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


RESULTS_DIR = Path(os.environ.get("LIPSTREAM_BENCH_RESULTS", "bench/results"))


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 3, device: torch.device | str | None = None) -> float:
    """Median milliseconds of `fn()` over `reps` calls after `warmup` calls.

    On a CUDA device each call is bracketed by CUDA events, so queued GPU work is counted and host
    time spent waiting is not mistaken for it."""
    import torch

    for _ in range(warmup):
        fn()
    cuda = device is not None and torch.device(device).type == "cuda"
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_median_ms(fns: Sequence[Callable[[], object]], reps: int, warmup: int = 3,
                          block: int = 10) -> list[float]:
    """Median wall-clock milliseconds of each of `fns` over `reps` calls, taken in turns of `block`
    calls each, so that a baseline and its contenders share the same stretch of time: on a shared
    host the speed drifts over seconds, and timing each in one stretch would put that drift into
    their ratio. Within a turn the calls run back to back, as in a plain loop."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < reps:
        for fn, record in zip(fns, times):
            for _ in range(min(block, reps - len(record))):
                t0 = time.perf_counter()
                fn()
                record.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(record) for record in times]


def device_name(device: torch.device | str) -> str:
    """A human name for the device the figures were taken on, e.g. 'NVIDIA H100 80GB HBM3' or the CPU model."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; floats are shown with 3 significant decimals."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, device: torch.device | str, settings: dict, rows: list[dict],
                  results_dir: Path | None = None) -> Path:
    """Write one benchmark's results as JSON and return the path."""
    import torch

    now = _dt.datetime.now(_dt.UTC)
    dev = device_name(device)
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")[:40]
    out_dir = results_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{slug}-{now:%Y%m%dT%H%M%SZ}.json"
    doc = {
        "benchmark": name,
        "device": dev,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "settings": settings,
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
