"""bitsandbytes quantization: LLM.int8() and 4-bit NF4 / FP4 (QLoRA), stored as bnb checkpoints.

The artifact is the quantized model saved by transformers (packed int8 / 4-bit weights plus their
scales), so its disk bytes are the real checkpoint's, and loading it runs bnb's low-bit kernels.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from workbench.errors import WorkbenchError
from workbench.methods.base import DTYPE_BYTES, BuildContext, Method, MethodOptions, SizeEstimate, SizeInput, load_and_save

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape


class Int8Options(MethodOptions):
    threshold: float = Field(
        6.0, gt=0, description="LLM.int8() outlier threshold: activations above it run in 16-bit (llm_int8_threshold)."
    )
    skip_modules: list[str] | None = Field(
        None, description="Module names kept unquantized (default: transformers' choice, the output head)."
    )


class FourBitOptions(MethodOptions):
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA double quant).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit weights are dequantized to for each matmul."
    )
    skip_modules: list[str] | None = Field(
        None, description="Module names kept unquantized (default: transformers' choice, the output head)."
    )


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an ImportError or a broken native library
        raise WorkbenchError(
            f"bitsandbytes is unavailable ({type(exc).__name__}: {exc}); install it with "
            "'pip install bitsandbytes==0.50.2' to run bnb-* variants"
        ) from None


def bnb_config(quant: str, *, double_quant: bool = True, compute_dtype: str = "float32", threshold: float = 6.0,
               skip_modules: list[str] | None = None) -> Any:
    """transformers' BitsAndBytesConfig for `quant` (int8 | nf4 | fp4): the one place bnb-* and bnb-auto make it.

    `skip_modules` None keeps transformers' default (the output head); a list replaces that default."""
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype), llm_int8_skip_modules=skip_modules)


def block_skip_pattern(module_name: str) -> str:
    """The skip pattern that names exactly one module and its children ("model.layers.1" but not ".10").

    transformers matches each pattern as a regex at the start of a module's name, so the dots are escaped
    and a trailing dot ends the name."""
    return re.escape(module_name) + r"\."


class _BnbMethod(Method):
    honesty = "real-kernel"
    produces = "quantized"

    def quantization_config(self, options: Any) -> Any:
        raise NotImplementedError

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        require_bitsandbytes()
        ctx.emit(f"quantizing with bitsandbytes ({self.name})")
        # The quantized model is saved as bnb stores it (packed weights + scales): the real checkpoint.
        load_and_save(input_dir, out_dir, ctx, quantization_config=self.quantization_config(options),
                      device_map={"": ctx.device})


def quantized_linears(shape: "ModelShape", skip: list[str] | None) -> list[tuple[str, str, int, int, int]]:
    """The decoder Linears a bnb quantizer converts: all but those matching skip patterns (the head is never one)."""
    patterns = [re.compile(p) for p in (skip or [])]
    return [row for row in shape.linears() if not any(p.search(row[0]) for p in patterns)]


def int8_bytes(shape: "ModelShape", rest_bytes: int, skip: list[str] | None) -> int:
    """int8 weights, a float32 scale per output row (SCB) and a one-byte weight_format per quantized Linear;
    everything else (embeddings, head, norms) stays in the float dtype."""
    quantized = quantized_linears(shape, skip)
    q_params = sum(i * o for *_, i, o in quantized)
    return (shape.params() - q_params) * rest_bytes + q_params + sum(4 * o + 1 for *_, o in quantized)


def four_bit_bytes(shape: "ModelShape", rest_bytes: int, skip: list[str] | None, double_quant: bool) -> int:
    """Packed nibbles + absmax per 64 values (uint8 with a float32 per 256 blocks and a 256-entry code book under
    double quant, else float32) + a 16-entry code book and the serialized quant state per tensor."""
    quantized = quantized_linears(shape, skip)
    total = (shape.params() - sum(i * o for *_, i, o in quantized)) * rest_bytes
    for *_, i, o in quantized:
        n = i * o
        blocks = math.ceil(n / 64)
        total += math.ceil(n / 2) + 16 * 4  # packed nibbles, the 16-value code book
        if double_quant:  # absmax as uint8, one float32 absmax per 256 blocks, a 256-value nested code book, the state
            total += blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 168
        else:
            total += 4 * blocks + 78
    return total

class BnbInt8(_BnbMethod):
    name = "bnb-int8"
    summary = "LLM.int8(): 8-bit weights with 16-bit outlier columns (bitsandbytes)."
    Options: ClassVar[type[MethodOptions]] = Int8Options

    def quantization_config(self, options: Int8Options) -> Any:
        return bnb_config("int8", threshold=options.threshold, skip_modules=options.skip_modules)

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        assert isinstance(options, Int8Options)
        nbytes = int8_bytes(size.shape, DTYPE_BYTES[size.rest], options.skip_modules)
        return SizeEstimate(nbytes, f"bnb-int8 (+{size.rest} rest)", "bnb-int8")


class _FourBit(_BnbMethod):
    quant_type: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = FourBitOptions

    def quantization_config(self, options: FourBitOptions) -> Any:
        return bnb_config(self.quant_type, double_quant=options.double_quant, compute_dtype=options.compute_dtype,
                          skip_modules=options.skip_modules)

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        assert isinstance(options, FourBitOptions)
        nbytes = four_bit_bytes(size.shape, DTYPE_BYTES[size.rest], options.skip_modules, options.double_quant)
        dq = " dq" if options.double_quant else ""
        return SizeEstimate(nbytes, f"{self.quant_type}{dq} (+{size.rest} rest)", "bnb-4bit")


class BnbNF4(_FourBit):
    name = "bnb-nf4"
    quant_type = "nf4"
    summary = "4-bit NormalFloat weights (QLoRA), optional double quantization (bitsandbytes)."


class BnbFP4(_FourBit):
    name = "bnb-fp4"
    quant_type = "fp4"
    summary = "4-bit floating-point weights, optional double quantization (bitsandbytes)."
