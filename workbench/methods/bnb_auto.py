"""`bnb-auto`: bitsandbytes with the most sensitive decoder blocks kept in float, within a size budget.

The torch side of mixed precision under a budget (gguf-auto is the llama.cpp side). How it works, and why:

1. The input is loaded once quantized by bitsandbytes exactly as `bnb-nf4` / `bnb-fp4` / `bnb-int8` would
   (transformers' default skips: the output head stays float). Its state dict gives each block's bytes
   quantized; the same block in float costs its parameters at the model's float width. Both are the
   bytes the workbench reports as the weights figure (the loaded state dict, each storage once).
2. Sensitivity: each block's Linear weights, dequantized from that quantized model (bitsandbytes' own
   dequantization, so the values are the ones its kernels use), are swapped into the float32 model one
   block at a time, and the KLD to the unmodified model is measured on a short slice of calibration
   text (never the eval text) by `workbench.analysis.sensitivity.KLDProbe`. As for gguf-auto this measures weight
   error, not the low-bit kernels' own arithmetic; the table is cached per input and quantization.
3. Every block is then a unit with two options, quantized (its measured KLD) or float (zero KLD), and
   `workbench.analysis.mixed_precision` assigns them: the blocks that save the most KLD per extra byte stay float
   until the budget would be exceeded (exact dynamic programming; the greedy KLD-per-byte walk's choice
   is recorded beside it, and equals it whenever the blocks are the same size, as in most models).
4. The artifact is built like any bnb variant with `llm_int8_skip_modules` naming the kept blocks, and its
   weight bytes are checked against the table's prediction.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from workbench.data.calibration import CalibrationSpec, calibration_sequences, describe
from workbench.errors import WorkbenchError
from workbench.methods.base import (DTYPE_BYTES, BuildContext, BuildSpeed, Method, MethodOptions, ShapeCheck,
                                    SizeEstimate, SizeInput)
from workbench.methods.bnb import bnb_config, block_skip_pattern, four_bit_bytes, int8_bytes, require_bitsandbytes

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

SENSITIVITY_DEFAULT = CalibrationSpec(samples=2, seq_len=256, text="pydoc", seed=1)  # as gguf-auto's
FOUR_BIT_ONLY = ("double_quant", "compute_dtype")


class BnbAutoOptions(MethodOptions):
    target_mb: float = Field(gt=0, description="Budget: weight bytes of the loaded model in MB (1e6 bytes), the weights "
                                               "figure the workbench reports; the most sensitive blocks stay float "
                                               "within it.")
    quant: Literal["nf4", "fp4", "int8"] = Field("nf4", description="bitsandbytes type of the blocks not kept in float.")
    double_quant: bool = Field(True, description="nf4/fp4: quantize the quantization constants too (QLoRA double quant).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="nf4/fp4: dtype the 4-bit weights are dequantized to for each matmul.")
    threshold: float = Field(6.0, gt=0, description="int8: LLM.int8() outlier threshold (llm_int8_threshold).")
    sensitivity: CalibrationSpec = Field(default_factory=lambda: SENSITIVITY_DEFAULT.model_copy(),
                                         description="Calibration tokens the per-block KLD is measured on "
                                                     "(never the eval text); one forward per block.")

    @model_validator(mode="after")
    def _options_of_the_type(self) -> "BnbAutoOptions":
        # An option of the other kind of quantization is refused only when it asks for something: its default
        # written out (as a dumped preset does) changes nothing, so it is accepted.
        fields = type(self).model_fields
        asked = {name for name in self.model_fields_set if getattr(self, name) != fields[name].default}
        if self.quant == "int8" and asked & set(FOUR_BIT_ONLY):
            raise ValueError(f"{', '.join(sorted(asked & set(FOUR_BIT_ONLY)))} apply to nf4/fp4, not quant: int8")
        if self.quant != "int8" and "threshold" in asked:
            raise ValueError(f"threshold applies to quant: int8, not {self.quant}")
        return self

    def config(self, skip_modules: list[str] | None) -> Any:
        return bnb_config(self.quant, double_quant=self.double_quant, compute_dtype=self.compute_dtype,
                          threshold=self.threshold, skip_modules=skip_modules)


# ---- bytes per block --------------------------------------------------------------------------------------


def decoder_prefix(model: Any) -> str:
    """The module name of the decoder blocks' list ("model.layers" for Llama-style models)."""
    layers = model.model.layers
    return next(name for name, module in model.named_modules() if module is layers)


