"""Runtimes implement the Variant interface (ARCHITECTURE §2.3) for one inference engine each."""

from __future__ import annotations

from typing import Any


def load_variant(runtime: str, **kwargs: Any):
    """Import the runtime module only when a variant of that kind is loaded."""
    if runtime == "torch":
        from workbench.runtimes.torch import TorchVariant

        return TorchVariant.load(**kwargs)
    if runtime == "llamacpp":
        from workbench.runtimes.llamacpp import LlamaCppVariant

        return LlamaCppVariant.load(**kwargs)
    raise ValueError(f"unknown runtime '{runtime}'")
