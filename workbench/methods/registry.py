"""Method name -> "module:Class", imported only when a method is used (keeps `import workbench` fast).

Adding a method is one module in this folder plus one line here.
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
    # plain torch: pruning, weight sharing, factorisation
    "magnitude": "workbench.methods.magnitude:Magnitude",
    "structured": "workbench.methods.structured:Structured",
    "kmeans": "workbench.methods.kmeans:KMeans",
    "lowrank": "workbench.methods.lowrank:LowRank",
}


def method_names() -> list[str]:
    return list(_REGISTRY)


def register_method(name: str, target: str) -> None:
    """Add a method at run time ("module:Class"), e.g. one defined in a test; the registry above lists the
    project's own. Worker processes import only the registry above, so such a method plans and validates
    in this process."""
    _REGISTRY[name] = target
    get_method.cache_clear()


@cache
def get_method(name: str) -> "type[Method]":
    module_name, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)
