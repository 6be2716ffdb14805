"""Weight bytes of a variant from the model shape and its stages, before anything loads.

Each method owns its estimate (`Method.reshape`, `Method.estimate_size` in methods/base.py: the bnb
row scales and 4-bit absmax blocks, llama.cpp's tensor-type mix, compressed-tensors' packing, ...);
this module validates each stage's options with the method's own options model (so defaults live
there, once), threads the shape and float dtype through the stages, and asks the last one. Checked
against measured state-dict bytes in tests/test_planner.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.methods.base import DTYPE_BYTES, Method, MethodOptions, SizeInput
from workbench.planning.modelshape import ModelShape


@dataclass
class WeightEstimate:
    weight_bytes: int
    format: str  # a short label: fp32, bnb-int8 (+fp32 rest), gguf Q4_K_M, ...
    family: str  # key of the efficiency tables
    runtime: str  # the runtime that loads the artifact (Method.runtime)
    embedding_bytes: int  # the input embedding table as stored
    shape: ModelShape
    notes: list[str] = field(default_factory=list)


def stage_methods(stages: list[dict[str, Any]]) -> list[tuple[Method, MethodOptions]]:
    """Each stage's method and its options, validated (defaults filled in) by the method's own model."""
    from workbench.methods.registry import get_method

    pairs = []
    for stage in stages:
        method = get_method(stage["method"])()
        pairs.append((method, method.Options.model_validate(stage.get("options") or {})))
    return pairs


def estimate_weights(shape: ModelShape, stages: list[dict[str, Any]], gguf_files: dict[str, str] | None = None) -> WeightEstimate:
    """Weight bytes of a variant whose stages apply to a source of this shape; the last stage sets the format."""
    rest = shape.dtype if shape.dtype in DTYPE_BYTES else "float32"
    notes: list[str] = []
    pairs = stage_methods(stages)
    for method, options in pairs:  # a stage may change the shape (pruning, distillation) or the float dtype
        shape, rest = method.reshape(shape, rest, options)
    method, options = pairs[-1]
    size = SizeInput(shape, rest, notes, {k: v for k, v in (gguf_files or {}).items() if v})
    found = method.estimate_size(options, size)
    embedding = found.embedding_bytes if found.embedding_bytes is not None else size.embedding_bytes()
    return WeightEstimate(int(found.weight_bytes), found.format, found.family, method.runtime, int(embedding), shape,
                          notes)
