"""Float baselines: the model stored and run in fp32, fp16 or bf16 (plain torch kernels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from workbench.methods.base import (BuildContext, Method, MethodOptions, NoOptions, SizeEstimate, SizeInput,
                                    load_and_save)

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape


def stored_dtype(model_dir: Path) -> str | None:
    """The dtype a HF folder's config declares for its weights (transformers 5 writes `dtype`)."""
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


class _DtypeMethod(Method):
    dtype: ClassVar[str]
    Options = NoOptions

    def reuses_input(self, input_dir: Path, options: MethodOptions) -> bool:
        config = json.loads((input_dir / "config.json").read_text())
        return stored_dtype(input_dir) == self.dtype and "quantization_config" not in config

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        import torch

        ctx.emit(f"casting weights to {self.dtype}")
        load_and_save(input_dir, out_dir, ctx, dtype=getattr(torch, self.dtype))

    def reshape(self, shape: "ModelShape", rest: str, options: MethodOptions) -> tuple["ModelShape", str]:
        return shape, self.dtype

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        return SizeEstimate(size.dense_bytes(), self.name, size.rest)

    def skips_build(self, source_dtype: str, options: MethodOptions) -> bool:
        return source_dtype == self.dtype


class FP32(_DtypeMethod):
    name = "fp32"
    dtype = "float32"
    summary = "Full precision (32-bit floats): the usual baseline."


class FP16(_DtypeMethod):
    name = "fp16"
    dtype = "float16"
    summary = "Half precision (16-bit IEEE floats); slow on most CPUs, fast on GPUs."


class BF16(_DtypeMethod):
    name = "bf16"
    dtype = "bfloat16"
    summary = "bfloat16: fp32's range with 8 bits of mantissa."
