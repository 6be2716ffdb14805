"""What a GGUF file really holds: tensor-type mix and bits per weight, read with the `gguf` package.

K-quants work on blocks of 256 values; on models whose widths are not multiples of 256 (SmolLM2's
576) llama.cpp falls back to other types for many tensors, so the nominal type (Q4_K_M) can hide a
file that is mostly Q5_0. Every GGUF variant records this so no one is misled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.paths import workbench_home

GGUF_MAGIC = b"GGUF"
GGUF_NAME = "model.gguf"  # the file inside a GGUF artifact folder
SUMMARY_VERSION = 1  # part of the summary cache key: bump when _read_summary changes


def check_gguf_file(path: Path) -> None:
    """Refuse files that are not GGUF before handing them to native code; say what is wrong and the size."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise WorkbenchError(f"{path} is a damaged GGUF file: it is empty (0 bytes)")
    with path.open("rb") as handle:
        head = handle.read(64)
    if head[:4] != GGUF_MAGIC:
        kind = "a text file" if _looks_like_text(head) else "not GGUF data"
        raise WorkbenchError(f"{path} is not a GGUF file: {_size(size)} of {kind}, starting with {head[:8]!r} "
                             "instead of b'GGUF' (a damaged or mislabelled file)")
    if size < 24:  # magic, version, tensor count and metadata count
        raise WorkbenchError(f"{path} is a damaged GGUF file: {_size(size)}, too short even for the GGUF header")


def check_gguf_readable(path: Path) -> None:
    """check_gguf_file, then the whole header and tensor table read, so a truncated file is named as such."""
    _open_reader(path)


def gguf_reader(path: Path | str) -> Any:
    """gguf-py's reader of a file, shared within this process while the file is unchanged.

    Parsing the metadata builds a numpy view per array element: about 10 s for a 49k-token vocabulary and
    its merges on the build machine. Resolving a GGUF source used to parse the same file five times (the
    readability check, transformers' config and weights, its tokenizer, the rebuilt tokenizer). The key is
    the file's identity (device, inode, size, modification time), so a rewritten file is parsed again.
    """
    stat = Path(path).resolve().stat()
    return _cached_reader(str(Path(path).resolve()), (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)  # a few open memory maps at most
def _cached_reader(path: str, _identity: tuple[int, int, int, int]) -> Any:
    from gguf.gguf_reader import GGUFReader  # the class itself, also while gguf_parsed_once() stands in for it

    return GGUFReader(path)


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, transformers' GGUF loading shares this process's parsed files and gguf-py's name maps.

    transformers reads `gguf.GGUFReader` and `gguf.get_tensor_name_map` from the module at each call
    (modeling_gguf_pytorch_utils: `load_gguf_checkpoint`, `get_gguf_hf_weights_map`), parses the file twice
    per model load and once per tokenizer load, and rebuilds the tensor-name map once per submodule (397 times
    for SmolLM2: 14 s). Measured on the bundled file: loading it as an fp32 model took 43 s, of which 33 s were
    these repeats. Both stand-ins return what the originals would (the reader is read-only; the map is a pure
    function of architecture and block count); the originals are restored on exit. It swaps module attributes, so
    it belongs in a single-threaded worker process (resolving a source runs in one), not in the app's threads.
    """
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = gguf_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _open_reader(path: Path) -> Any:
    """A GGUFReader of a file that passed check_gguf_file and whose tensors all lie within the file."""
    check_gguf_file(path)
    try:
        reader = gguf_reader(path)
    except Exception as exc:  # the reader runs off the end of truncated data
        raise WorkbenchError(f"{path} is a damaged GGUF file: {_size(Path(path).stat().st_size)}, its header or tensor "
                             f"table cannot be read (truncated or corrupted: {type(exc).__name__})") from None
    size = Path(path).stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise WorkbenchError(f"{path} is a damaged GGUF file: {_size(size)}, but its tensors need {_size(end)} "
                             "(truncated)")
    return reader


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def _size(size: int) -> str:
    return f"{size} bytes" if size < 10_000 else f"{size / 1e6:.1f} MB ({size} bytes)"


def gguf_summary(path: Path) -> dict[str, Any]:
    """{'tensor_types': {type: count}, 'bits_per_weight': float, 'architecture': str, 'tensors': int, ...}.

    Reading the metadata with GGUFReader takes seconds for a 49k-token vocabulary (it builds a view per
    array element), and every load of a llama.cpp variant needs the summary, so it is kept under
    `$WORKBENCH_HOME/gguf-summaries`, keyed by the file's device, inode, size and modification time: a
    rewritten or truncated file is read again, while a file moved within its file system keeps its entry (a
    build reads the summary in its temporary folder, and the measuring worker finds it after the folder is
    published, so the variant's load time is llama.cpp's, not gguf-py's).
    """
    path = Path(path)
    check_gguf_file(path)
    stat = path.resolve().stat()
    identity = f"{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}"
    key = hashlib.sha256(f"{SUMMARY_VERSION}|{identity}".encode()).hexdigest()[:24]
    cached = workbench_home() / "gguf-summaries" / f"{key}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    summary = _read_summary(_open_reader(path))
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(summary))
    os.replace(partial, cached)  # atomic: a concurrent reader sees the old state or the whole file
    return summary


def _read_summary(reader: Any) -> dict[str, Any]:
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

    reader = gguf_reader(path)
    return {name: gguf_field(reader, name) for name, field in reader.fields.items()
            if field.types and field.types[0] != gguf.GGUFValueType.ARRAY and not name.startswith("GGUF.")}
