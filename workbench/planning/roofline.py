"""The decode roofline of every variant: how fast decoding could be on this machine's memory bandwidth.

Decoding one token reads (about) every weight once, so a variant cannot decode faster than
`bandwidth / bytes read per token`. Bytes read per token are the loaded weight bytes minus the input
embedding table, of which one row is read per token, unless that table is also the output head
(tied), which reads all of it. KV-cache and activation traffic are left out (small at the prompt
lengths measured here), so the limit is an upper bound; a fraction above 1 means the weights sat
in the CPU caches (tiny models) or the copy measurement under-read this machine. The bandwidth is
the machine calibration's (planning/machine.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.planning.machine import calibration_note


# ---- what a variant reads per decoded token -------------------------------------------------------


def weights_read(variant: Any) -> dict[str, Any] | None:
    """{'embedding_bytes', 'embedding_rows', 'tied'} of a loaded variant (Variant.weights_read), or None."""
    try:
        return variant.weights_read()
    except Exception:  # a detail for the roofline: never a reason for a measurement to fail
        return None


def gguf_weights_read(path: Path) -> dict[str, Any]:
    from workbench.data.gguf_info import gguf_reader

    reader = gguf_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    embedding = tensors.get("token_embd.weight")
    return {"embedding_bytes": int(embedding.n_bytes) if embedding is not None else 0,
            "embedding_rows": int(embedding.shape[-1]) if embedding is not None else 1,
            "tied": "output.weight" not in tensors}


def bytes_per_token(weight_bytes: int, read: dict[str, Any] | None) -> int:
    """Weight bytes touched per decoded token: all weights, but one row of an untied input embedding."""
    if not read or read["tied"] or not read["embedding_bytes"]:
        return int(weight_bytes)
    row = read["embedding_bytes"] / max(read["embedding_rows"], 1)
    return int(weight_bytes - read["embedding_bytes"] + row)


def roofline(bandwidth_bytes_s: float | None, weight_bytes: int | None, read: dict[str, Any] | None,
             decode_tok_s: float | None) -> dict[str, Any] | None:
    """The record's `roofline` field; None when bandwidth or weight bytes are unknown."""
    if not bandwidth_bytes_s or not weight_bytes:
        return None
    per_token = bytes_per_token(weight_bytes, read)
    limit = bandwidth_bytes_s / per_token
    return {"bandwidth_bytes_s": bandwidth_bytes_s, "bytes_per_token": per_token, "decode_tok_s_limit": limit,
            "fraction": decode_tok_s / limit if decode_tok_s else None,
            "embedding_excluded": bool(read and not read["tied"]),
            "note": "weights only (KV cache and activations left out): an upper bound"}


def roofline_text(run: dict[str, Any]) -> str | None:
    """One paragraph: the bandwidth used and how the per-variant limit in the table was derived."""
    profile = run.get("machine_profile") or {}
    if not profile or not any(r.get("roofline") for r in run["variants"]):
        return None
    bandwidth = profile["bandwidth"]
    return (f"Roofline: this CPU's memory bandwidth {bandwidth['bandwidth_bytes_s'] / 1e9:.1f} GB/s "
            f"({bandwidth['method']}, {bandwidth['threads']} threads; measured "
            f"{bandwidth.get('measured_at', profile['measured_at'])}{calibration_note(profile)}). "
            "'decode limit tok/s' = bandwidth / weight bytes read per token (the input embedding table counts "
            "one row unless it is tied to the head; KV cache left out); 'of limit' = decode tok/s / that limit.")
