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
