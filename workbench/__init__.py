"""Squeeze Bench: compress a causal language model several ways and measure every variant side by side.

Run the default comparison headless:

    python -m workbench run presets/quickstart.yaml

Importing this package is cheap on purpose: torch, transformers and the quantizers load inside the
methods and runtimes that need them.
"""

__version__ = "0.1.0"

# Bumped when the on-disk layout of cached artifacts changes, so old cache entries are not reused.
ARTIFACT_FORMAT = 3  # bumped when a method's output changes for the same options, so older cached artifacts are rebuilt
