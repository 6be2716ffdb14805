"""What a GGUF file really holds: tensor-type mix and bits per weight, read with the `gguf` package.

K-quants work on blocks of 256 values; on models whose widths are not multiples of 256 (SmolLM2's
576) llama.cpp falls back to other types for many tensors, so the nominal type (Q4_K_M) can hide a
file that is mostly Q5_0. Every GGUF variant records this so no one is misled.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

GGUF_MAGIC = b"GGUF"
GGUF_NAME = "model.gguf"  # the file inside a GGUF artifact folder


def check_gguf_file(path: Path) -> None:
    """Refuse files that are not GGUF before handing them to native code."""
    if not path.is_file():
        raise WorkbenchError(f"GGUF file {path} does not exist")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise WorkbenchError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def gguf_summary(path: Path) -> dict[str, Any]:
    """{'tensor_types': {type: count}, 'bits_per_weight': float, 'architecture': str, 'tensors': int, ...}."""
    import gguf

    check_gguf_file(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # truncated or corrupted: the reader runs off the end of the data
        raise WorkbenchError(f"{path} is a damaged GGUF file ({type(exc).__name__}: {exc})") from None
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    elements = sum(int(tensor.n_elements) for tensor in reader.tensors)
    tensor_bytes = sum(int(tensor.n_bytes) for tensor in reader.tensors)

    def field(name: str) -> Any:
        return gguf_field(reader, name)

    return {
        "architecture": field("general.architecture"),
        "file_type": field("general.file_type"),
        "tensors": len(reader.tensors),
        "tensor_types": dict(types.most_common()),
        "parameters": elements,
        "tensor_bytes": tensor_bytes,
        "bits_per_weight": tensor_bytes * 8 / elements if elements else None,
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None,
    }


def gguf_field(reader: Any, name: str) -> Any:
    """A scalar or string metadata value of a GGUFReader, None when the file lacks it."""
    import gguf

    value = reader.fields.get(name)
    if value is None:
        return None
    data = value.parts[value.data[0]]
    return bytes(data).decode() if value.types and value.types[0] == gguf.GGUFValueType.STRING else data.tolist()[0]


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Every scalar and string key-value of a GGUF file (arrays such as the vocabulary left out)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: gguf_field(reader, name) for name, field in reader.fields.items()
            if field.types and field.types[0] != gguf.GGUFValueType.ARRAY and not name.startswith("GGUF.")}
