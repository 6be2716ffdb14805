"""Where the workbench keeps its caches, history and run outputs."""

from __future__ import annotations

import os
from pathlib import Path

# The workbench package's own folder (workbench/): what Ray ships to its nodes and what the measurement
# cache hashes. Defined here, at the top of the package, so no module derives it from its own location.
PACKAGE_DIR = Path(__file__).resolve().parent


def workbench_home() -> Path:
    """`$WORKBENCH_HOME`, default `~/.cache/squeeze-bench`; created on first use."""
    home = Path(os.environ.get("WORKBENCH_HOME") or Path.home() / ".cache" / "squeeze-bench")
    home.mkdir(parents=True, exist_ok=True)
    return home


def artifacts_dir() -> Path:
    return _sub("artifacts")


def sources_dir() -> Path:
    return _sub("sources")


def runs_dir() -> Path:
    return _sub("runs")


def history_db() -> Path:
    return workbench_home() / "history.sqlite"


def _sub(name: str) -> Path:
    path = workbench_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
