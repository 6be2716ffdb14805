"""Worker start-up: a fresh interpreter ("spawn") against the preloaded fork server ("forkserver").

    python bench/worker_start.py [--workers 6]

Each worker does what every build and measuring worker does first: import torch and transformers' auto
classes, then return. The two start methods alternate (spawn, forkserver, spawn, ...) so that both see the
same machine; the fork server's own one-off start-up (it imports the same modules once) is timed apart.
Prints the median seconds per worker for each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path, before the fork server starts)


def import_like_a_worker(_payload: object, _emit: object) -> int:
    import os

    from transformers import AutoModelForCausalLM  # noqa: F401  (what build and measure workers import first)

    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=6, help="workers per start method")
    args = parser.parse_args()

    from workbench.environment import environment
    from workbench.process import run_in_worker

    target = "bench.worker_start:import_like_a_worker"
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "worker.log"
        started = time.perf_counter()
        assert run_in_worker(target, None, log, start_method="forkserver").ok
        server_start = time.perf_counter() - started
        seconds: dict[str, list[float]] = {"spawn": [], "forkserver": []}
        for _ in range(args.workers):
            for method in seconds:
                started = time.perf_counter()
                outcome = run_in_worker(target, None, log, start_method=method)
                seconds[method].append(time.perf_counter() - started)
                assert outcome.ok, outcome.error
    env = environment(threads=1, device="cpu")
    print(f"{env.get('cpu')}, torch {env.get('torch')}, transformers {env.get('transformers')}; "
          f"{args.workers} workers per method, alternating")
    print(f"fork server start-up (once per process, imports the same modules): {server_start:.2f} s")
    for method, values in seconds.items():
        print(f"{method:>10}: median {statistics.median(values):.3f} s per worker "
              f"(min {min(values):.3f}, max {max(values):.3f})")
    ratio = statistics.median(seconds["spawn"]) / statistics.median(seconds["forkserver"])
    print(f"spawn / forkserver: {ratio:.1f}x")


if __name__ == "__main__":
    main()
