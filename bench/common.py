"""Helpers shared by the bench scripts: threads, device names, memory, timing, tables, JSON.

Memory: on CUDA, bytes allocated by torch (``max_memory_allocated`` since ``reset_peak``); on CPU, the
process's resident set size. ``reset_peak`` writes ``5`` to ``/proc/self/clear_refs``, which resets
Linux's peak RSS (``VmHWM``), so a peak can be taken over one phase (e.g. the training steps, not the
model building before them); where that is not allowed it falls back to the lifetime peak
(``ru_maxrss``) and says so in ``peak_scope``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import re
import resource
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads``; on a busy machine ``1`` avoids OpenMP threads waiting for a
    descheduled sibling (2 threads on 2 shared cores made tiny steps ~50x slower here)."""
    if threads:
        torch.set_num_threads(threads)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The options every model benchmark takes: --device, --threads, --seed, --json."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)


def setup_run(args: argparse.Namespace) -> torch.device:
    """Apply --threads, return the --device."""
    set_threads(args.threads)
    return pick_device(args.device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(key: str) -> float | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


_PEAK_SCOPE = {"cpu": "lifetime"}


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _PEAK_SCOPE["cpu"] = "since reset"
    except OSError:
        _PEAK_SCOPE["cpu"] = "lifetime"


def current_memory_mb(device: torch.device) -> float:
    """CUDA: bytes allocated by torch now; CPU: resident set size now."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mb("VmRSS") or 0.0


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, what it covers): CUDA max allocated since ``reset_peak``; CPU peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated since reset"
    hwm = _status_mb("VmHWM")
    if hwm is not None and _PEAK_SCOPE["cpu"] == "since reset":
        return hwm, "peak RSS since reset"
    return process_peak_rss_mb(), "peak RSS of the process"


def process_peak_rss_mb() -> float:
    """Peak RSS over the whole process (model building included); Linux reports KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so the next CPU
    peak-RSS window does not start with a previous model's freed-but-kept pages."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """A markdown table of ``rows``; ``columns``: (key, header)."""
    print("| " + " | ".join(h for _, h in columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        print("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")


def environment(device: torch.device) -> dict[str, Any]:
    return {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}
