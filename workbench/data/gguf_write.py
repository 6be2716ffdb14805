"""A float GGUF written from a GGUF source itself, so re-quantizing it keeps the source's tokenizer and metadata.

The llama.cpp converter rebuilds a GGUF from a Hugging Face folder and identifies BPE tokenizers by a hash of
their output: a tokenizer it does not know stops the conversion, and one it mistakes changes how llama.cpp
tokenizes. When the input of a `gguf` stage is the unmodified GGUF source, none of that is needed: every
tensor of the source is dequantized to the float type asked for and written with the source's own key-value
metadata (vocabulary, merges, scores, special tokens, chat template), as gguf-py's
`gguf/scripts/gguf_new_metadata.py` (`copy_with_new_metadata`) copies metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.data.gguf_info import gguf_reader
from workbench.errors import WorkbenchError

# What llama.cpp's converter does with a float type: matrices take it, 1-D tensors (norms, biases) stay F32.
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}


def float_copy_of_gguf(source: Path, target: Path, outtype: str) -> None:
    """Write `target`: `source`'s metadata and tensors, every tensor dequantized; matrices stored as `outtype`."""
    import gguf

    if outtype not in _FILE_TYPES:
        raise WorkbenchError(f"a float GGUF copy needs F32, F16 or BF16, not {outtype}")
    reader = gguf_reader(source)
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if architecture is None:
        raise WorkbenchError(f"{source} has no general.architecture, so it cannot be re-quantized")
    writer = gguf.GGUFWriter(target, arch=architecture.contents(), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    # The file type and quantization version describe the tensors, which change here; the rest is copied.
    replaced = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION}
    for field in reader.fields.values():
        if field.name in replaced or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))
    matrix_type = getattr(gguf.GGMLQuantizationType, outtype)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        kind = matrix_type if values.ndim > 1 and values.shape[0] > 1 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, values)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
