"""This machine's memory bandwidth and matmul speed, measured once and cached: the planner's time estimates
and every record's decode roofline (roofline.py) divide by them.

    python -m workbench plan presets/quickstart.yaml      # calibrates once, then prints the plan

The machine profile (bandwidth, matmul FLOP/s, the time to import torch + transformers and the
resident memory that costs) is measured once per CPU, thread count and torch version in a fresh
worker process and cached in `$WORKBENCH_HOME/machine_profile.json`. Best-of-N timings, and the
calibration records how many cores other processes used meanwhile: one measured under contention
(> 0.25 core) is used for that run only, marked provisional, and measured again next time; of the
clean ones the cache keeps the best bandwidth and the best matmul speed. `plan --recalibrate`
measures again and prints the contention it saw.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from workbench.paths import workbench_home

MIB = 1 << 20
BANDWIDTH_BUFFER_BYTES = 256 * MIB  # 8x this machine's 32 MiB L3; any cache is far smaller than the buffer
PROFILE_FILE = "machine_profile.json"
CALIBRATION_CONTENTION = 0.25  # other processes' mean cores above which a calibration is not cached


def _cpu_probe() -> Any:
    """The /proc reading contention is computed from (a module attribute, so tests can load the machine)."""
    from workbench.metrics.latency import cpu_sample

    return cpu_sample()


def measure_bandwidth(threads: int, buffer_bytes: int = BANDWIDTH_BUFFER_BYTES, repeats: int = 8,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Best-of-`repeats` torch copy of a float32 buffer (read + write bytes counted) and a read-only sum.

    `clock` is injectable so tests can check the size/time arithmetic with a fake clock.
    """
    import torch

    torch.set_num_threads(threads)
    n = buffer_bytes // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first: page faults are not bandwidth
    copy_best = read_best = float("inf")
    for _ in range(repeats):
        started = clock()
        dst.copy_(src)
        copy_best = min(copy_best, clock() - started)
        started = clock()
        float(src.sum())
        read_best = min(read_best, clock() - started)
    moved = 2 * n * 4
    return {
        "method": f"torch copy_ of a {n * 4 // MIB} MiB float32 buffer, best of {repeats}; read + write bytes counted",
        "threads": threads, "buffer_bytes": n * 4, "bytes_moved": moved, "copy_best_s": copy_best,
        "copy_bytes_s": moved / copy_best, "read_best_s": read_best, "read_bytes_s": n * 4 / read_best,
        # The decode limit uses the faster of the two: a roofline is an upper bound.
        "bandwidth_bytes_s": max(moved / copy_best, n * 4 / read_best),
    }


def measure_matmul(threads: int, size: int = 1024, repeats: int = 20) -> dict[str, Any]:
    """Best-of-`repeats` float32 `size x size` matmul: 2 * size^3 FLOPs."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up (thread pool, allocator)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return {"size": size, "best_s": best, "flops_s": 2 * size**3 / best}


def calibrate_worker(payload: dict, emit: Callable[[str], None]) -> dict[str, Any]:
    """Worker-process entry (a fresh interpreter, so import time and resident memory are real)."""
    from workbench.metrics.memory import current_rss_bytes

    started = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    import_s = time.perf_counter() - started
    base_rss = current_rss_bytes()
    from workbench.metrics.latency import measure_contention

    def measure() -> tuple[dict, dict]:
        emit("measuring memory bandwidth")
        bandwidth = measure_bandwidth(payload["threads"])
        emit("measuring matmul speed")
        return bandwidth, measure_matmul(payload["threads"])

    (bandwidth, matmul), contention = measure_contention(measure, probe=lambda: _cpu_probe())
    return {"machine": machine_description(payload["threads"]), "torch": torch.__version__,
            "import_s": import_s, "runtime_base_rss_bytes": base_rss, "bandwidth": bandwidth, "matmul": matmul,
            "contention": contention, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def machine_description(threads: int) -> dict[str, Any]:
    from workbench.environment import cpu_name

    try:
        import psutil

        memory = psutil.virtual_memory().total
    except Exception:  # pragma: no cover - psutil is a dependency; be robust anyway
        memory = None
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "memory_bytes": memory, "threads": threads}


def _profile_key(threads: int) -> str:
    from importlib.metadata import PackageNotFoundError, version

    from workbench.environment import cpu_name

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "absent"
    return f"{cpu_name()}|{os.cpu_count()} cpus|{threads} threads|torch {torch_version}"


def _stored_profiles() -> dict[str, Any]:
    try:
        profiles = json.loads((workbench_home() / PROFILE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return profiles if isinstance(profiles, dict) else {}


def cached_profile(threads: int) -> dict[str, Any] | None:
    """The clean calibration stored for this CPU and thread count, or None.

    Entries from before contention was recorded are not trusted as they are (one of them stored a
    contended 5.8 GB/s for good): the next run measures again and replaces them.
    """
    found = _stored_profiles().get(_profile_key(threads))
    return found if isinstance(found, dict) and "contention" in found else None


def _contended(profile: dict[str, Any]) -> bool:
    contention = profile.get("contention")
    return contention is not None and contention > CALIBRATION_CONTENTION


def best_of(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new`, with the faster bandwidth and matmul of the two clean calibrations (slow readings are noise)."""
    if not old:
        return {**new, "calibrations": 1}
    best = {**new, "calibrations": int(old.get("calibrations", 1)) + 1}
    if old["bandwidth"]["bandwidth_bytes_s"] > new["bandwidth"]["bandwidth_bytes_s"]:
        best["bandwidth"] = {**old["bandwidth"], "measured_at": old["bandwidth"].get("measured_at", old.get("measured_at"))}
    if old["matmul"]["flops_s"] > new["matmul"]["flops_s"]:
        best["matmul"] = {**old["matmul"], "measured_at": old["matmul"].get("measured_at", old.get("measured_at"))}
    return best


