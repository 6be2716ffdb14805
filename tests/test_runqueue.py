"""The app's run queue: one active run per visitor, the others wait in line and see their place."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from workbench.errors import WorkbenchError
from workbench.ui.runqueue import RunQueue


def test_one_run_per_visitor_and_places_in_line() -> None:
    line = RunQueue(slots=1)
    alice, bob, carol = line.join("alice"), line.join("bob"), line.join("carol")
    assert [line.ahead(t) for t in (alice, bob, carol)] == [0, 1, 2]
    with pytest.raises(WorkbenchError, match="you already have a run running or waiting"):
        line.join("bob")
    line.leave(alice)
    assert [line.ahead(t) for t in (bob, carol)] == [0, 1] and line.waiting() == 1
    assert RunQueue(slots=2).ahead(RunQueue(slots=2).join("x")) == 0


def test_run_preset_waits_in_line_and_refuses_a_second_run(monkeypatch, tiny_model_dir) -> None:
    """Through the Run button's own generator, with a runner that holds its slot until released."""
    import workbench.running.runner
    from tests.test_ui import tiny_yaml
    from workbench.ui import compare

    monkeypatch.delenv("WORKBENCH_SHARED", raising=False)
    monkeypatch.setenv("WORKBENCH_ALLOWED_DIRS", str(tiny_model_dir.parent))
    monkeypatch.setattr(compare, "RUNS", RunQueue(slots=1))
    release = threading.Event()

    class HeldRunner:
        def __init__(self, preset, on_event, visitor=None, reuse_measurements=True):
            self.visitor = visitor

        def run(self):
            release.wait(60)
            raise WorkbenchError(f"held run of {self.visitor} ended")

        def cancel(self):
            release.set()

    monkeypatch.setattr(workbench.running.runner, "Runner", HeldRunner)
    text = tiny_yaml(tiny_model_dir)
    sessions = {name: {} for name in ("alice", "alice-again", "bob", "carol")}
    visitor = {"alice": "alice", "alice-again": "alice", "bob": "bob", "carol": "carol"}
    runs = {name: compare.run_preset(text, None, sessions[name], SimpleNamespace(session_hash=visitor[name]))
            for name in sessions}
    assert next(runs["alice"])[0] == "running"
    assert next(runs["bob"])[0] == "waiting in the queue: 1 run(s) ahead of yours"
    assert next(runs["carol"])[0] == "waiting in the queue: 2 run(s) ahead of yours"
    assert next(runs["alice-again"])[0].startswith("**Cannot run:** you already have a run running or waiting")
    assert compare.cancel_run(sessions["carol"]) == "cancelled: your run leaves the queue"
    assert next(runs["carol"])[0] == "cancelled while waiting in the queue; nothing ran"
    release.set()
    assert list(runs["alice"])[-1][0] == "**Run failed:** held run of alice ended"
    statuses = [update[0] for update in runs["bob"]]  # bob's turn now: it runs, its held runner is released already
    assert statuses[-1] == "**Run failed:** held run of bob ended"
    assert compare.RUNS.waiting() == 0 and sessions["bob"] == {}
