"""The app in shared mode (WORKBENCH_SHARED=1), as strangers use it: gradio_client and two Chromium visitors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.app_server import app_server, chromium, watched_page
from tests.test_policy import hostile_yaml

RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{4}")
# One fixed timed repeat (target_ci: null): the test is about who sees the run, not its speed, and the adaptive
# default would time the variant for up to a minute.
VISITOR_A_PRESET = """name: visitor-a
model: bundled:smollm2-135m-instruct
device: cpu
threads: 1
eval: {text: pydoc, max_tokens: 256, context: 128, stride: 128}
latency: {prompt_tokens: 8, new_tokens: 3, warmup: 0, repeats: 1, target_ci: null, max_seconds: 2}
samples: {prompts: [Hello], new_tokens: 3}
baseline: fp32
variants:
  - {name: fp32, method: fp32}
"""


@pytest.fixture(scope="module")
def shared_url(workbench_home, bundled_source):
    """The app in shared mode; the bundled model is converted beforehand (bundled_source) so a run is short."""
    with app_server(workbench_home, "shared-app-test", WORKBENCH_SHARED="1") as server:
        yield server.url


def _folders(home: Path) -> set[str]:
    return {str(p) for sub in ("runs", "sources", "artifacts") if (home / sub).is_dir() for p in (home / sub).iterdir()}


def test_hostile_presets_are_refused_by_run_plan_and_save(shared_url, workbench_home) -> None:
    from gradio_client import Client

    client = Client(shared_url, verbose=False)
    before = _folders(workbench_home)
    cases = [case for case in hostile_yaml() if not case[2]]  # env-dependent caps: the app's env is fixed
    assert len(cases) >= 25
    for name, text, _env, message in cases:
        status = client.predict(text, None, api_name="/run_preset")[0]
        plan = client.predict(text, None, api_name="/plan_preset")[0]  # the note; then the plan's table, chart, rows
        saved = client.predict(f"hostile-{len(name)}", text, api_name="/save_preset")
        for label, shown in (("run", status), ("plan", plan), ("save", saved)):
            assert shown.startswith("**Cannot"), (name, label, shown)
            if name != "malformed-yaml":  # YAML's own parser wording differs between the CLI and the app
                assert message in shown, (name, label, shown)
    assert _folders(workbench_home) == before  # no run folder, no converted source, no artifact
    assert not (workbench_home / "presets").exists() or not list((workbench_home / "presets").glob("hostile-*.yaml"))


def test_visitor_b_sees_none_of_visitor_a_runs(shared_url) -> None:
    """A runs a preset in the browser; B (another browser) and C (gradio_client) cannot list, open, chat with,
    export or delete it, even by its id."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    errors: list[str] = []
    with chromium() as browser:
        alice = watched_page(browser, errors)
        alice.goto(shared_url)
        alice.locator(".cm-content").click()
        alice.keyboard.press("Control+A")
        alice.keyboard.insert_text(VISITOR_A_PRESET)
        alice.get_by_role("button", name="Run", exact=True).click()
        # The Progress table fills while the run goes on (it once stayed empty in shared mode until the end).
        alice.get_by_text("measuring", exact=True).filter(visible=True).first.wait_for(timeout=600_000)
        alice.locator(".js-plotly-plot:visible").first.wait_for(timeout=600_000)
        run_id = RUN_ID.search(alice.locator("body").inner_text()).group(0)
        alice.get_by_role("tab", name="History").click()
        alice.get_by_role("button", name="Refresh").click()
        alice.locator(f"text={run_id} >> visible=true").first.wait_for()  # A sees their own run

        bob = watched_page(browser, errors)
        bob.goto(shared_url)
        bob.get_by_role("tab", name="Chat").click()
        bob.get_by_role("button", name="Refresh runs").click()
        bob.wait_for_timeout(2000)
        chat_box = bob.locator("input[aria-label='Run']:visible").first
        chat_box.click()  # open the run list: it offers nothing of A's
        bob.wait_for_timeout(500)
        assert run_id not in bob.locator("body").inner_text()
        bob.keyboard.press("Escape")
        bob.get_by_role("tab", name="History").click()
        bob.get_by_role("button", name="Refresh").click()
        bob.wait_for_timeout(2000)
        assert run_id not in bob.locator("body").inner_text()
        run_box = bob.locator("input[aria-label='Run']:visible").first
        run_box.fill(run_id)  # typed by hand: the dropdown takes custom values
        run_box.press("Enter")
        bob.get_by_role("button", name="Open", exact=True).click()
        bob.locator(f"text=no run '{run_id}' here >> visible=true").first.wait_for()
        assert bob.locator(".js-plotly-plot:visible").count() == 0  # nothing of A's run was drawn
    assert errors == []

    carol = Client(shared_url, verbose=False)
    runs = carol.predict(api_name="/history_list")[0]
    assert run_id not in str(runs)
    assert run_id not in str(carol.predict(api_name="/chat_runs"))
    for api, args in (("/history_open", (run_id,)), ("/history_export", (run_id,)), ("/history_delete", (run_id, True)),
                      ("/chat", (run_id, ["fp32", "fp32"], "hello"))):
        with pytest.raises(AppError, match=f"no run '{run_id}' here"):
            carol.predict(*args, api_name=api)
