"""The Chat tab's parts: chat workers on the tiny model, divergence on visible text, blind votes and their table."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest

from workbench.ui.chat_worker import ChatWorker


def _answer(worker: ChatWorker, prompt: str, max_new_tokens: int = 16, wait_s: float = 300) -> list[tuple[str, object]]:
    """Every message of one answer (up to done or error)."""
    worker.wait_ready()
    assert worker.ready, worker.error
    worker.ask(prompt, max_new_tokens)
    messages: list[tuple[str, object]] = []
    deadline = time.monotonic() + wait_s  # a hang must fail the test, not the suite
    while time.monotonic() < deadline:
        got = list(worker.poll())
        messages += got
        if got and got[-1][0] in ("done", "error"):
            return messages
        time.sleep(0.01)
    raise AssertionError(f"no answer; got {messages}")


@pytest.fixture(scope="module")
def tiny_worker(tiny_model_dir, workbench_home):
    worker = ChatWorker({"name": "tiny", "runtime": "torch", "artifact_path": str(tiny_model_dir), "threads": 1},
                        workbench_home / "chat-logs")
    yield worker
    worker.close()


def test_worker_streams_visible_text_and_fixed_speed(tiny_worker) -> None:
    messages = _answer(tiny_worker, "What is a list?")
    kinds = [kind for kind, _ in messages]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"token"}
    stats = messages[-1][1]
    # The done message carries the visible text (the last streamed text) and the generation's own figures.
    assert stats["text"] == [value[1] for kind, value in messages if kind == "token"][-1]
    assert stats["tokens"] == kinds.count("token")
    assert stats["ttft_s"] > 0 and (stats["tok_s"] is None or stats["tok_s"] > 0)
    assert tiny_worker.load_s is not None and tiny_worker.load_s > 0


def test_stop_ids_hold_the_end_of_turn_tokens(tiny_model_dir) -> None:
    from workbench.runtimes import load_variant
    from workbench.ui.chat_worker import stop_ids

    variant = load_variant("torch", name="t", artifact_path=tiny_model_dir, device="cpu", threads=1)
    try:
        assert variant.tokenizer.convert_tokens_to_ids("</s>") in stop_ids(variant)
    finally:
        variant.close()


def test_a_prompt_longer_than_the_context_is_cut_with_a_note(tiny_worker) -> None:
    """The tiny model has 512 positions; 5,000 words would not fit (the gguf worker used to crash on it)."""
    messages = _answer(tiny_worker, "word " * 5000, max_new_tokens=8)
    notes = [value for kind, value in messages if kind == "note"]
    assert messages[-1][0] == "done" and len(notes) == 1
    assert "the context holds 512" in notes[0] and "cut" in notes[0]


def test_a_killed_worker_reports_why_and_is_replaced(tiny_model_dir, workbench_home) -> None:
    from workbench.ui.chat import _workers

    run = {"run_id": "r1", "variants": [{"name": "tiny", "status": "ok", "runtime": {"name": "torch"},
                                         "artifact_path": str(tiny_model_dir)}]}
    session: dict = {}
    worker = _workers(session, run, ["tiny"])["tiny"]
    _answer(worker, "Hello", 4)
    os.kill(worker.pid, signal.SIGKILL)
    worker.process.join(timeout=30)
    worker.ask("Hello again", 4)
    messages = list(worker.poll())
    assert worker.error and "SIGKILL" in worker.error and not worker.alive()
    assert all(kind != "token" for kind, _ in messages)
    fresh = _workers(session, run, ["tiny"])["tiny"]  # the next prompt starts a new process
    try:
        assert fresh is not worker and fresh.pid != worker.pid
        assert _answer(fresh, "Hello", 4)[-1][0] == "done"
    finally:
        fresh.close()


def test_divergence_is_on_visible_text() -> None:
    from workbench.ui.chat import first_text_difference, render

    assert first_text_difference("a list holds items", "a list holds items") is None  # same text, any ids
    assert first_text_difference("a list", "a lisp") == 5
    assert first_text_difference("a list", "a list and more") == 6
    html = render("a lisp", 5, "stats")
    assert "a lis<mark>p</mark>" in html


def test_wilson_interval_matches_known_values() -> None:
    from workbench.ui.votes import wilson_interval

    # Published Wilson 95% intervals (Newcombe 1998, table I): 81/263 → 0.2553–0.3662, 15/148 → 0.0624–0.1605.
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(15, 148)
    assert (round(low, 4), round(high, 4)) == (0.0624, 0.1605)

    def formula(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return centre - half, centre + half

    for k, n in ((0, 1), (1, 1), (3, 7), (10, 10)):
        assert wilson_interval(k, n) == pytest.approx(formula(k, n), abs=1e-9)
    assert wilson_interval(0, 0) is None


def test_votes_are_stored_per_visitor_and_tabled(tmp_path, monkeypatch) -> None:
    from workbench.data.store import History
    from workbench.ui.chat import record_vote
    from workbench.ui.votes import vote_table

    history = History(tmp_path / "votes.sqlite")
    history.add_vote("r", "p", "fp32", "q4", "a", visitor="alice")
    history.add_vote("r", "p", "fp32", "q4", "tie", visitor="alice")
    history.add_vote("r", "p", "q4", "fp32", "a", visitor="bob")
    table = vote_table(history.leaderboard(visitor="alice"))
    rows = {row["variant"]: row for row in table.to_dict("records")}
    assert rows["fp32"]["wins"] == 1 and rows["fp32"]["ties"] == 1 and rows["fp32"]["losses"] == 0
    assert rows["q4"]["losses"] == 1 and rows["q4"]["votes"] == 2 and rows["q4"]["win share"] == 0.0
    assert 0 < rows["fp32"]["95% CI low"] < 0.5 < rows["fp32"]["95% CI high"] < 1
    everyone = vote_table(history.leaderboard()).set_index("variant")
    assert everyone.loc["q4", "wins"] == 1 and everyone.loc["fp32", "votes"] == 3

    # The page's vote: the first records and reveals both names, a second on the same answer changes it.
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    session = {"blind": {"run_id": "r", "prompt": "p", "pair": ["fp32", "q4"], "vote_id": None}}
    note, frame = record_vote("a", session)
    assert "A was **fp32**, B was **q4**" in note and frame.set_index("variant").loc["fp32", "wins"] == 1
    note, frame = record_vote("b", session)
    assert note.startswith("Changed your vote") and frame.set_index("variant").loc["q4", "wins"] == 1
    assert frame.set_index("variant").loc["fp32", "votes"] == 1
