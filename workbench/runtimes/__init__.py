"""Runtimes implement the Variant interface (runtimes/base.py) for one inference engine each.

A method names the runtime that loads its artifact (`Method.runtime`); this registry maps that name to
the class, imported only when a variant of that kind is loaded (torch and llama.cpp load slowly).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.runtimes.base import Variant

_RUNTIMES: dict[str, str] = {
    "torch": "workbench.runtimes.torch:TorchVariant",
    "llamacpp": "workbench.runtimes.llamacpp:LlamaCppVariant",
}


def register_runtime(name: str, target: str) -> None:
    """Add a runtime: `target` is "module:Class", a `Variant` subclass."""
    _RUNTIMES[name] = target


def runtime_class(runtime: str) -> "type[Variant]":
    if runtime not in _RUNTIMES:
        raise ValueError(f"unknown runtime '{runtime}' (known: {', '.join(_RUNTIMES)})")
    module_name, attr = _RUNTIMES[runtime].split(":")
    return getattr(importlib.import_module(module_name), attr)


def load_variant(runtime: str, name: str, artifact_path: Path, device: str, threads: int,
                 trust_remote_code: bool = False, n_ctx: int = 2048) -> "Variant":
    """Load an artifact with the named runtime (Variant.load's arguments)."""
    return runtime_class(runtime).load(name=name, artifact_path=Path(artifact_path), device=device, threads=threads,
                                       trust_remote_code=trust_remote_code, n_ctx=n_ctx)
