"""Functions run inside worker processes by the tests (spawned processes import them by name)."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable


def allocate_and_report(payload: dict, emit: Callable[[str], None]) -> dict:
    """Touch a known number of bytes and report how far the process's peak RSS rose above the RSS before."""
    import numpy as np

    from workbench.metrics.memory import current_rss_bytes, peak_rss_bytes

    before = current_rss_bytes()
    block = np.ones(payload["bytes"], dtype=np.uint8)  # ones, so every page is really touched
    emit(f"allocated {block.nbytes}")
    del block
    peak = peak_rss_bytes()
    return {"added_bytes": peak - before, "process_peak_rss_bytes": peak}


def raise_error(payload: dict, emit: Callable[[str], None]) -> None:
    raise ValueError("a specific problem\nwith a second line")


def kill_self(payload: dict, emit: Callable[[str], None]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def segfault(payload: dict, emit: Callable[[str], None]) -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV in native code


def timed_window(payload: float, emit: Callable[[str], None]) -> dict:
    """A stand-in timing step: holds its node for `payload` seconds and reports when (the Ray task adds the node)."""
    import time

    started = time.time()
    emit("timing")
    time.sleep(payload)
    return {"window": [started, time.time()], "runtime": {}}


def calibrate_thread_counts(payload: dict, emit: Callable[[str], None]) -> dict:
    """The machine calibration (planning.machine.calibrate_worker) for each thread count in one worker process.

    The torch + transformers import is timed by the first calibration only (later ones find the modules loaded),
    so its import time and resident memory stand for every thread count, as they would in a fresh worker each."""
    from workbench.planning.machine import calibrate_worker

    profiles: dict = {}
    for threads in payload["threads"]:
        profile = calibrate_worker({"threads": threads}, emit)
        if profiles:
            first = next(iter(profiles.values()))
            profile.update(import_s=first["import_s"], runtime_base_rss_bytes=first["runtime_base_rss_bytes"])
        profiles[threads] = profile
    return profiles


def environment_and_modules(payload: list[str], emit: Callable[[str], None]) -> dict:
    """The worker's view of some environment variables, and whether torch was already imported when it started."""
    import sys

    return {"env": {name: os.environ.get(name) for name in payload}, "torch_preloaded": "torch" in sys.modules}
