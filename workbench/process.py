"""Run one function in a fresh worker process and turn any way it can end into a plain outcome.

A worker that raises, segfaults, runs out of memory or is killed ends as `ok=False` with a
one-line reason; the parent (the CLI or the UI) keeps running. The worker's stdout and stderr go to
a log file, so library chatter and native crash messages are kept without cluttering the CLI.

Workers are forked from a multiprocessing fork server that imported torch and transformers once: a fresh
interpreter spends about 13 s importing them on a 2-core machine (transformers' auto classes pull in
generation, sklearn and scipy), and a run starts several workers per variant (`bench/worker_start.py`
measures both ways side by side). The server is a clean, single-threaded process of its own (never the
caller, which may be a multi-threaded app or hold CUDA state), so a worker still starts without inherited
threads, locks or CUDA state; what it does not inherit from the server is the caller's environment at the
time of the call, which `_child` therefore installs first.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError


@dataclass
class WorkerOutcome:
    ok: bool
    result: Any = None
    error: str | None = None
    cancelled: bool = False


# Imported once by the fork server. Import-time failures are ignored by multiprocessing (the worker then imports
# what it needs itself), so an installation without one of them still works.
PRELOAD = ("torch", "transformers", "transformers.models.auto.modeling_auto", "transformers.generation")
START_METHODS = ("forkserver", "spawn")
_contexts: dict[str, Any] = {}
_contexts_lock = threading.Lock()


def worker_context(start_method: str = "forkserver") -> Any:
    """The multiprocessing context workers start from: "forkserver" (preloaded, the default) or "spawn"."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, not {start_method!r}")
    with _contexts_lock:
        if start_method not in _contexts:
            context = mp.get_context(start_method)
            if start_method == "forkserver":
                context.set_forkserver_preload(list(PRELOAD))
            _contexts[start_method] = context
        return _contexts[start_method]


def _child(target: str, payload: Any, conn: Any, log_path: str, environment: dict[str, str]) -> None:
    # The fork server's environment is the caller's at the time the server started; the call's own (a changed
    # WORKBENCH_HOME, a test's setting) is the one that counts.
    os.environ.clear()
    os.environ.update(environment)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    last_step = ["starting"]

    def emit(message: str) -> None:
        last_step[0] = message
        conn.send(("event", message))

    try:
        module_name, attr = target.split(":")
        function = getattr(importlib.import_module(module_name), attr)
        result = function(payload, emit)
        conn.send(("result", result))
    except BaseException as exc:  # everything becomes a one-line reason for the parent
        traceback.print_exc()
        conn.send(("error", failure_line(exc, last_step[0])))
    finally:
        conn.close()


def failure_line(exc: BaseException, step: str) -> str:
    """One line a user can act on: a WorkbenchError's own message, else the exception's type, its message and
    the step the worker was in. A bare `assert` has no message, so its code location stands in for one."""
    if isinstance(exc, WorkbenchError) and str(exc).strip():
        return str(exc).strip().splitlines()[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not text:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            last = frames[-1]
            text = f"no message, raised at {Path(last.filename).name}:{last.lineno} ({(last.line or '').strip()})"
        else:
            text = "no message"
    return f"{type(exc).__name__}: {text} (while {step})"


def death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hints = {"SIGKILL": " (killed; often the out-of-memory killer)", "SIGSEGV": " (segmentation fault in native code)",
                 "SIGABRT": " (aborted by native code)", "SIGBUS": " (bus error in native code)"}
        return f"the worker process died from {name}{hints.get(name, '')}"
    return f"the worker process exited with code {exitcode} before reporting a result"


def run_in_worker(
    target: str,
    payload: Any,
    log_path: Path,
    on_event: Callable[[str], None] = lambda _m: None,
    cancel: threading.Event | None = None,
    on_start: Callable[[int], None] = lambda _pid: None,
    start_method: str = "forkserver",
) -> WorkerOutcome:
    """Call `target(payload, emit)` ("module:function") in a worker process and wait for it."""
    context = worker_context(start_method)
    receiver, sender = context.Pipe(duplex=False)
    # Not a daemon: a worker may need a helper process of its own (e.g. guarded llama.cpp tokenization);
    # the `finally` below still kills it whenever the parent stops waiting.
    process = context.Process(target=_child, args=(target, payload, sender, str(log_path), dict(os.environ)),
                              daemon=False)
    process.start()
    sender.close()
    on_start(process.pid)
    try:
        while True:
            if cancel is not None and cancel.is_set():
                process.kill()
                process.join()
                return WorkerOutcome(ok=False, error="cancelled", cancelled=True)
            if receiver.poll(0.2):
                try:
                    kind, value = receiver.recv()
                except EOFError:  # the pipe closed: the process is gone
                    process.join()
                    return WorkerOutcome(ok=False, error=death_reason(process.exitcode))
                if kind == "event":
                    on_event(value)
                elif kind == "result":
                    process.join()
                    return WorkerOutcome(ok=True, result=value)
                else:
                    process.join()
                    if cancel is not None and cancel.is_set():  # e.g. Ctrl-C reached the worker too
                        return WorkerOutcome(ok=False, error="cancelled", cancelled=True)
                    return WorkerOutcome(ok=False, error=value)
            elif not process.is_alive() and not receiver.poll(0):
                process.join()
                return WorkerOutcome(ok=False, error=death_reason(process.exitcode))
    finally:
        receiver.close()
        if process.is_alive():
            process.kill()
            process.join()
