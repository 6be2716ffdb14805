"""A worker that raises, is killed or segfaults becomes a one-line failure; the parent goes on."""

from __future__ import annotations

from workbench.process import run_in_worker


def test_exception_becomes_one_line(tmp_path) -> None:
    outcome = run_in_worker("tests.worker_targets:raise_error", {}, tmp_path / "w.log")
    # Type, message and the step the worker was in (it raised before emitting any progress).
    assert not outcome.ok and outcome.error == "ValueError: a specific problem (while starting)"
    assert "Traceback" in (tmp_path / "w.log").read_text()  # the full story stays in the log


def test_sigkill_is_reported(tmp_path) -> None:
    outcome = run_in_worker("tests.worker_targets:kill_self", {}, tmp_path / "w.log")
    assert not outcome.ok and "SIGKILL" in outcome.error


def test_segfault_is_reported(tmp_path) -> None:
    outcome = run_in_worker("tests.worker_targets:segfault", {}, tmp_path / "w.log")
    assert not outcome.ok and "SIGSEGV" in outcome.error


def test_a_worker_forked_from_the_preloaded_server_sees_the_callers_environment_of_the_moment(tmp_path,
                                                                                              monkeypatch) -> None:
    """Workers fork from a server started once (torch preloaded there); the environment they run with is the
    caller's at the time of the call, not the server's from when it started: a set, a changed and a removed
    variable, each after the server is up."""
    names = ["SQUEEZE_TEST_NEW", "SQUEEZE_TEST_CHANGED", "SQUEEZE_TEST_REMOVED"]
    monkeypatch.setenv("SQUEEZE_TEST_CHANGED", "before")
    monkeypatch.setenv("SQUEEZE_TEST_REMOVED", "present")
    first = run_in_worker("tests.worker_targets:environment_and_modules", names, tmp_path / "w.log")
    assert first.ok and first.result["env"] == {"SQUEEZE_TEST_NEW": None, "SQUEEZE_TEST_CHANGED": "before",
                                                "SQUEEZE_TEST_REMOVED": "present"}
    monkeypatch.setenv("SQUEEZE_TEST_NEW", "new")
    monkeypatch.setenv("SQUEEZE_TEST_CHANGED", "after")
    monkeypatch.delenv("SQUEEZE_TEST_REMOVED")
    second = run_in_worker("tests.worker_targets:environment_and_modules", names, tmp_path / "w.log")
    assert second.ok and second.result["env"] == {"SQUEEZE_TEST_NEW": "new", "SQUEEZE_TEST_CHANGED": "after",
                                                  "SQUEEZE_TEST_REMOVED": None}
    assert second.result["torch_preloaded"]  # forked from the preloaded server, not a fresh interpreter
    spawned = run_in_worker("tests.worker_targets:environment_and_modules", names, tmp_path / "w.log",
                            start_method="spawn")
    assert spawned.ok and spawned.result == {"env": second.result["env"], "torch_preloaded": False}
