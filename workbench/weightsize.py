"""Weight bytes of a variant from the model shape and its format, with each format's real overheads.

bitsandbytes int8: int8 Linear weights + a float32 scale per output row (SCB) + a weight_format byte; the
rest (embeddings, head, norms) stays in the source dtype. NF4/FP4: packed nibbles + absmax per 64 values
(uint8 with a float32 per 256 blocks and a 256-entry code book under double quant, else float32) + a
16-entry code book and the serialized quant state per tensor. GGUF: llama.cpp's tensor-type mix
(`gguf_plan`). Checked against measured state-dict bytes in tests/test_planner.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from workbench.modelshape import ModelShape

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
METHOD_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class WeightEstimate:
    weight_bytes: int
    format: str  # a short label: fp32, bnb-int8 (+fp32 rest), gguf Q4_K_M, ...
    family: str  # key of the efficiency tables
    runtime: str  # torch | llamacpp
    embedding_bytes: int  # the input embedding table as stored
    shape: ModelShape
    notes: list[str] = field(default_factory=list)


def _linear_names(shape: ModelShape, skip: list[str] | None) -> list[tuple[str, str, int, int, int]]:
    """The decoder Linears a bnb quantizer converts: all but those matching skip patterns (the head is never one)."""
    patterns = [re.compile(p) for p in (skip or [])]
    return [row for row in shape.linears() if not any(p.search(row[0]) for p in patterns)]


def _bnb_bytes(shape: ModelShape, rest_bytes: int, options: dict, four_bit: bool) -> tuple[int, str]:
    quantized = _linear_names(shape, options.get("skip_modules"))
    q_params = sum(i * o for *_, i, o in quantized)
    total = (shape.params() - q_params) * rest_bytes
    if not four_bit:  # int8 weights, a float32 scale per output row (SCB), a one-byte weight_format
        total += q_params + sum(4 * o + 1 for *_, o in quantized)
        return total, "int8"
    double = options.get("double_quant", True)
    for *_, i, o in quantized:
        n = i * o
        blocks = math.ceil(n / 64)
        total += math.ceil(n / 2) + 16 * 4  # packed nibbles, the 16-value code book
        if double:  # absmax as uint8, one float32 absmax per 256 blocks, a 256-value nested code book, the state
            total += blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 168
        else:
            total += 4 * blocks + 78
    return total, "4-bit"


def estimate_weights(shape: ModelShape, stages: list[dict[str, Any]], gguf_files: dict[str, str] | None = None) -> WeightEstimate:
    """Weight bytes of a variant whose stages apply to a source of this shape; the last stage sets the format."""
    rest = shape.dtype if shape.dtype in DTYPE_BYTES else "float32"
    notes: list[str] = []
    for stage in stages[:-1]:  # earlier stages may change the shape or the float dtype
        shape, rest = _reshape(shape, rest, stage, notes)
    last = stages[-1]
    method, options = last["method"], last.get("options") or {}
    shape, rest = _reshape(shape, rest, last, notes)
    dense = shape.params() * DTYPE_BYTES[rest]
    embedding = shape.embedding_params() * DTYPE_BYTES[rest]

    def result(nbytes: int, label: str, family: str, runtime: str = "torch", emb: int = embedding) -> WeightEstimate:
        return WeightEstimate(int(nbytes), label, family, runtime, int(emb), shape, notes)

    if method in METHOD_DTYPES:
        return result(dense, method, rest)
    if method == "bnb-int8":
        nbytes, _ = _bnb_bytes(shape, DTYPE_BYTES[rest], options, four_bit=False)
        return result(nbytes, f"bnb-int8 (+{rest} rest)", "bnb-int8")
    if method in ("bnb-nf4", "bnb-fp4"):
        nbytes, _ = _bnb_bytes(shape, DTYPE_BYTES[rest], options, four_bit=True)
        dq = " dq" if options.get("double_quant", True) else ""
        return result(nbytes, f"{method.removeprefix('bnb-')}{dq} (+{rest} rest)", "bnb-4bit")
    if method == "bnb-auto":
        return _bnb_auto(shape, DTYPE_BYTES[rest], options, notes, result)
    if method == "gguf":
        from workbench.gguf_plan import DEFAULT_TYPE, predict

        quant = options.get("quant", "Q4_K_M")
        if quant not in DEFAULT_TYPE:
            notes.append(f"{quant}: no llama.cpp mix rules here; F16 assumed")
            quant = "F16"
        overrides = options.get("tensor_types") or {}
        mix = predict(shape, quant, bool(options.get("pure", False)), imatrix=bool(options.get("imatrix")),
                      overrides=overrides)
        notes.extend(mix["notes"])
        label = f"gguf {quant}" + (" imatrix" if options.get("imatrix") else "") + (" +overrides" if overrides else "")
        if overrides:
            notes.append(f"tensor types after overrides: {', '.join(f'{t} x{n}' for t, n in mix['tensor_types'].items())}")
        return result(mix["tensor_bytes"], label, "gguf", "llamacpp", emb=_gguf_embedding_bytes(shape, quant))
    if method == "gguf-auto":
        return _gguf_auto(shape, options, notes, result)
    if method == "gguf-file":
        path = (gguf_files or {}).get(options.get("path", "source")) or options.get("path")
        if path and Path(path).is_file():
            from workbench.gguf_info import gguf_summary
            from workbench.roofline import gguf_weights_read

            summary = gguf_summary(Path(path))
            notes.append(f"read from the file: {summary['bits_per_weight']:.2f} bits/weight")
            return result(summary["tensor_bytes"], f"gguf file ({summary['bits_per_weight']:.2f} bpw)", "gguf",
                          "llamacpp", emb=gguf_weights_read(Path(path))["embedding_bytes"])
        notes.append("GGUF file not found: fp16-sized guess")
        return result(shape.params() * 2, "gguf file", "gguf", "llamacpp")
    if method in ("gptq", "awq"):
        return _packed_int(shape, rest, method, options, notes, result)
    if method in ("magnitude", "wanda", "sparsegpt"):
        notes.append("zeros stored densely: same bytes as the dense model")
        return result(dense, f"{method} ({rest}, dense zeros)", rest)
    if method == "kmeans":  # its loader rebuilds dense float32 weights from codebook[indices]
        notes.append("codebook + uint8 indices on disk; rebuilt as dense float32 when loaded")
        return result(shape.params() * 4, "kmeans (float32 when loaded)", "float32")
    if method == "lowrank":
        return result(_lowrank_bytes(shape, rest, options, notes), f"lowrank ({rest})", rest)
    if method in ("structured", "distill"):
        return result(dense, f"{method} ({rest}, smaller shape)", rest)
    notes.append(f"no size model for '{method}': dense {rest} assumed")
    return result(dense, f"{method} (dense?)", rest)


def _reshape(shape: ModelShape, rest: str, stage: dict, notes: list[str]) -> tuple[ModelShape, str]:
    method, options = stage["method"], stage.get("options") or {}
    if method in METHOD_DTYPES:
        return shape, METHOD_DTYPES[method]
    if method == "distill":
        layers = options.get("student_layers") or max(1, shape.layers // 2)
        return shape.shrunk(layers=layers, intermediate=options.get("intermediate_size")), rest
    if method == "structured":  # whole MLP channels and whole KV-head groups removed in every layer
        mlp, heads = float(options.get("mlp_fraction", 0.25)), float(options.get("heads_fraction", 0.0))
        kv = shape.kv_heads - round(heads * shape.kv_heads)
        return replace(shape, intermediate=shape.intermediate - round(mlp * shape.intermediate), kv_heads=kv,
                       heads=kv * (shape.heads // max(1, shape.kv_heads))), rest
    return shape, rest


def bnb_auto_bounds(shape: ModelShape, rest_bytes: int, options: dict) -> tuple[int, int]:
    """(every block quantized, every block float): the smallest and largest model bnb-auto can make."""
    quant = options.get("quant", "nf4")
    floor, _ = _bnb_bytes(shape, rest_bytes, {"double_quant": options.get("double_quant", True)}, four_bit=quant != "int8")
    return floor, shape.params() * rest_bytes


def _bnb_auto(shape: ModelShape, rest_bytes: int, options: dict, notes: list[str], result) -> WeightEstimate:
    """bnb-auto fills its budget from below, a whole block at a time: the estimate is the budget, held
    between the all-quantized and the all-float sizes (which blocks stay float is known only after measuring)."""
    quant = options.get("quant", "nf4")
    budget = int(float(options.get("target_mb") or 0) * 1e6)
    floor, ceiling = bnb_auto_bounds(shape, rest_bytes, options)
    notes.append(f"bnb-auto keeps the most sensitive blocks float within {budget / 1e6:.2f} MB: between "
                 f"{floor / 1e6:.2f} MB (every block {quant}) and {ceiling / 1e6:.2f} MB (every block float), at most the budget")
    if budget < floor:
        notes.append(f"the budget is below the smallest model bnb-auto can make ({floor / 1e6:.2f} MB): the build will refuse it")
    elif budget >= ceiling:
        notes.append("the budget holds every block in float: nothing will be quantized")
    family = "bnb-int8" if quant == "int8" else "bnb-4bit"
    return result(min(max(budget, floor), ceiling), f"bnb-auto {quant} {budget / 1e6:g} MB", family)


def _gguf_auto(shape: ModelShape, options: dict, notes: list[str], result) -> WeightEstimate:
    """gguf-auto fills its budget from below: the estimate is the budget (the chosen mix is known only
    after measuring), refused at build time when below the smallest file the candidates can make."""
    from workbench.gguf_plan import auto_floor

    candidates = options.get("candidates") or ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K"]
    parameters = sum(nx * ny for *_, nx, ny in shape.gguf_tensors())
    if options.get("target_mb") is not None:
        budget, label = int(float(options["target_mb"]) * 1e6), f"{options['target_mb']:g} MB"
    else:
        budget, label = int(float(options.get("target_bpw") or 0) * parameters / 8), f"{options.get('target_bpw')} bpw"
    floor = auto_floor(shape, candidates)
    ceiling = auto_floor(shape, candidates, pick=max)
    notes.append(f"gguf-auto fills a {label} budget ({budget / 1e6:.1f} MB of tensors) from candidates "
                 f"{', '.join(candidates)}: at most the budget")
    if budget < floor:
        notes.append(f"the budget is below the smallest file these candidates make ({floor / 1e6:.1f} MB): "
                     "the build will refuse it")
    nbytes = min(max(budget, floor), ceiling)
    return result(nbytes, f"gguf-auto {label}", "gguf", "llamacpp")


def _packed_int(shape, rest, method, options, notes, result) -> WeightEstimate:
    """GPTQ / AWQ: compressed-tensors stores packed int32 words, a scale per group of each row and packed zero
    points when asymmetric (everything else in `rest`); on CPU it unpacks them to `rest` when the model runs."""
    bits = int(options.get("bits", 4))
    group = options.get("group_size", 64)
    symmetric = options.get("symmetric", method != "awq")
    total = (shape.params() - shape.linear_params()) * DTYPE_BYTES[rest]
    for *_, i, o in shape.linears():
        groups = o * (math.ceil(i / group) if group else 1)
        total += math.ceil(i * bits / 32) * o * 4 + groups * DTYPE_BYTES[rest] + 16  # packed rows, scales, shape
        if not symmetric:
            total += math.ceil(groups * bits / 32) * 4
    notes.append(f"{bits}-bit packed on disk (~{total / 1e6:.0f} MB); on CPU compressed-tensors unpacks to {rest} "
                 "at the first forward, so dense bytes in memory")
    return result(shape.params() * DTYPE_BYTES[rest], f"{method} int{bits} g{group} ({rest} in use)", rest)


def _lowrank_bytes(shape: ModelShape, rest: str, options: dict, notes: list[str]) -> int:
    """Factorised layers hold r * (in + out) values; a layer where that saves nothing stays dense."""
    rank = options.get("rank")
    if rank is None:
        notes.append("lowrank by energy: each layer's rank comes from its SVD, unknown before the build; "
                     "dense bytes assumed (an upper bound)")
        return shape.params() * DTYPE_BYTES[rest]
    targets = options.get("targets", "linear")
    linear = 0
    for _hf, gg, _layer, i, o in shape.linears():
        targeted = targets == "linear" or (targets == "mlp") == gg.startswith("ffn")
        linear += min(int(rank) * (i + o), i * o) if targeted else i * o
    return (shape.params() - shape.linear_params() + linear) * DTYPE_BYTES[rest]


def _gguf_embedding_bytes(shape: ModelShape, quant: str) -> int:
    """Bytes of token_embd as llama.cpp's quantizer will store it."""
    from workbench.gguf_plan import DEFAULT_TYPE, FALLBACK, _type_for, block, tensor_bytes

    if quant in ("F32", "F16", "BF16"):
        return tensor_bytes(DEFAULT_TYPE[quant], shape.vocab * shape.hidden)
    base = DEFAULT_TYPE[quant]
    chosen = _type_for("token_embd", -1, shape.layers, quant, base, shape.hidden, not shape.tied, 1)
    if shape.hidden % block(chosen)[0]:
        chosen = FALLBACK.get(chosen, "F16")
    return tensor_bytes(chosen, shape.vocab * shape.hidden)
