"""Run a preset's worker steps as Ray tasks, so a sweep spreads over the machines of a Ray cluster.

    python -m workbench run presets/tiny-smoke.yaml --ray local
    python -m workbench sweep presets/a.yaml presets/b.yaml --models M1,M2 --ray auto

`RayExecutor` has the call shape of `workbench.process.run_in_worker`, which the Runner uses for every
step (prepare, build, measure). Each call becomes one Ray task that itself calls `run_in_worker` on
the node Ray picked, so every variant still gets a fresh process there (its own peak RSS; a crash
fails that variant only). The task asks for `num_cpus=threads` and, for `device: cuda`, one GPU.
Node loss is retried by Ray (`max_retries`); a variant's own failure is a result, never retried.
The parent keeps planning, ordering (baseline first) and the SQLite history; docs/scale-out.md.

Timing steps (the measuring worker, whose latency runs are memory-bound) also take one unit of the
custom resource `workbench_timing_node`, of which every node declares exactly one (`--ray local`
declares it; on a cluster: `ray start ... --resources '{"workbench_timing_node": 1}'`), so no two
timing steps share a node's memory bandwidth; build and prepare steps may share. On a cluster whose
nodes do not declare it, timing steps run unrestricted and their records say `node_exclusive: false`.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.paths import PACKAGE_DIR
from workbench.process import WorkerOutcome, run_in_worker

ADDRESS_HELP = "auto (a running cluster), local (start one on this machine), ray://HOST:PORT or HOST:PORT"
# Passed on to every task when set on the driver: where artifacts live, and whether the hub may be used.
FORWARDED_ENV = ("WORKBENCH_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
POLL_S = 0.25
TIMING_RESOURCE = "workbench_timing_node"  # one unit per node: a timing step holds the node's only one
# The steps whose figures include wall-clock speeds: the measuring worker and the interleaved speed pass.
TIMING_TARGETS = ("workbench.running.worker:measure_variant", "workbench.running.speedpass:speed_pass_worker")
_SHIPPED = False  # True once connect() started the job with the package in its runtime_env


def _unreachable(address: str, reason: str) -> WorkbenchError:
    return WorkbenchError(f"no Ray cluster at {address} ({reason}): start one with `ray start --head` "
                          f"or use --ray local")


def _host_port(address: str) -> tuple[str, int]:
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise WorkbenchError(f"--ray {address!r} is not a Ray address; use {ADDRESS_HELP}")
    return host.strip("[]"), int(port)


def connect(address: str | None, probe_timeout_s: float = 3.0) -> bool:
    """Connect this process to Ray at `address`; True when this call started or joined it (so shut it down after).

    An already initialised Ray (a test's local instance, a notebook) is reused as it is.
    """
    address = (address or "").strip()
    if not address:
        raise WorkbenchError(f"--ray needs an address: {ADDRESS_HELP}")
    if address not in ("auto", "local"):
        host, port = _host_port(address)
        try:  # fail in seconds with a plain reason instead of Ray's long reconnect loop
            socket.create_connection((host, port), timeout=probe_timeout_s).close()
        except OSError as exc:
            raise _unreachable(address, f"{host}:{port} does not answer: {exc.strerror or exc}") from None
    import ray

    if ray.is_initialized():
        return False
    # The workbench package travels with the job (Ray uploads it once); nodes need only its dependencies.
    job_env = {"py_modules": [str(PACKAGE_DIR)], "env_vars": task_environment()}
    try:
        if address == "local":
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     logging_level="warning", runtime_env=job_env, resources={TIMING_RESOURCE: 1})
        else:
            ray.init(address=address, log_to_driver=False, logging_level="warning", runtime_env=job_env)
    except Exception as exc:  # ConnectionError, RuntimeError, grpc errors: all mean "not there"
        text = str(exc).strip().splitlines()
        raise _unreachable(address, text[0] if text else type(exc).__name__) from None
    global _SHIPPED
    _SHIPPED = True
    return True


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def task_environment() -> dict[str, str]:
    """The env vars every task gets; refuses a relative WORKBENCH_HOME (a node's cwd differs from ours)."""
    from workbench.paths import workbench_home

    home = workbench_home()
    if not home.is_absolute():
        raise WorkbenchError(f"WORKBENCH_HOME={home} is relative; Ray tasks need an absolute path to the same "
                             "folder (on a multi-node cluster, a shared filesystem)")
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env["WORKBENCH_HOME"] = str(home)
    return env


def _task(target: str, payload: Any, log_path: str, mailbox: Any, call_id: int,
          node_exclusive: bool | None = None) -> WorkerOutcome:
    """Runs inside a Ray worker: one fresh process for the step, as on a single machine.

    `node_exclusive`: None for a step that is not timed, else whether it holds the node's timing resource.
    """
    import ray

    node = {"host": socket.gethostname(), "ray_node_id": ray.get_runtime_context().get_node_id()}

    sent: list[Any] = []

    def forward(message: str) -> None:
        # Never ray.get here: a task blocked in ray.get lends its CPUs to other tasks, which would then
        # share this variant's cores while it is timed. Fire and forget; the actor keeps their order.
        if mailbox is not None:
            sent[:] = [mailbox.put.remote(call_id, message)]

    forward(f"running on {node['host']}")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    outcome = run_in_worker(target, payload, Path(log_path), on_event=forward)
    if outcome.ok and isinstance(outcome.result, dict) and isinstance(outcome.result.get("runtime"), dict):
        outcome.result["runtime"]["node"] = node  # the machine whose timings these are
        if node_exclusive is not None:
            outcome.result["runtime"]["node_exclusive"] = node_exclusive
    if sent:  # the step is over: wait until the actor holds every message, so the driver sees them all
        try:
            ray.get(sent[0], timeout=10)
        except Exception:  # progress is best effort
            pass
    return outcome


_REMOTE: Any = None


def _remote_task() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(_task)
    return _REMOTE


class _Mailbox:
    """A tiny actor holding the progress messages tasks send until the driver drains them."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str]] = []

    def put(self, call_id: int, message: str) -> None:
        self.items.append((call_id, message))

    def drain(self) -> list[tuple[int, str]]:
        items, self.items = self.items, []
        return items


class RayExecutor:
    """`run_in_worker`'s signature, backed by Ray tasks. One executor per run (one mailbox actor each)."""

    _ids = itertools.count(1)

    def __init__(self, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 2,
                 env: dict[str, str] | None = None, forward_events: bool = True,
                 timing_targets: tuple[str, ...] = TIMING_TARGETS):
        self.num_cpus, self.num_gpus, self.max_retries = num_cpus, num_gpus, max_retries
        self.timing_targets = timing_targets
        self._exclusive: bool | None = None  # whether the cluster declares the timing resource (asked once)
        env_vars = dict(env if env is not None else task_environment())
        if not _SHIPPED:  # Ray was started elsewhere (a test, a notebook): import the package from where it is here
            env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")) if p)
        self.runtime_env: dict[str, Any] = {"env_vars": env_vars}  # merged with the job's runtime_env by Ray
        self.forward_events = forward_events
        self._mailbox: Any = None
        self._lock = threading.Lock()

    @classmethod
    def for_preset(cls, preset: Any, max_retries: int = 2) -> "RayExecutor":
        """Resource needs from the preset: its threads as CPUs, one GPU when it asks for cuda."""
        return cls(num_cpus=preset.threads, num_gpus=1 if preset.device == "cuda" else 0, max_retries=max_retries)

    def _mailbox_handle(self) -> Any:
        import ray

        with self._lock:
            if self._mailbox is None and self.forward_events:
                actor = ray.remote(num_cpus=0, max_restarts=0)(_Mailbox)
                self._mailbox = actor.options(runtime_env=self.runtime_env).remote()
            return self._mailbox

    def _drain(self, call_id: int, on_event: Callable[[str], None]) -> None:
        if self._mailbox is None:
            return
        import ray

        try:
            items = ray.get(self._mailbox.drain.remote(), timeout=10)
        except Exception:  # progress is best effort; the outcome still arrives through the task
            return
        for item_id, message in items:
            if item_id == call_id:
                on_event(message)

    def __call__(self, target: str, payload: Any, log_path: Path, on_event: Callable[[str], None] = lambda _m: None,
                 cancel: threading.Event | None = None, on_start: Callable[[int], None] = lambda _pid: None) -> WorkerOutcome:
        import ray

        if not Path(log_path).is_absolute():
            raise WorkbenchError(f"the run folder {Path(log_path).parent.parent} is relative; Ray tasks need an "
                                 "absolute path (on a multi-node cluster, one on a shared filesystem)")
        call_id = next(self._ids)
        mailbox = self._mailbox_handle()
        timing = target in self.timing_targets
        exclusive = timing and self._timing_resource_declared()
        remote = _remote_task().options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries,
                                           retry_exceptions=False, runtime_env=self.runtime_env,
                                           resources={TIMING_RESOURCE: 1} if exclusive else {})
        ref = remote.remote(target, payload, str(log_path), mailbox, call_id, exclusive if timing else None)
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
        node = ", node-exclusive" if exclusive else ""
        on_event(f"submitted to Ray ({self.num_cpus:g} CPU{gpus}{node})")
        if timing and not exclusive:
            on_event(f"warning: no node declares the {TIMING_RESOURCE} resource, so this timing step may share a "
                     f"node with another; start nodes with --resources '{{\"{TIMING_RESOURCE}\": 1}}'")
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            self._drain(call_id, on_event)
            if ready:
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.TaskCancelledError:
                    return WorkerOutcome(ok=False, error="cancelled", cancelled=True)
                except ray.exceptions.RayError as exc:  # node lost after every retry, runtime env failed, ...
                    lines = [line for line in str(exc).splitlines() if line.strip()]
                    return WorkerOutcome(ok=False, error=f"Ray task failed: {lines[0] if lines else type(exc).__name__}")
                self._drain(call_id, on_event)
                return outcome
            if cancel is not None and cancel.is_set():
                # Not force: KeyboardInterrupt in the task lets run_in_worker kill its worker process.
                ray.cancel(ref)
                try:
                    ray.get(ref, timeout=15)
                except Exception:
                    pass
                return WorkerOutcome(ok=False, error="cancelled", cancelled=True)

    def _timing_resource_declared(self) -> bool:
        if self._exclusive is None:
            import ray

            try:
                self._exclusive = ray.cluster_resources().get(TIMING_RESOURCE, 0) >= 1
            except Exception:  # a cluster that cannot say: do not ask for what may not exist (the task would hang)
                self._exclusive = False
        return self._exclusive

    def close(self) -> None:
        if self._mailbox is not None:
            import ray

            try:
                ray.kill(self._mailbox)
            except Exception:
                pass
            self._mailbox = None
