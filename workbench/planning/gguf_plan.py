"""Predict the tensor types and bytes llama.cpp's quantizer will write, from the model shape alone.

A condensed copy of the rules in llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for
dense Llama-like models, with the few rules that change when an importance matrix is given
(IQ3_XXS, IQ4_NL / IQ4_XS, Q4_0 / Q5_0) and `--tensor-type` overrides (searched in the tensor's
GGUF name, first match wins, before the mix rules and before the fallback): the output head (or the tied embedding) gets
Q6_K (Q8_0 when its rows are not a multiple of the block), attn_v / ffn_down get more bits in some
layers for the _M mixes, and every K-quant or I-quant whose row length is not a multiple of 256
falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ* -> IQ4_NL, then F16 if even that
does not divide). MoE, Falcon and 70B special cases are left out. Bytes come from ggml's block sizes
(the `gguf` package's GGML_QUANT_SIZES), so a predicted mix gives exact tensor bytes.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

QK_K = 256

# llama.cpp's default (base) tensor type of each file type.
DEFAULT_TYPE = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
    "Q5_1": "Q5_1", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL",
    "IQ4_XS": "IQ4_XS", "IQ3_M": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_XS": "IQ3_S", "IQ3_XXS": "IQ3_XXS",
    "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS", "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S",
}
# src/llama-quant.cpp, `tensor_type_fallback`, as the library llama-cpp-python 0.3.36 ships (Q2_K / Q3_K
# now fall back to Q4_0; older llama.cpp gave them IQ4_NL).
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
            **{t: "IQ4_NL" for t in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_XS")}}
LOW_BIT_IQ = ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")


def block(type_name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def tensor_bytes(type_name: str, n_elements: int) -> int:
    size, nbytes = block(type_name)
    return n_elements // size * nbytes


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _type_for(name: str, i: int, n: int, ftype: str, base: str, nx: int, has_output: bool, n_gqa: int,
              imatrix: bool = False) -> str:
    """llama_tensor_get_type for one 2-D weight (before the row-length fallback)."""
    new = base
    if name == "output" or (name == "token_embd" and not has_output):
        if nx % block(base)[0] != 0:
            return "Q8_0"
        if ftype in LOW_BIT_IQ:
            return "Q5_K"
        return base if base == "Q8_0" else "Q6_K"
    if name == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        return base
    if ftype in LOW_BIT_IQ:
        if name == "attn_v":
            return "Q4_K" if n_gqa >= 4 else ("IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K")
        if name == "ffn_down" and i < n // 8:
            return "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
        if name == "attn_output":
            return {"IQ1_S": "IQ2_XXS", "IQ1_M": "IQ2_XXS", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}.get(ftype, base)
        return base
    if name == "attn_v":
        rules = {
            "Q2_K": "Q4_K" if n_gqa >= 4 else "Q3_K", "Q2_K_S": "Q4_K" if n_gqa >= 4 else base,
            "IQ3_XXS": "Q4_K" if n_gqa >= 4 else ("IQ3_XXS" if imatrix else "IQ3_S"), "IQ3_XS": "Q4_K" if n_gqa >= 4 else base,
            "IQ3_S": "Q4_K" if n_gqa >= 4 else base, "IQ3_M": "Q4_K", "Q3_K_M": "Q5_K" if i < 2 else "Q4_K",
            "Q3_K_L": "Q5_K", "IQ4_NL": "Q5_K" if n_gqa >= 4 else base, "IQ4_XS": "Q5_K" if n_gqa >= 4 else base,
            "Q4_K_M": "Q6_K" if _use_more_bits(i, n) else base, "Q5_K_M": "Q6_K" if _use_more_bits(i, n) else base,
            "Q4_K_S": "Q5_K" if i < 4 else base,
        }
        return rules.get(ftype, base)
    if name in ("attn_k", "attn_q"):
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, base)
    if name == "ffn_down":
        rules = {
            "Q2_K": "Q3_K", "Q2_K_S": "Q4_K" if i < n // 8 else base,
            "IQ3_XXS": base if imatrix else ("Q4_K" if i < n // 8 else "Q3_K"),
            "Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K", "IQ3_M": "Q4_K" if i < n // 8 else base, "Q3_K_L": "Q5_K",
            "Q4_K_M": "Q6_K" if _use_more_bits(i, n) else base,
            "IQ4_NL": "Q5_K" if i < n // 8 and not imatrix else base,
            "IQ4_XS": "Q5_K" if i < n // 8 and not imatrix else base,
            # with an importance matrix the first ffn_down layers of Q4_0 / Q5_0 get the _1 type
            "Q4_0": "Q4_1" if imatrix and i < n // 8 else base, "Q5_0": "Q5_1" if imatrix and i < n // 8 else base,
            "Q5_K_M": "Q6_K" if _use_more_bits(i, n) else base, "Q4_K_S": "Q5_K" if i < n // 8 else base,
        }
        return rules.get(ftype, base)
    if name == "attn_output":
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ftype, base)
    if name in ("ffn_gate", "ffn_up") and ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
        return "IQ3_XXS"
    return new


def full_name(name: str, layer: int) -> str:
    """The tensor's name in the file: ('attn_q', 3) -> 'blk.3.attn_q.weight'."""
    return f"blk.{layer}.{name}.weight" if layer >= 0 else f"{name}.weight"


