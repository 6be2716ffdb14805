"""Importance matrix for llama.cpp's quantizer, collected from the torch model on calibration text.

What llama.cpp's imatrix tool stores (tools/imatrix/imatrix.cpp, `IMatrixCollector::collect_imatrix`,
and tools/quantize/quantize.cpp, `prepare_imatrix`, which divides `in_sum2` by `counts`): for every
weight matrix of the decoder blocks (`blk.*`; the output head is skipped unless --process-output),
the mean over calibration tokens of the squared input activation of each input column. The quantizer
uses it as per-column weights of its rounding error (ggml-quants.c, e.g. `quantize_row_q4_K_impl`).

Here forward pre-hooks on the torch model's Linear layers see the same inputs (the converter only
reorders the rows of attn_q / attn_k for llama.cpp's rope layout, never the input columns), and the
HF module names are mapped to GGUF tensor names with gguf-py's own table (`gguf.get_tensor_name_map`),
checked against the names and widths in the converted file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.data.calibration import CalibrationSpec, calibration_sequences, describe
from workbench.errors import WorkbenchError

IMATRIX_FILE = "imatrix.npz"  # kept in the artifact folder, so anyone can inspect what the quantizer was given


def gguf_tensor_names(gguf_path: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(architecture, {tensor name: shape as numpy sees it, rows first}) of a GGUF file."""
    from workbench.data.gguf_info import gguf_field, gguf_reader

    reader = gguf_reader(gguf_path)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    return str(gguf_field(reader, "general.architecture")), shapes


def hf_to_gguf_name_map(arch: str, n_blocks: int) -> Any:
    """gguf-py's HF-name -> GGUF-name table for an architecture name as written in general.architecture."""
    import gguf

    by_name = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise WorkbenchError(f"gguf-py knows no tensor names for architecture '{arch}'")
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def gguf_name(name_map: Any, hf_name: str) -> str | None:
    """GGUF tensor name of an HF parameter ('model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight')."""
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def collect_imatrix(model: Any, sequences: list[list[int]], name_map: Any,
                    emit: Callable[[str], None] = lambda _m: None) -> tuple[dict[str, np.ndarray], int]:
    """({GGUF weight name: mean squared input per column, float32}, tokens seen) over `sequences`.

    Only Linear layers whose GGUF name starts with 'blk.' are collected, as the imatrix tool does by default.
    """
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + (x * x).sum(0) if name in sums else (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            target = gguf_name(name_map, module_name + ".weight")
            if target and target.startswith("blk."):
                hooks.append(module.register_forward_pre_hook(hook_for(target)))
    if not hooks:
        raise WorkbenchError("no decoder Linear layer maps to a GGUF tensor name: cannot collect an importance matrix")
    try:
        with torch.inference_mode():
            for index, ids in enumerate(sequences):
                emit(f"importance matrix: sequence {index + 1}/{len(sequences)}")
                model(torch.tensor([ids]))
    finally:
        for handle in hooks:
            handle.remove()
    tokens = sum(len(s) for s in sequences)
    return {name: (sums[name] / counts[name]).float().numpy() for name in sorted(sums)}, tokens


def check_against_file(matrix: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every entry must name a tensor of the converted file with as many columns (llama.cpp throws otherwise)."""
    for name, values in matrix.items():
        if name not in shapes:
            raise WorkbenchError(f"importance matrix entry {name} is not a tensor of the converted file")
        if shapes[name][-1] != values.size:
            raise WorkbenchError(f"importance matrix entry {name} has {values.size} values; the tensor has "
                                 f"{shapes[name][-1]} columns")


def matrix_hash(matrix: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(matrix):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(matrix[name], dtype=np.float32).tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def compute_imatrix(input_dir: Path, converted: Path, spec: CalibrationSpec, trust_remote_code: bool,
                    emit: Callable[[str], None] = lambda _m: None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The importance matrix of the model in `input_dir` for its converted file, and its record (`gguf.imatrix`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(input_dir, trust_remote_code=trust_remote_code)
    sequences = calibration_sequences(tokenizer, spec)  # disjoint from the eval text; fails fast when too short
    arch, shapes = gguf_tensor_names(converted)
    model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    n_blocks = 1 + max(int(name.split(".")[1]) for name in shapes if name.startswith("blk."))
    matrix, tokens = collect_imatrix(model, sequences, hf_to_gguf_name_map(arch, n_blocks), emit)
    check_against_file(matrix, shapes)
    record = {**describe(spec), "tokens": tokens, "entries": len(matrix), "hash": matrix_hash(matrix),
              "statistic": "mean over calibration tokens of the squared input of each column (llama.cpp imatrix)"}
    return matrix, record


def save_imatrix(matrix: dict[str, np.ndarray], path: Path) -> None:
    np.savez(path, **matrix)


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
