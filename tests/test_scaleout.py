"""Scale-out on a local Ray instance: the Ray path gives the local runner's records, a sweep lands in History.

Ray is started once for the module with 2 CPUs (the tiny presets ask for 1 each, so two runs overlap).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.requirements import require

from workbench.cli import main
from workbench.config.presets import load_preset
from workbench.running.runner import Runner
from workbench.data.store import History

ray = require("ray")

QUALITY = ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "delta_p_mean", "sparsity", "weight_bytes", "disk_bytes")
PRESET_A = [{"name": "fp32", "method": "fp32"}, {"name": "int8", "method": "bnb-int8"}]
PRESET_B = [{"name": "fp32", "method": "fp32"}, {"name": "half", "method": "fp16"}]


def sleep_target(payload: float, emit) -> tuple[float, float]:
    """A worker step that takes a while and talks meanwhile (imported by name in the worker process)."""
    started = time.time()
    emit(f"sleeping in process {os.getpid()}")
    while time.time() - started < payload:
        time.sleep(0.2)
        emit("still sleeping")
    return started, time.time()


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def presets(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    import yaml

    from tests.conftest import TINY_VARIANT_DEFAULTS

    folder = tmp_path_factory.mktemp("scaleout-presets")
    paths = []
    for name, variants in (("tiny-a", PRESET_A), ("tiny-b", PRESET_B)):
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "model": str(tiny_model_dir), "device": "cpu", "threads": 1,
                                        **TINY_VARIANT_DEFAULTS, "baseline": "fp32", "variants": variants}))
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def sweep(local_ray, presets):
    """`python -m workbench sweep A B --ray local` (joins the module's Ray instance), then the History's runs."""
    import contextlib
    import io

    before = {r["run_id"] for r in History().runs()}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["sweep", str(presets[0]), str(presets[1]), "--ray", "local"])
    new = [r for r in History().runs() if r["run_id"] not in before]
    return code, out.getvalue(), {r["name"]: History().load_run(r["run_id"]) for r in new}


def test_sweep_of_two_presets_lands_in_history(sweep) -> None:
    code, output, runs = sweep
    assert code == 0, output
    assert sorted(runs) == ["tiny-a", "tiny-b"]
    for name, run in runs.items():
        assert run["status"] == "ok"
        assert [v["status"] for v in run["variants"]] == ["ok", "ok"], [v["error"] for v in run["variants"]]
        assert run["run_id"] in output  # the summary table names every run
        for record in run["variants"]:  # measured in a Ray task, which names its machine
            assert record["runtime"]["node"]["host"] == socket.gethostname()
    assert "tiny-a" in output and "tiny-b" in output and "running on" in output


def test_ray_path_gives_the_local_records(sweep, presets) -> None:
    _, _, runs = sweep
    local = Runner(load_preset(presets[0])).run()  # same preset on this machine, no Ray
    assert local["status"] == "ok"
    stored = History().load_run(local["run_id"])
    assert stored is not None
    by_ray = {v["name"]: v for v in runs["tiny-a"]["variants"]}
    for record in stored["variants"]:
        assert "node" not in record["runtime"]
        for metric in QUALITY:
            assert record["metrics"][metric] == by_ray[record["name"]]["metrics"][metric], (record["name"], metric)
    assert by_ray["int8"]["metrics"]["kld_mean"] > 0  # a real comparison, not two baselines


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has stopped running


def test_cancel_stops_the_ray_task(local_ray, tmp_path) -> None:
    from workbench.running.scaleout import RayExecutor

    executor = RayExecutor(num_cpus=1)
    cancel, events = threading.Event(), []

    def on_event(message: str) -> None:
        events.append(message)
        if message.startswith("sleeping in process"):
            cancel.set()

    outcome = executor("tests.test_scaleout:sleep_target", 120, tmp_path / "logs" / "sleep.log", on_event=on_event,
                       cancel=cancel)
    executor.close()
    assert outcome.cancelled and not outcome.ok
    pid = int(next(m for m in events if m.startswith("sleeping in process")).rsplit(" ", 1)[1])
    deadline = time.monotonic() + 60  # the task's worker process is stopped, long before its 120 s sleep ends
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pid)
    assert events[0].startswith("submitted to Ray (1 CPU)") and events[1].startswith("running on ")


def test_tasks_keep_their_cpus_while_they_report(local_ray, tmp_path) -> None:
    """Two 2-CPU steps on a 2-CPU instance run one after the other, progress messages notwithstanding."""
    from workbench.running.scaleout import RayExecutor

    executors = [RayExecutor(num_cpus=2) for _ in range(2)]
    outcomes: list = [None, None]

    def one(i: int) -> None:
        outcomes[i] = executors[i]("tests.test_scaleout:sleep_target", 2.0, tmp_path / "logs" / f"s{i}.log")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for executor in executors:
        executor.close()
    assert all(o.ok for o in outcomes), outcomes
    (a_start, a_end), (b_start, b_end) = sorted(o.result for o in outcomes)
    assert b_start >= a_end - 0.05, "two tasks shared the CPUs they each reserved"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_one_clear_line(presets, capsys) -> None:
    port = _unused_port()
    assert main(["run", str(presets[0]), "--ray", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no Ray cluster at 127.0.0.1:{port} (")
    assert "ray start --head" in err and "--ray local" in err and "\n" not in err
    assert main(["sweep", str(presets[0]), "--ray", f"ray://127.0.0.1:{port}"]) == 2
    assert f"no Ray cluster at ray://127.0.0.1:{port}" in capsys.readouterr().err


def test_missing_or_malformed_ray_address(presets, capsys, monkeypatch, tmp_path) -> None:
    assert main(["run", str(presets[0]), "--ray"]) == 2
    assert "--ray needs an address: auto" in capsys.readouterr().err
    assert main(["run", str(presets[0]), "--ray", "somehost"]) == 2
    assert "is not a Ray address" in capsys.readouterr().err
    assert main(["run", str(presets[0]), "--ray", "local", "--out", "relative/out"]) == 2
    assert "is relative" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_HOME", "relative-home")
    assert main(["run", str(presets[0]), "--ray", "local"]) == 2
    assert "WORKBENCH_HOME=relative-home is relative" in capsys.readouterr().err


def test_preset_ray_field_and_models_expansion(presets) -> None:
    from workbench.config.presets import dump_preset, parse_preset
    from workbench.running.sweep import expand

    import yaml

    preset = load_preset(presets[0]).model_copy(update={"ray": "auto"})
    assert parse_preset(yaml.safe_load(dump_preset(preset))).ray == "auto"
    both = expand([load_preset(presets[0]), load_preset(presets[1])], ["m1", "m2"])
    assert [(p.name, p.model) for p in both] == [("tiny-a", "m1"), ("tiny-a", "m2"), ("tiny-b", "m1"), ("tiny-b", "m2")]


def test_timing_steps_warn_when_no_node_declares_the_resource(local_ray, tmp_path) -> None:
    """The module's Ray declares no timing resource: the step still runs (asking for it would hang) and says so."""
    from workbench.running.scaleout import TIMING_RESOURCE, RayExecutor

    executor = RayExecutor(num_cpus=1, timing_targets=("tests.test_scaleout:sleep_target",))
    events: list[str] = []
    outcome = executor("tests.test_scaleout:sleep_target", 0.1, tmp_path / "logs" / "t.log", on_event=events.append)
    executor.close()
    assert outcome.ok, outcome.error
    assert any(e.startswith("warning: no node declares the " + TIMING_RESOURCE) for e in events)