def fallback(chosen: str, nx: int) -> str:
    """The type llama.cpp stores when rows of nx values do not fill `chosen`'s blocks."""
    if nx % block(chosen)[0] == 0:
        return chosen
    chosen = FALLBACK.get(chosen, "F16")
    return chosen if nx % block(chosen)[0] == 0 else "F16"


def predict(shape: Any, ftype: str, pure: bool = False, imatrix: bool = False,
            overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """{'tensor_bytes', 'tensor_types': {type: count}, 'fallbacks': int, 'notes': [...]} for a llama-like shape.

    `shape` provides `gguf_tensors()`: (gguf name, layer index or -1, n_cols (ne[0]), n_rows) for every
    tensor, 1-D ones with n_rows 1, and `layers`, `heads`, `kv_heads`, `tied`. `overrides`: {regex: type},
    as the gguf method's tensor_types.
    """
    patterns = [(re.compile(p), t) for p, t in (overrides or {}).items()]
    base = DEFAULT_TYPE[ftype]
    float_file = ftype in ("F32", "F16", "BF16")
    types: Counter[str] = Counter()
    total, fallbacks = 0, 0
    n_gqa = max(1, shape.heads // max(1, shape.kv_heads))
    for name, layer, nx, ny in shape.gguf_tensors():
        if ny == 1:  # norms and biases stay F32 in every file type
            chosen = "F32"
        elif float_file:
            chosen = base
        else:
            tensor = full_name(name, layer)
            manual = next((t for p, t in patterns if p.search(tensor)), None)
            if manual is not None:
                chosen = manual
            else:
                chosen = base if pure else _type_for(name, layer, shape.layers, ftype, base, nx, not shape.tied, n_gqa,
                                                     imatrix)
            if nx % block(chosen)[0] != 0:
                chosen = fallback(chosen, nx)
                fallbacks += 1
        types[chosen] += 1
        total += tensor_bytes(chosen, nx * ny)
    notes = []
    if fallbacks:
        notes.append(f"{fallbacks} tensors fall back from {base} (rows not a multiple of {block(base)[0]})")
    return {"tensor_bytes": total, "tensor_types": dict(types.most_common()), "fallbacks": fallbacks, "notes": notes}


def auto_floor(shape: Any, candidates: list[str], pick: Any = min) -> int:
    """Tensor bytes of the smallest gguf-auto file (`pick=max`: the largest): every unit (block, embedding,
    head) at its cheapest candidate after llama.cpp's fallbacks; norms stay F32."""
    units: dict[str, list[tuple[int, int]]] = {}
    total = 0
    for name, layer, nx, ny in shape.gguf_tensors():
        if ny == 1:
            total += tensor_bytes("F32", nx)
        else:
            units.setdefault(f"blk.{layer}" if layer >= 0 else name, []).append((nx, ny))
    for tensors in units.values():
        total += pick(sum(tensor_bytes(fallback(c, nx), nx * ny) for nx, ny in tensors) for c in candidates)
    return total


def token_embd_bytes(shape: Any, quant: str) -> int:
    """Bytes of token_embd as llama.cpp's quantizer will store it for file type `quant`."""
    if quant in ("F32", "F16", "BF16"):
        return tensor_bytes(DEFAULT_TYPE[quant], shape.vocab * shape.hidden)
    base = DEFAULT_TYPE[quant]
    chosen = _type_for("token_embd", -1, shape.layers, quant, base, shape.hidden, not shape.tied, 1)
    if shape.hidden % block(chosen)[0]:
        chosen = FALLBACK.get(chosen, "F16")
    return tensor_bytes(chosen, shape.vocab * shape.hidden)