def bytes_by_block(model: Any, prefix: str) -> tuple[dict[int, int], int]:
    """({block index: state bytes under prefix.N.}, bytes of everything else), each storage counted once
    as `runtimes.torch.state_bytes` counts the weights figure, so the parts add up to it."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    seen: set[int] = set()
    blocks: dict[int, int] = {}
    rest = 0
    for key, tensor in model.state_dict().items():
        if not hasattr(tensor, "data_ptr") or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        size = tensor.numel() * tensor.element_size()
        match = pattern.match(key)
        if match:
            blocks[int(match.group(1))] = blocks.get(int(match.group(1)), 0) + size
        else:
            rest += size
    return blocks, rest


def float_block_bytes(model: Any, prefix: str, element_size: int) -> dict[int, int]:
    """Each block's bytes when nothing in it is quantized: its state entries at the float width."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    blocks: dict[int, int] = {}
    for key, tensor in model.state_dict().items():
        match = pattern.match(key)
        if match:
            size = tensor.numel() * (element_size if tensor.is_floating_point() else tensor.element_size())
            blocks[int(match.group(1))] = blocks.get(int(match.group(1)), 0) + size
    return blocks


# ---- measuring --------------------------------------------------------------------------------------------


def measure_blocks(reference: Any, quantized: Any, sequences: list[list[int]], emit: Any) -> dict[int, float]:
    """{block: KLD to the float model when only that block holds bitsandbytes' (dequantized) weights}."""
    import torch

    from workbench.runtimes.torch import float_weight
    from workbench.analysis.sensitivity import KLDProbe

    probe = KLDProbe(reference, sequences)
    klds: dict[int, float] = {}
    pairs = list(zip(reference.model.layers, quantized.model.layers))
    for index, (float_block, quant_block) in enumerate(pairs):
        emit(f"sensitivity: block {index + 1}/{len(pairs)}")
        quantized_modules = dict(quant_block.named_modules())
        originals = {}
        try:
            for name, module in float_block.named_modules():
                other = quantized_modules.get(name)
                if isinstance(module, torch.nn.Linear) and other is not None and type(other) is not torch.nn.Linear:
                    originals[name] = module.weight.data
                    # The reference runs on the CPU; on a GPU the quantized weights are dequantized there first.
                    module.weight.data = float_weight(other).to(module.weight.device, module.weight.dtype).reshape(
                        module.weight.shape)
            klds[index] = max(probe.kld(index), 0.0) if originals else 0.0
        finally:
            modules = dict(float_block.named_modules())
            for name, data in originals.items():
                modules[name].weight.data = data
    return klds


# ---- the method -------------------------------------------------------------------------------------------


