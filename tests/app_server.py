"""For browser and API tests: start `python app.py` on a free port (and stop it afterwards), and open Debian's
Chromium through Playwright (Playwright's own browser download cannot work on these machines)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
# Variables of the machine's own environment that would change the app's mode or limits under a test.
MODE_VARIABLES = ("WORKBENCH_SHARED", "WORKBENCH_ALLOWED_DIRS", "WORKBENCH_MAX_PARAMS", "WORKBENCH_MAX_THREADS")


@dataclass
class AppServer:
    url: str
    pid: int


@contextmanager
def app_server(log_dir: Path, name: str, **env: str) -> Iterator[AppServer]:
    """The app with `env` set on top of this process's environment (the mode variables cleared first).

    gradio's launch checks that it can reach its own port and gives up ("When localhost is not accessible...")
    when a busy 2-core box answers late: a server that exits before it says it is up is started again, up to
    3 times. The wait is a limit on start-up, not a measurement."""
    environment = {k: v for k, v in os.environ.items() if k not in MODE_VARIABLES}
    environment.update({"HF_HUB_OFFLINE": "1", **env})
    server = None
    for attempt in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log_path = log_dir / f"{name}-{attempt}.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen([sys.executable, "-u", "app.py", "--port", str(port)], cwd=ROOT,
                                      env=environment, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        # gradio prints this line only after its own reachability check passed
        while time.monotonic() < deadline and server.poll() is None and "To create a public link" not in log_path.read_text():
            time.sleep(0.5)
        if server.poll() is None:
            break
    assert server is not None and server.poll() is None, f"the app did not start; see {log_dir}/{name}-*.log"
    try:
        yield AppServer(f"http://127.0.0.1:{port}/", server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)


# How long one UI step (a page load's events, a click's answer) may take before a browser test fails. A bound
# for liveness, not a speed check: with the rest of the suite on both cores of a CI box, a page load whose events
# answer in 2 s when idle was measured to take over 60 s.
UI_STEP_TIMEOUT_MS = 300_000


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright Browser), closed afterwards. Without /usr/bin/chromium this fails, never
    skips: the browser tests must run wherever the suite runs (.ci/run installs it)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def watched_page(browser: Any, errors: list[str], width: int = 1400, height: int = 1800, console: bool = False) -> Any:
    """A page in its own context (its own cookies, so its own gradio session) whose script errors land in `errors`;
    with `console`, the console's error messages too."""
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.set_default_timeout(UI_STEP_TIMEOUT_MS)
    if console:
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return page
