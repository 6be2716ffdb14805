"""Start `python app.py` on a free port for a browser or API test, and stop it afterwards."""

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

ROOT = Path(__file__).resolve().parent.parent
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
