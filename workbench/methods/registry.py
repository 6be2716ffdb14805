"""Method name -> "module:Class", imported only when a method is used (keeps `import workbench` fast).

Adding a method to the project is one module in this folder plus one line here; a method defined elsewhere (a
plugin, a test) is added with one call, `register_method(TheClass)`.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.methods.base import Method

_REGISTRY: dict[str, str] = {
    "fp32": "workbench.methods.dtypes:FP32",
    "fp16": "workbench.methods.dtypes:FP16",
    "bf16": "workbench.methods.dtypes:BF16",
    "bnb-int8": "workbench.methods.bnb:BnbInt8",
    "bnb-nf4": "workbench.methods.bnb:BnbNF4",
    "bnb-fp4": "workbench.methods.bnb:BnbFP4",
    "bnb-auto": "workbench.methods.bnb_auto:BnbAuto",
    "distill": "workbench.methods.distill:Distill",
    "gguf": "workbench.methods.gguf:GGUF",
    "gguf-file": "workbench.methods.gguf:GGUFFile",
    "gguf-auto": "workbench.methods.gguf_auto:GGUFAuto",
    # llm-compressor (one-shot, calibrated): GPTQ / AWQ weight quantization, SparseGPT / Wanda pruning
    "gptq": "workbench.methods.llmcompressor:GPTQ",
    "awq": "workbench.methods.llmcompressor:AWQ",
    "sparsegpt": "workbench.methods.llmcompressor:SparseGPT",
    "wanda": "workbench.methods.llmcompressor:Wanda",
    # torch's own low-bit CPU kernels
    "torchao": "workbench.methods.torchao:TorchAO",
    "hqq": "workbench.methods.hqq:HQQ",
    # AutoRound's sign-gradient rounding, exported to GGUF (llama.cpp runs it) or to its own checkpoint (torch)
    "autoround": "workbench.methods.autoround:AutoRound",
    "autoround-native": "workbench.methods.autoround:AutoRoundNative",
    # plain torch: pruning, weight sharing, factorisation
    "magnitude": "workbench.methods.magnitude:Magnitude",
    "structured": "workbench.methods.structured:Structured",
    "kmeans": "workbench.methods.kmeans:KMeans",
    "lowrank": "workbench.methods.lowrank:LowRank",
}


def method_names() -> list[str]:
    return list(_REGISTRY)


def register_method(method: "type[Method]") -> None:
    """Add a method class defined outside this package under its `name`, e.g. one defined in a test or a plugin.

    Its module must be importable by name (the class at module level): every `BuildRequest` carries the
    "module:Class" of its stages' methods, and the worker process imports it from there."""
    register_targets({method.name: f"{method.__module__}:{method.__qualname__}"})


def register_targets(targets: dict[str, str]) -> None:
    """Add methods by "module:Class" (what a `BuildRequest` carries into its worker process)."""
    _REGISTRY.update(targets)
    get_method.cache_clear()


def method_target(name: str) -> str:
    """The "module:Class" a method name is registered as."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown method '{name}' (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


@cache
def get_method(name: str) -> "type[Method]":
    module_name, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)
