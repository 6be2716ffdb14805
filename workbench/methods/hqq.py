"""HQQ (Half-Quadratic Quantization): calibration-free 1/2/3/4/8-bit weights per group, through the hqq library.

Each decoder Linear becomes an `hqq.core.quantize.HQQLinear` whose packed integers, scales and zero points
(the zero points found by HQQ's half-quadratic solver, no calibration data) are stored in safetensors:
HQQLinear's own state dict is all tensors (its metadata encoded as uint8 tensors, hqq 0.2.8 `state_dict`),
so the whole model's state dict is written with safetensors and read back into HQQLinear modules by their
`_load_from_state_dict`. hqq's own `save_quantized` writes a pickle (`qmodel.pt`), which the workbench never
stores. transformers' `HqqConfig` cannot be used with transformers 5.17: its loader raises
"QuantizationMethod.HQQ is not available yet".

On a CPU hqq has only its PyTorch backend, which unpacks each weight on every forward call, so its decode
is expected to be slower than float; the honesty label is measured (`honesty_from_speed`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from workbench.errors import WorkbenchError
from workbench.methods.base import (
    DTYPE_BYTES, LOADER_FILE, BuildContext, Method, MethodOptions, ShapeCheck, SizeEstimate, SizeInput,
    write_custom_loader,
)

WEIGHTS_FILE = "model.safetensors"


class HQQOptions(MethodOptions):
    nbits: Literal[1, 2, 3, 4, 8] = Field(4, description="Bits per weight.")
    group_size: Literal[16, 32, 64, 128, 256] = Field(
        64, description="Weights per scale and zero point (along the input axis); must divide every Linear's input width.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the weights are unpacked to for each matmul, and of every weight left float.")


def require_hqq() -> Any:
    try:
        import hqq
    except Exception as exc:  # an ImportError or a broken native library
        raise WorkbenchError(f"hqq is unavailable ({type(exc).__name__}: {exc}); install it with "
                             "'pip install hqq==0.2.8' to run hqq variants") from None
    return hqq


def _decoder_linears(model: Any) -> list[str]:
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")]


def _set_module(model: Any, name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_linears(model: Any, nbits: int, group_size: int, dtype: str, emit: Any = None) -> list[str]:
    """Replace every decoder Linear by an HQQLinear in place; the names replaced."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    names = _decoder_linears(model)
    if not names:
        raise WorkbenchError(f"hqq: no decoder Linear layers under model.layers in this {model.config.model_type} "
                             "model (hqq replaces torch.nn.Linear layers of Llama-style decoders)")
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    for done, name in enumerate(names, 1):
        linear = model.get_submodule(name)
        _set_module(model, name, HQQLinear(linear, quant_config=config, compute_dtype=getattr(torch, dtype),
                                           device="cpu", del_orig=True))
        if emit and done % 20 == 0:
            emit(f"quantized {done}/{len(names)} layers")
    return names


def load_hqq(folder: Path, device: str, trust_remote_code: bool) -> Any:
    """The custom loader (methods/base.py `custom_loader`): the model skeleton from config.json, its decoder
    Linears as empty HQQLinear modules, then the stored tensors (packed weights into HQQLinear's own loader)."""
    import torch
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    require_hqq()
    if device != "cpu":
        raise WorkbenchError("hqq variants run on the CPU here (device: cpu)")
    recipe = json.loads((Path(folder) / LOADER_FILE).read_text())
    dtype = getattr(torch, recipe["dtype"])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # Built on the CPU, not on the meta device: buffers that are computed, not stored (rotary inv_freq), must be
    # real. The random initial weights are overwritten below; that costs seconds for a small model.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name in recipe["layers"]:
        _set_module(model, name, HQQLinear(None, quant_config=None, compute_dtype=dtype, device="cpu"))
    state = load_file(str(Path(folder) / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise WorkbenchError(f"{folder}: the stored hqq tensors do not fit the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    return model.eval()


def _packed_bytes(nbits: int, group_size: int, inputs: int, outputs: int) -> int:
    """Bytes one HQQLinear holds on a CPU: the integers packed (3-bit values ten to an int32, others whole
    values per byte) and a float32 scale and zero point per group."""
    values = inputs * outputs
    packed = (values + 9) // 10 * 4 if nbits == 3 else values * nbits // 8
    return packed + 2 * 4 * (values // group_size)


class HQQ(Method):
    name = "hqq"
    summary = "HQQ: calibration-free 1-8 bit weights per group (half-quadratic zero points), hqq's CPU backend."
    Options: ClassVar[type[MethodOptions]] = HQQOptions
    honesty = "real-kernel"
    honesty_from_speed = True
    produces = "custom"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        assert isinstance(options, HQQOptions)
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hqq = require_hqq()
        model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=getattr(torch, options.dtype),
                                                     trust_remote_code=ctx.trust_remote_code)
        widths = sorted({model.get_submodule(n).in_features for n in _decoder_linears(model)
                         if model.get_submodule(n).in_features % options.group_size})
        if widths:
            raise WorkbenchError(f"hqq group_size {options.group_size} does not divide the input widths "
                                 f"{', '.join(map(str, widths))}")
        ctx.emit(f"quantizing {len(_decoder_linears(model))} Linear layers with hqq ({options.nbits}-bit, "
                 f"groups of {options.group_size})")
        layers = quantize_linears(model, options.nbits, options.group_size, options.dtype, ctx.emit)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # one stored copy; the loader ties them again
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS_FILE))
        model.config.save_pretrained(out_dir)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code).save_pretrained(out_dir)
        write_custom_loader(out_dir, "workbench.methods.hqq:load_hqq", dtype=options.dtype, layers=layers)
        (out_dir / "stage_report.json").write_text(json.dumps({"hqq": {
            "nbits": options.nbits, "group_size": options.group_size, "dtype": options.dtype,
            "layers": len(layers), "version": hqq.__version__, "backend": "pytorch (CPU)"}}))

    def reshape(self, shape: Any, rest: str, options: MethodOptions) -> tuple[Any, str]:
        assert isinstance(options, HQQOptions)
        return shape, options.dtype

    def refusals(self, options: MethodOptions, check: ShapeCheck) -> list[str]:
        assert isinstance(options, HQQOptions)
        if check.shape.model_type == "gpt2":
            return [f"{check.model}: hqq replaces torch.nn.Linear layers; GPT-2's layers are Conv1D"]
        widths = sorted({inputs for _, _, _, inputs, _ in check.shape.linears() if inputs % options.group_size})
        if widths:
            return [f"{check.model}: hqq group_size {options.group_size} does not divide the input widths "
                    f"{', '.join(map(str, widths))}; pick a group_size that does"]
        return []

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        assert isinstance(options, HQQOptions)
        linears = size.shape.linears()
        rest = (size.shape.params() - sum(i * o for *_, i, o in linears)) * DTYPE_BYTES[options.dtype]
        packed = sum(_packed_bytes(options.nbits, options.group_size, i, o) for *_, i, o in linears)
        return SizeEstimate(rest + packed, f"hqq {options.nbits}-bit g{options.group_size} (+{options.dtype} rest)",
                            f"hqq-{options.nbits}bit")
