"""A sweep: several presets (and optionally each over several models), each its own run in the history.

    python -m workbench sweep presets/tiny-smoke.yaml presets/quickstart.yaml --models M1,M2 --ray local

With an executor factory (Ray), the runs proceed at once, one thread each: within a run the Runner keeps
its order (the baseline first, since the others read its log-probabilities), while the variants of
different runs queue on the cluster side by side. Without one, the runs go one after another on this
machine. Every thread opens its own History connection (SQLite in WAL mode, writes from this process only).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from workbench.config.presets import Preset


@dataclass
class SweepRun:
    preset: Preset
    label: str
    run_id: str | None = None
    status: str = "pending"  # pending | running | ok | failed | cancelled | error
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    wall_s: float | None = None
    out_dir: str | None = None


def expand(presets: list[Preset], models: list[str] | None = None) -> list[Preset]:
    """Every preset once, or once per model when `models` is given (the model overridden, the rest kept)."""
    if not models:
        return list(presets)
    return [p.model_copy(update={"model": m}) for p in presets for m in models]


def run_sweep(
    presets: list[Preset],
    executor_for: Callable[[Preset], Any] | None = None,
    on_event: Callable[[SweepRun, Any], None] = lambda _r, _e: None,
    use_cache: bool = True,
    cancel: threading.Event | None = None,
) -> list[SweepRun]:
    """Run every preset as its own Runner; concurrently when `executor_for` gives each an executor (Ray)."""
    _prepare_shared_files(presets)
    names = [p.name for p in presets]
    runs = [SweepRun(p, p.name if names.count(p.name) == 1 else f"{p.name}@{p.model}") for p in presets]
    sweep = _Sweep(executor_for, on_event, use_cache, cancel or threading.Event())
    threads = [threading.Thread(target=sweep.run_one, args=(item,), name=f"sweep-{i}", daemon=True)
               for i, item in enumerate(runs)]
    if executor_for is not None:
        sweep.wait(threads)  # all at once: the cluster queues their tasks
    else:
        for item, thread in zip(runs, threads):  # one after another: they would share this machine's cores
            if sweep.cancel.is_set():
                item.status = "cancelled"
            else:
                sweep.wait([thread])
    return runs


def _prepare_shared_files(presets: list[Preset]) -> None:
    """Create what every run reads, once, before several threads would race to create it."""
    from workbench.data.store import History
    from workbench.planning.machine import machine_profile

    History().close()  # migrate the database here, before several threads open it at once
    for threads in sorted({p.threads for p in presets}):
        machine_profile(threads)  # the machine profile file, per thread count


@dataclass
class _Sweep:
    """The runners of one sweep, so a cancel reaches every one started so far."""

    executor_for: Callable[[Preset], Any] | None
    on_event: Callable[[SweepRun, Any], None]
    use_cache: bool
    cancel: threading.Event
    runners: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_one(self, item: SweepRun) -> None:
        """One preset's run, its outcome written onto `item`; an error fails this run alone."""
        from workbench.running.runner import Runner

        executor = self.executor_for(item.preset) if self.executor_for else None
        runner = Runner(item.preset, use_cache=self.use_cache, executor=executor,
                        on_event=lambda event: self.on_event(item, event))
        with self.lock:
            self.runners.append(runner)
            if self.cancel.is_set():
                runner.cancel()
        item.run_id, item.out_dir, item.status = runner.run_id, str(runner.out_dir), "running"
        started = time.perf_counter()
        try:
            run = runner.run()  # its own History() connection, opened in this thread
            item.status = run["status"]
            for record in run["variants"]:
                item.counts[record["status"]] = item.counts.get(record["status"], 0) + 1
        except Exception as exc:  # a run that could not start (model missing, Ray lost) fails alone
            item.status, item.error = "error", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        finally:
            item.wall_s = time.perf_counter() - started
            close = getattr(executor, "close", None)
            if close:
                close()

    def stop_all(self) -> None:
        with self.lock:
            for runner in self.runners:
                runner.cancel()

    def wait(self, threads: list[threading.Thread]) -> None:
        """Start the threads and wait for them, passing a cancel on to every runner."""
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            if self.cancel.wait(0.5):
                self.stop_all()
                for thread in threads:
                    thread.join()


def summary_table(runs: list[SweepRun]) -> str:
    header = f"{'run id':<22} {'preset':<18} {'model':<34} {'status':<9} {'ok':>3} {'failed':>6} {'cancelled':>9} {'wall s':>7}"
    lines = [header, "-" * len(header)]
    for item in runs:
        model = item.preset.model if len(item.preset.model) <= 34 else "…" + item.preset.model[-33:]
        wall = f"{item.wall_s:.0f}" if item.wall_s is not None else "-"
        lines.append(f"{item.run_id or '-':<22} {item.preset.name:<18} {model:<34} {item.status:<9} "
                     f"{item.counts.get('ok', 0):>3} {item.counts.get('failed', 0):>6} "
                     f"{item.counts.get('cancelled', 0):>9} {wall:>7}")
        if item.error:
            lines.append(f"    error: {item.error}")
    return "\n".join(lines)