class BnbAuto(Method):
    name = "bnb-auto"
    summary = ("bitsandbytes (nf4 / fp4 / int8) with the most sensitive decoder blocks kept in float to fill "
               "target_mb (per-block KLD measured on calibration text); real bnb kernels.")
    Options: ClassVar[type[MethodOptions]] = BnbAutoOptions
    honesty = "real-kernel"
    produces = "quantized"

    # ---- estimates (workbench/planning/): the budget bounds the size ------------------------------------------

    @staticmethod
    def bounds(shape: "ModelShape", rest: str, options: BnbAutoOptions) -> tuple[int, int]:
        """(every block quantized, every block float): the smallest and largest model bnb-auto can make."""
        rest_bytes = DTYPE_BYTES[rest]
        if options.quant == "int8":
            floor = int8_bytes(shape, rest_bytes, None)
        else:
            floor = four_bit_bytes(shape, rest_bytes, None, options.double_quant)
        return floor, shape.params() * rest_bytes

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """bnb-auto fills its budget from below, a whole block at a time: the estimate is the budget, held between
        the all-quantized and the all-float sizes (which blocks stay float is known only after measuring)."""
        assert isinstance(options, BnbAutoOptions)
        budget = int(options.target_mb * 1e6)
        floor, ceiling = self.bounds(size.shape, size.rest, options)
        size.notes.append(f"bnb-auto keeps the most sensitive blocks float within {budget / 1e6:.2f} MB: between "
                          f"{floor / 1e6:.2f} MB (every block {options.quant}) and {ceiling / 1e6:.2f} MB (every block "
                          "float), at most the budget")
        if budget < floor:
            size.notes.append(f"the budget is below the smallest model bnb-auto can make ({floor / 1e6:.2f} MB): "
                              "the build will refuse it")
        elif budget >= ceiling:
            size.notes.append("the budget holds every block in float: nothing will be quantized")
        family = "bnb-int8" if options.quant == "int8" else "bnb-4bit"
        return SizeEstimate(min(max(budget, floor), ceiling), f"bnb-auto {options.quant} {budget / 1e6:g} MB", family)

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        """Quantized and float loads, one forward over the calibration tokens per block, the final quantized load."""
        assert isinstance(options, BnbAutoOptions)
        tokens = options.sensitivity.samples * options.sensitivity.seq_len
        return 2 * speed.io_s() + shape.params() * 1e-8 + shape.layers * speed.forward_s(tokens, shape.params())

    def refusals(self, options: MethodOptions, check: ShapeCheck) -> list[str]:
        """A budget clearly below the smallest model bnb-auto can make (as the last stage, where it sets the size).

        Only a budget below the estimate by more than 1 % (the planner's error on bnb formats) is refused here;
        one nearer the edge is checked exactly by the build, which then fails that variant alone."""
        assert isinstance(options, BnbAutoOptions)
        if not check.last:
            return []
        floor, _ = self.bounds(check.shape, check.rest, options)
        if options.target_mb * 1e6 >= 0.99 * floor:
            return []
        return [f"target_mb {options.target_mb:g} is below the smallest model bnb-auto can make from {check.model} "
                f"(about {floor / 1e6:.2f} MB with every block {options.quant}); raise target_mb"]

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workbench.analysis.mixed_precision import Option, check_budget, greedy, optimal, total_bytes, total_kld
        from workbench.runtimes.torch import state_bytes

        assert isinstance(options, BnbAutoOptions)
        require_bitsandbytes()
        budget = int(options.target_mb * 1e6)
        timings: dict[str, Any] = {}
        load = {"trust_remote_code": ctx.trust_remote_code, "device_map": {"": ctx.device}}
        started = time.perf_counter()
        ctx.emit(f"quantizing every block with bitsandbytes ({options.quant})")
        quantized = AutoModelForCausalLM.from_pretrained(input_dir, quantization_config=options.config(None), **load)
        # What transformers keeps float by default (the output head): kept so in every mix, as in bnb-*.
        default_skips = list(getattr(getattr(quantized, "hf_quantizer", None), "modules_to_not_convert", None) or [])
        prefix = decoder_prefix(quantized)
        quant_bytes, fixed = bytes_by_block(quantized, prefix)
        float_width = torch.empty((), dtype=quantized.get_input_embeddings().weight.dtype).element_size()
        float_bytes = float_block_bytes(float_skeleton(input_dir, ctx), prefix, float_width)
        timings["quantize_s"] = time.perf_counter() - started
        floor = fixed + sum(quant_bytes.values())
        ceiling = fixed + sum(float_bytes.values())
        # The smallest and largest reachable sizes are known now: refuse an impossible budget before measuring.
        check_budget({f"{prefix}.{i}": [Option(options.quant, quant_bytes[i], 0.0)] for i in quant_bytes}, budget, fixed,
                     smallest="the smallest model bnb-auto can make from this input",
                     advice="raise target_mb (or choose a smaller quant)")
        note = None
        if budget >= ceiling:
            note = (f"the budget of {budget / 1e6:.2f} MB holds every block in float ({ceiling / 1e6:.2f} MB): "
                    "nothing needs quantizing, so every block is kept float (the same weights as the unquantized input)")
            ctx.emit(note)

        started = time.perf_counter()
        klds, cached = _block_sensitivities(input_dir, options, quantized, ctx)
        if cached:
            timings["sensitivity_cached"] = True
        timings["sensitivity_s"] = time.perf_counter() - started
        del quantized

        units = {f"{prefix}.{i}": i for i in sorted(quant_bytes)}
        table = {unit: [Option(options.quant, quant_bytes[i], klds[i]), Option("float", float_bytes[i], 0.0)]
                 for unit, i in units.items()}
        chosen = optimal(table, budget, fixed)
        walk = greedy(table, budget, fixed)
        kept = [unit for unit, option in chosen.items() if option.type == "float"]
        ctx.emit(f"keeping {len(kept)} of {len(units)} blocks in float: predicted {total_bytes(chosen, fixed) / 1e6:.2f} MB "
                 f"for a {budget / 1e6:.2f} MB budget")
        started = time.perf_counter()
        skips = default_skips + [block_skip_pattern(unit) for unit in kept]
        model = AutoModelForCausalLM.from_pretrained(input_dir, quantization_config=options.config(skips), **load)
        written = state_bytes(model)
        if written != total_bytes(chosen, fixed):
            raise WorkbenchError(f"bnb-auto: the model holds {written} weight bytes, the table predicted "
                                 f"{total_bytes(chosen, fixed)}; bitsandbytes quantized other modules than measured")
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code).save_pretrained(out_dir)
        timings["build_s"] = time.perf_counter() - started
        auto = {
            "budget_bytes": budget, "target_mb": options.target_mb, "quant": options.quant, "fixed_bytes": fixed,
            "weight_bytes": written, "smallest_bytes": floor, "float_bytes": ceiling,
            "choice": {unit: option.type for unit, option in chosen.items()}, "kept_float": kept,
            "skip_modules": skips, "predicted_kld_sum": total_kld(chosen),
            "greedy": {"choice": {u: o.type for u, o in walk.items()}, "weight_bytes": total_bytes(walk, fixed),
                       "predicted_kld_sum": total_kld(walk)},
            "sensitivity": {**describe(options.sensitivity),
                            "tokens": options.sensitivity.samples * options.sensitivity.seq_len,
                            "table": {u: [o.__dict__ for o in opts] for u, opts in table.items()}},
            "allocation": "exact dynamic programming over the measured table (blocks' KLDs assumed additive)",
            "note": note, "timings": timings,
        }
        (out_dir / "stage_report.json").write_text(json.dumps({"bnb": {"auto": auto}}))


