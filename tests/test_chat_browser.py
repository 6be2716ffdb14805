"""The Chat tab in Chromium (issue #15): a killed worker, blind A/B votes, lists filled on page load.

The run is written straight into the history: two variants that load the tiny model's folder with the
torch runtime, so no run has to be measured first. Its config allows long answers (8192 positions), so
an answer lasts long enough to kill its worker half way."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.app_server import UI_STEP_TIMEOUT_MS, app_server, chromium, watched_page

RUN_ID = "20261201-120000-c4a7"
OLD_RUN_ID = "20261130-120000-dead"
NAMES = ["alpha-variant", "beta-variant"]



def _store_run(history, run_id: str, created_at: str, model_dir: Path) -> None:
    preset = {"name": f"chat-{run_id}", "model": str(model_dir), "device": "cpu", "threads": 1, "baseline": NAMES[0],
              "variants": [{"name": name, "method": "fp32"} for name in NAMES]}
    run = {"run_id": run_id, "created_at": created_at, "preset": preset, "model": {"source": str(model_dir)}}
    history.start_run(run, model_dir)
    for position, name in enumerate(NAMES):
        history.save_variant(run_id, position, {"name": name, "method": "fp32", "status": "ok", "error": None,
                                                "runtime": {"name": "torch"}, "artifact_path": str(model_dir)})
    history.finish_run(run, "ok")


@pytest.fixture(scope="module")
def chat_app(tiny_model_dir, workbench_home, tmp_path_factory):
    from workbench.data.store import History

    folder = tmp_path_factory.mktemp("chat-browser")
    model_dir = folder / "tiny-long"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 8192  # rotary positions: no weights depend on it
    (model_dir / "config.json").write_text(json.dumps(config))
    history = History()
    _store_run(history, OLD_RUN_ID, "2026-11-30T12:00:00", model_dir)
    _store_run(history, RUN_ID, "2099-12-01T12:00:00", model_dir)  # the newest: the one the Chat tab picks
    history.close()

    with app_server(workbench_home, "chat-app-test", WORKBENCH_ALLOWED_DIRS=str(folder),
                    WORKBENCH_CHAT_MAX_NEW_TOKENS="2000") as server:
        yield server.url, server.pid


def _chat_workers(server_pid: int) -> list:
    """The app's chat worker processes: its multiprocessing spawn children (not the resource tracker)."""
    import psutil

    return [p for p in psutil.Process(server_pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def _open_chat(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name="Chat").click()
    # Filled on page load, no Refresh: the newest run is chosen and its first two variants with it.
    page.wait_for_function(f"[...document.querySelectorAll('input[aria-label=\"Run\"]')].some(e => e.value === '{RUN_ID}')")
    page.wait_for_function("document.body.innerText.includes('beta-variant')")


def _panel_texts(page, selector: str = ".chat-answer") -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.innerText)")


def test_killed_worker_shows_its_reason_and_the_next_prompt_works_everywhere(chat_app) -> None:
    url, server_pid = chat_app
    errors: list[str] = []
    with chromium() as browser:
        page = watched_page(browser, errors, 1400, 1800)
        _open_chat(page, url)
        page.get_by_label("Prompt").fill("What is a Python list?")
        page.get_by_role("button", name="Send to all").click()
        # The wait before the first token is said in the panels, per variant.
        page.wait_for_function("document.body.innerText.includes('loading the variants')")
        page.wait_for_function("[...document.querySelectorAll('.chat-answer')].some(e => e.innerText.includes('tokens so far'))",
                               timeout=300_000)
        workers = _chat_workers(server_pid)
        assert len(workers) == 2
        workers[0].kill()  # mid-answer: 2000 tokens take the tiny model many seconds
        page.wait_for_function("[...document.querySelectorAll('.chat-answer')].filter(e => e.innerText.includes('tok/s')"
                               " || e.innerText.includes('failed:')).length >= 2", timeout=300_000)
        first = [t for t in _panel_texts(page) if t.strip()]
        assert len(first) == 2
        assert sum("failed: the worker process died from SIGKILL" in t for t in first) == 1, first
        assert sum("tok/s" in t for t in first) == 1, first  # the other panel answered as usual
        assert page.locator(".toast-body").count() == 0  # no gradio error: the failure stays in its panel

        page.get_by_label("Prompt").fill("And a tuple?")
        page.get_by_role("button", name="Send to all").click()
        page.wait_for_function("[...document.querySelectorAll('.chat-answer')]"
                               ".filter(e => e.innerText.includes('tok/s')).length >= 2", timeout=600_000)
        second = [t for t in _panel_texts(page) if t.strip()]
        assert all("failed" not in t and "tok/s" in t for t in second), second
        speeds = [re.search(r"[\d.]+ tok/s", t).group(0) for t in second]
        page.wait_for_timeout(1500)  # the figures are final once the answer ends: later updates do not move them
        assert [re.search(r"[\d.]+ tok/s", t).group(0) for t in _panel_texts(page) if t.strip()] == speeds
    assert errors == []


def _vote_rows(page, votes: int) -> list[list[str]]:
    """The vote table's rows once every row counts `votes` votes (the table updates after the note)."""
    rows: list[list[str]] = []
    for _ in range(120):
        rows = [row for row in page.eval_on_selector_all(
            "table.vote-rows tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))") if len(row) > 6]
        if len(rows) == 2 and all(row[2] == str(votes) for row in rows):
            return rows
        page.wait_for_timeout(500)
    raise AssertionError(f"the vote table never showed {votes} votes per variant: {rows}")


def test_blind_vote_reveals_both_names_and_tables_the_counts(chat_app) -> None:
    url, _ = chat_app
    errors: list[str] = []
    with chromium() as browser:
        page = watched_page(browser, errors, 1400, 2200)
        _open_chat(page, url)
        page.get_by_label("Prompt").fill("Say hello.")
        page.get_by_text("Blind A/B").click()
        for round_ in range(2):  # a second blind answer and vote after the first reveal works as the first
            page.get_by_role("button", name="Answer blind with two random variants").click()
            # The note and the panels change together: once it says "hidden", the panels are this round's.
            page.wait_for_function("document.querySelector('.vote-note')?.innerText.includes('hidden')", timeout=600_000)
            page.wait_for_function("[...document.querySelectorAll('.blind-answer')].filter(e => /\\d+ tokens(?! so far)/"
                                   ".test(e.innerText) || e.innerText.includes('failed:')).length >= 2", timeout=600_000)
            blind = " ".join(_panel_texts(page, ".blind-answer"))
            # Nothing names or singles out a variant before the vote: no name, no baseline comparison, no speed.
            assert "failed" not in blind and not any(name in blind for name in NAMES)
            assert "differs" not in blind and "same text" not in blind and "tok/s" not in blind
            assert "<mark>" not in page.eval_on_selector_all(".blind-answer", "els => els.map(e => e.innerHTML).join()")
            page.get_by_role("button", name="A is better").click()
            page.wait_for_function("document.querySelector('.vote-note')?.innerText.includes('A was')")
            note = page.locator(".vote-note").first.inner_text()
            assert re.search(r"A was (alpha|beta)-variant, B was (alpha|beta)-variant", note), note
            assert "alpha-variant" in note and "beta-variant" in note
            rows = _vote_rows(page, votes=round_ + 1)
            assert {row[1] for row in rows} == set(NAMES), rows
            table = page.locator("table.vote-rows").inner_text()
            assert "[object Object]" not in table and "alpha-variant" in table and "beta-variant" in table
        by_name = {row[1]: row for row in rows}
        assert set(by_name) == set(NAMES), rows
        assert [by_name[name][2] for name in NAMES] == ["2", "2"]  # two votes each, wins + losses = 2
        assert sum(int(by_name[name][3]) for name in NAMES) == 2
        page.get_by_role("button", name="Tie").click()  # a second vote on the same answer replaces it
        page.wait_for_function("document.querySelector('.vote-note')?.innerText.includes('Changed your vote')")
    assert errors == []


def test_history_is_listed_on_load_and_the_delete_tick_resets(chat_app) -> None:
    from playwright.sync_api import expect

    url, _ = chat_app
    errors: list[str] = []
    with chromium() as browser:
        page = watched_page(browser, errors, 1400, 1800)
        page.goto(url)
        page.get_by_role("tab", name="History").click()
        page.wait_for_function(f"document.body.innerText.includes('{OLD_RUN_ID}')")  # no Refresh
        run_box = page.locator("input[aria-label='Run']:visible").first
        run_box.fill(OLD_RUN_ID)
        run_box.press("Enter")
        tick = page.get_by_label("Yes, delete this run")
        tick.check()
        page.get_by_role("button", name="Delete", exact=True).click()
        page.wait_for_function(f"document.body.innerText.includes('deleted run {OLD_RUN_ID}')")
        expect(tick).not_to_be_checked(timeout=UI_STEP_TIMEOUT_MS)
    assert errors == []
