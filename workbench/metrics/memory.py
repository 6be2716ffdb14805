"""Resident memory of this process: current, peak, and a tracker that sees the peak of one block.

Linux keeps the peak resident set (VmHWM) per process and lets a process reset it by writing 5 to
/proc/self/clear_refs, so a tracker can attribute a peak to one block without polling.
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path
from typing import Any

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


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.peak_rss_bytes` (whole process) and `m.added_bytes` (above the start).

    Where the peak cannot be reset, a sampling thread (every 5 ms) stands in; it can miss short spikes.
    """

    def __enter__(self) -> "PeakMemory":
        self.start_rss_bytes = current_rss_bytes()
        self._exact = reset_peak_rss()
        self._sampled = self.start_rss_bytes
        self._stop = threading.Event()
        if not self._exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, current_rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._exact:
            self.peak_rss_bytes = peak_rss_bytes()
        else:
            self._thread.join()
            self.peak_rss_bytes = max(self._sampled, current_rss_bytes())
        self.added_bytes = self.peak_rss_bytes - self.start_rss_bytes


def gpu_peak_bytes(device: str) -> int | None:
    """Peak bytes torch allocated on the GPU; None on CPU, where it does not apply."""
    if device != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())