def machine_profile(threads: int, refresh: bool = False, emit: Callable[[str], None] = lambda _m: None,
                    log_dir: Path | None = None) -> dict[str, Any] | None:
    """The cached profile for this CPU and thread count, measured now (5-15 s) if absent; None if that fails.

    A calibration measured under contention is returned marked `provisional` (when no clean one is
    cached) and not stored; a clean one is stored as the best of it and the clean one before.
    """
    found = cached_profile(threads)
    if found is not None and not refresh:
        return found
    from workbench.process import run_in_worker

    emit(f"calibrating this machine once ({threads} threads): memory bandwidth and matmul speed")
    log_dir = log_dir or workbench_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    outcome = run_in_worker("workbench.planning.machine:calibrate_worker", {"threads": threads}, log_dir / "calibrate.log",
                            on_event=emit)
    if not outcome.ok:
        emit(f"calibration failed ({outcome.error}); " + ("the cached one is kept" if found
                                                          else "time estimates and rooflines are left out"))
        return found
    fresh = outcome.result
    contention = fresh.get("contention")
    seen = "unknown (no /proc)" if contention is None else f"{contention:.2f} cores"
    emit(f"calibration: {fresh['bandwidth']['bandwidth_bytes_s'] / 1e9:.1f} GB/s, "
         f"{fresh['matmul']['flops_s'] / 1e9:.0f} GFLOP/s; other processes used {seen} meanwhile")
    if _contended(fresh):
        if found is not None:
            emit(f"calibration under contention (> {CALIBRATION_CONTENTION} core) discarded; "
                 f"the clean one from {found['measured_at']} is kept")
            return {**found, "discarded_contention": contention}
        emit(f"calibration under contention (> {CALIBRATION_CONTENTION} core): provisional, not cached; "
             "measured again next time")
        return {**fresh, "provisional": True}
    best = best_of(found, fresh)  # an entry from before contention was recorded is replaced, not compared
    profiles = _stored_profiles()
    profiles[_profile_key(threads)] = best
    path = workbench_home() / PROFILE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profiles, indent=1))
    tmp.replace(path)
    return best


def calibration_note(profile: dict[str, Any]) -> str:
    """How far to trust a calibration: its contention, and whether it is provisional."""
    contention = profile.get("contention")
    if contention is None:
        return ""
    note = f", other processes {contention:.2f} cores meanwhile"
    if profile.get("provisional"):
        note += "; PROVISIONAL: measured under contention, not cached"
    if profile.get("discarded_contention") is not None:
        note += f"; a new calibration under {profile['discarded_contention']:.2f} cores was discarded"
    if profile.get("calibrations", 1) > 1:
        note += f"; best of {profile['calibrations']} clean calibrations"
    return note
