"""torchao weight quantization for torch on a CPU: int8 weight-only, int8 dynamic activation + int8 weight, and
int4 weight-only in torchao's CPU layout (the tinygemm `_weight_int4pack_mm_for_cpu` kernel).

The artifact is the input's weights in the compute dtype plus a loader recipe; the Linear weights are packed
into torchao tensors when the variant loads (`load_quantized`), which takes seconds. Why not store the packed
tensors: torchao 0.18's safetensors support (torchao.prototype.safetensors ALLOWED_TENSORS_SUBCLASSES) has no
entry for its CPU int4 layout (Int4OpaqueTensor), and the workbench stores no pickles. So the record's disk
bytes are the float checkpoint's, while its weight bytes are the packed tensors' as loaded (measured from the
inner tensors, runtimes/torch.py `state_bytes`).

Whether these kernels are faster than fp32 depends on the CPU and on torch's per-call overhead for tensor
subclasses (at batch 1 on a small model, dispatch can cost more than the matmul saves), so the honesty label
is measured (`honesty_from_speed`, running/honesty.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from workbench.errors import WorkbenchError
from workbench.methods.base import (
    DTYPE_BYTES, LOADER_FILE, BuildContext, Method, MethodOptions, ShapeCheck, SizeEstimate, SizeInput,
    write_custom_loader,
)

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

Scheme = Literal["int8-weight-only", "int8-dynamic", "int4-weight-only"]
HEAD = "lm_head"


class TorchAOOptions(MethodOptions):
    scheme: Scheme = Field(
        "int8-weight-only",
        description="int8-weight-only (int8 weights, one scale per output row), int8-dynamic (activations "
                    "quantized to int8 per token at run time too), or int4-weight-only (groups of group_size "
                    "weights, asymmetric, torchao's CPU int4 layout).")
    group_size: Literal[32, 64, 128, 256] = Field(
        32, description="int4-weight-only: weights per scale and zero point; must divide every Linear's input width.")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="dtype of the activations and of every weight left unquantized (torchao's CPU "
                                "int4 and int8 kernels are fastest with bfloat16 activations).")
    head: bool = Field(
        True, description="Quantize the output head too (the largest matmul of a small model's decode step); a "
                          "tied head is untied first, so the input embedding stays in dtype.")

    @model_validator(mode="after")
    def _group_size_only_for_int4(self) -> "TorchAOOptions":
        # The default written out (a saved preset dumps every field) is fine; another group size would be ignored.
        default = type(self).model_fields["group_size"].default
        if self.scheme != "int4-weight-only" and self.group_size != default:
            raise ValueError(f"group_size applies to int4-weight-only only, not {self.scheme}")
        return self


def require_torchao() -> Any:
    import logging

    # torchao's wheel carries CUDA-only extensions (mxfp8, cutlass) whose failed loads it logs as warnings on
    # every import; none of them is used on a CPU, so they would only alarm the reader of a variant's log.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao
    except Exception as exc:  # an ImportError or a broken native library
        raise WorkbenchError(f"torchao is unavailable ({type(exc).__name__}: {exc}); install it with "
                             "'pip install torchao==0.18.0' to run torchao variants") from None
    return torchao


def quant_config(scheme: str, group_size: int) -> Any:
    """torchao's config object for one scheme (the one place the scheme names map to torchao's API)."""
    require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if scheme == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if scheme == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    # torchao 0.18's CPU int4 layout lives under prototype/; Int4WeightOnlyConfig's layouts need CUDA, XPU or NPU.
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)


def quantized_names(model: Any, head: bool) -> list[str]:
    """The Linear modules a torchao variant packs: every decoder Linear, and the output head when asked."""
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (name.startswith("model.layers.") or (head and name == HEAD))]


def quantize_model(model: Any, scheme: str, group_size: int, head: bool) -> list[str]:
    """Pack the model's Linear weights in place; the names packed. Refuses a layer torchao would skip silently."""
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from torchao.quantization import quantize_

    names = set(quantized_names(model, head))
    if not any(name.startswith("model.layers.") for name in names):  # GPT-2's Conv1D, or another layout
        raise WorkbenchError(f"torchao: no decoder Linear layers under model.layers in this {model.config.model_type} "
                             "model (torchao packs torch.nn.Linear weights of Llama-style decoders)")
    if head and HEAD in names:
        embedding = model.get_input_embeddings().weight
        if model.lm_head.weight is embedding:  # tied: quantizing the head must not quantize the embedding lookup
            model.lm_head.weight = torch.nn.Parameter(embedding.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
    quantize_(model, quant_config(scheme, group_size), filter_fn=lambda module, name: name in names)
    left = sorted(n for n in names if not is_traceable_wrapper_subclass(model.get_submodule(n).weight.data))
    if left:  # torchao leaves a weight whose width the group size does not divide as it was, with an info log
        raise WorkbenchError(f"torchao {scheme} did not quantize {len(left)} Linear layers ({', '.join(left[:3])}"
                             f"{' ...' if len(left) > 3 else ''}); for int4, group_size must divide their input widths")
    return sorted(names)


def load_quantized(folder: Path, device: str, trust_remote_code: bool) -> Any:
    """The custom loader (methods/base.py `custom_loader`): the float checkpoint, packed by torchao on load."""
    import torch
    from transformers import AutoModelForCausalLM

    require_torchao()
    recipe = json.loads((Path(folder) / LOADER_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, recipe["dtype"]),
                                                 device_map={"": device}, trust_remote_code=trust_remote_code)
    quantize_model(model, recipe["scheme"], recipe["group_size"], recipe["head"])
    return model.eval()


def _scheme_bytes(scheme: str, group_size: int, inputs: int, outputs: int, dtype_bytes: int) -> int:
    """Bytes one packed Linear weight holds (the inner tensors of torchao 0.18's Int8Tensor and Int4OpaqueTensor):
    int8 values with a float32 scale (whatever the activation dtype) and an int8 zero point per output row, or int4
    values two per byte with a (scale, zero) pair per group in the activation dtype."""
    if scheme == "int4-weight-only":
        return inputs * outputs // 2 + (inputs // group_size) * outputs * 2 * dtype_bytes
    return inputs * outputs + outputs * (4 + 1)


class TorchAO(Method):
    name = "torchao"
    summary = "torchao int8 / int4 weight quantization for torch's CPU kernels (packed when the variant loads)."
    Options: ClassVar[type[MethodOptions]] = TorchAOOptions
    honesty = "real-kernel"
    honesty_from_speed = True
    produces = "custom"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        assert isinstance(options, TorchAOOptions)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        require_torchao()
        model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=getattr(torch, options.dtype),
                                                     trust_remote_code=ctx.trust_remote_code)
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code).save_pretrained(out_dir)
        # A trial packing now, so a layer torchao cannot take fails the build, not every later load.
        ctx.emit(f"packing {len(quantized_names(model, options.head))} Linear layers with torchao {options.scheme}")
        packed = quantize_model(model, options.scheme, options.group_size, options.head)
        (out_dir / "stage_report.json").write_text(json.dumps({"torchao": {
            "scheme": options.scheme, "group_size": options.group_size if options.scheme == "int4-weight-only" else None,
            "dtype": options.dtype, "packed_layers": len(packed), "head": HEAD in packed,
            "stored": f"{options.dtype} checkpoint, packed when loaded"}}))
        write_custom_loader(out_dir, "workbench.methods.torchao:load_quantized", scheme=options.scheme,
                            group_size=options.group_size, dtype=options.dtype, head=options.head,
                            note="float checkpoint; packed by torchao when loaded")

    def reshape(self, shape: "ModelShape", rest: str, options: MethodOptions) -> tuple["ModelShape", str]:
        assert isinstance(options, TorchAOOptions)
        return shape, options.dtype

    def refusals(self, options: MethodOptions, check: ShapeCheck) -> list[str]:
        assert isinstance(options, TorchAOOptions)
        if check.shape.model_type == "gpt2":
            return [f"{check.model}: torchao packs torch.nn.Linear weights; GPT-2's layers are Conv1D"]
        if options.scheme != "int4-weight-only":
            return []
        widths = sorted({inputs for _, _, _, inputs, _ in check.shape.linears() if inputs % options.group_size})
        if options.head and check.shape.hidden % options.group_size:
            widths = sorted(set(widths) | {check.shape.hidden})
        if not widths:
            return []
        return [f"{check.model}: torchao int4 group_size {options.group_size} does not divide the input widths "
                f"{', '.join(map(str, widths))}; pick a group_size that does (32 divides more widths)"]

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        assert isinstance(options, TorchAOOptions)
        rest = DTYPE_BYTES[options.dtype]
        linears = size.shape.linears()
        packed = sum(_scheme_bytes(options.scheme, options.group_size, i, o, rest) for *_, i, o in linears)
        total = (size.shape.params() - sum(i * o for *_, i, o in linears)) * rest + packed
        if options.head:
            vocab, hidden = size.shape.vocab, size.shape.hidden
            head = _scheme_bytes(options.scheme, options.group_size, hidden, vocab, rest)
            # an untied head adds its packed copy; an untied float head is replaced by one
            total += head if size.shape.tied else head - vocab * hidden * rest
        size.notes.append("torchao: stored as a float checkpoint, packed when loaded (weight bytes are the packed ones)")
        bits = "int4" if options.scheme == "int4-weight-only" else "int8"
        return SizeEstimate(int(total), f"torchao {options.scheme} (+{options.dtype} rest)", f"torchao-{bits}")
