"""Resident memory of this process (current and peak) and torch's GPU peak.

The measuring worker is a fresh process per variant, so its peak resident set (Linux's VmHWM, kept by
the kernel without polling) is that variant's own.
"""

from __future__ import annotations

import resource
from pathlib import Path

import psutil


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set of this process since it started (or since the last reset)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_peak_bytes(device: str) -> int | None:
    """Peak bytes torch allocated on the GPU; None on CPU, where it does not apply."""
    if device != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())
