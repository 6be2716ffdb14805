"""Squeeze Bench: compress a causal language model several ways and measure every variant side by side.

Run the default comparison headless:

    python -m workbench run presets/quickstart.yaml

Importing this package is cheap on purpose: torch, transformers and the quantizers load inside the
methods and runtimes that need them.
"""

__version__ = "0.1.0"

# Part of every artifact's cache key: raised when a method's output changes for the same options (or the
# artifact layout changes), so older cached artifacts are rebuilt instead of reused.
ARTIFACT_FORMAT = 4
