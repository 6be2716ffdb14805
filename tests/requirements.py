"""Optional test dependencies: skipped locally when missing, a failure under CI=true (CI must test everything)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)  # ImportError fails the run: a missing install step shows
    return pytest.importorskip(module)