def _block_sensitivities(input_dir: Path, options: BnbAutoOptions, quantized: Any,
                         ctx: BuildContext) -> tuple[dict[int, float], bool]:
    """({block index: KLD when only that block is quantized}, whether the table came from the cache). The same
    input, quantization and calibration tokens give the same table, so it is cached under those."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.analysis.sensitivity import sensitivity_cache
    from workbench.environment import library_versions

    # A local model folder can be rewritten in place: its weight files' sizes and times are part of the key.
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(input_dir).glob("*.safetensors"))]
    material = {"input": str(input_dir), "files": files, "quant": options.quant,
                "double_quant": options.double_quant if options.quant != "int8" else None,
                "sensitivity": options.sensitivity.model_dump(), "device": ctx.device, "versions": library_versions()}
    cache = sensitivity_cache("bnb-auto", material)
    if cache.is_file():
        ctx.emit("per-block sensitivities from the cache")
        return {int(k): v for k, v in json.loads(cache.read_text())["kld"].items()}, True
    tokenizer = AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code)
    sequences = calibration_sequences(tokenizer, options.sensitivity)
    reference = AutoModelForCausalLM.from_pretrained(input_dir, dtype=torch.float32,
                                                     trust_remote_code=ctx.trust_remote_code).eval()
    klds = measure_blocks(reference, quantized, sequences, ctx.emit)
    cache.write_text(json.dumps({"material": material, "kld": klds}))
    return klds, False


def float_skeleton(input_dir: Path, ctx: BuildContext) -> Any:
    """The input's module tree and parameter shapes without its weights (meta tensors: nothing is read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=ctx.trust_remote_code)
