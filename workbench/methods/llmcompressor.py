"""One-shot calibrated compression through llm-compressor (the maintained successor of auto-gptq).

`gptq` and `awq` quantize Linear weights to 4 or 8 bits (W4A16 / W8A16, per group) and save a
compressed-tensors checkpoint (packed int4/int8 + scales) that transformers loads back; `sparsegpt`
and `wanda` prune to a sparsity (unstructured or an N:M mask such as 2:4) and save dense weights with
zeros, so a later stage (e.g. gguf) can take them. Calibration sequences come from
workbench/data/calibration.py and never overlap the evaluation text.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from workbench.data.calibration import CalibrationSpec, calibration_sequences, describe
from workbench.errors import WorkbenchError
from workbench.methods.base import (DTYPE_BYTES, BuildContext, BuildSpeed, Method, MethodOptions, ShapeCheck,
                                    SizeEstimate, SizeInput, check_sparsity, dense_with_zeros)

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

_CANDIDATE_GROUPS = (16, 32, 64, 128, 256)


class _Calibrated(MethodOptions):
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec,
                                         description="Calibration sequences: samples, seq_len, text, seed.")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"],
                              description="Modules left untouched (names or 're:' patterns, as llm-compressor takes them).")


class QuantOptions(_Calibrated):
    bits: Literal[4, 8] = Field(4, description="Weight bits: 4 (W4A16) or 8 (W8A16); activations stay 16/32-bit.")
    group_size: int | None = Field(64, gt=0, description="Columns sharing one scale; must divide every layer's input "
                                                         "width (SmolLM2's 576 takes 64, not 128). None: one scale per row.")
    symmetric: bool = Field(True, description="Symmetric integers (no zero point).")


class GPTQOptions(QuantOptions):
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, as a fraction of its mean diagonal.")
    block_size: int = Field(128, gt=0, description="Columns quantized per GPTQ block.")
    actorder: Literal["static", "group", "weight"] | None = Field(
        "static", description="Activation ordering: quantize high-activation columns first (None: off).")


class AWQOptions(QuantOptions):
    symmetric: bool = Field(False, description="Symmetric integers; AWQ usually uses asymmetric (zero point).")
    duo_scaling: bool = Field(True, description="Scale search uses both activations and weights.")


class SparsityOptions(_Calibrated):
    # SparseGPT / Wanda name a target's own module "<name>." internally, so a plain "lm_head" never matches
    # (a tied lm_head would prune the embeddings too); llm-compressor's own advice is this pattern.
    ignore: list[str] = Field(default_factory=lambda: ["re:.*lm_head"],
                              description="Modules left untouched (names or 're:' patterns, as llm-compressor takes them).")
    sparsity: float = Field(0.5, description="Fraction of each targeted layer's weights set to zero, in [0, 1).")
    mask: str = Field("unstructured", description="'unstructured' or an N:M pattern such as '2:4' "
                                                  "(N zeros in every M consecutive weights; 2:4 means 50 %).")

    @field_validator("sparsity")
    @classmethod
    def _fraction(cls, value: float) -> float:
        return check_sparsity(value)

    @field_validator("mask")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value != "unstructured" and not re.fullmatch(r"\d+:\d+", value):
            raise ValueError(f"mask must be 'unstructured' or N:M such as '2:4': got '{value}'")
        if value != "unstructured":
            n, m = map(int, value.split(":"))
            if not 0 < n < m:
                raise ValueError(f"mask {value}: N zeros out of M needs 0 < N < M")
        return value


class SparseGPTOptions(SparsityOptions):
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, as a fraction of its mean diagonal.")
    block_size: int = Field(128, gt=0, description="Columns pruned per block.")


class WandaOptions(SparsityOptions):
    pass


def linear_input_widths(model: Any, ignore: list[str]) -> dict[str, int]:
    """Input width of every Linear that would be quantized (the dimension a group must divide)."""
    import torch

    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not _ignored(name, ignore):
            widths[name] = module.in_features
    return widths


def _ignored(name: str, ignore: list[str]) -> bool:
    return any(re.fullmatch(p[3:], name) if p.startswith("re:") else name == p or name.endswith("." + p) for p in ignore)


def check_group_size(widths: dict[str, int], group_size: int | None) -> None:
    """Refuse before calibrating (minutes) when a group size does not divide a layer's input width."""
    if group_size is None:
        return
    bad = {name: w for name, w in widths.items() if w % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        valid = [g for g in _CANDIDATE_GROUPS if all(w % g == 0 for w in widths.values())]
        raise WorkbenchError(
            f"group_size {group_size} does not divide the input width {width} of {name} ({len(bad)} layers affected); "
            f"valid group sizes for this model: {', '.join(map(str, valid)) or 'none of ' + str(_CANDIDATE_GROUPS)}, "
            "or null for one scale per row"
        )


def _scheme(options: QuantOptions) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=options.bits, type="int", symmetric=options.symmetric,
                               strategy="group" if options.group_size else "channel", group_size=options.group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


class _LLMCompressorMethod(Method):
    saves_compressed = True

    def recipe(self, options: Any) -> list:
        raise NotImplementedError

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert isinstance(options, _Calibrated)
        tokenizer = AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code)
        sequences = calibration_sequences(tokenizer, options.calibration)  # fails fast on a short text
        model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=torch.float32,
                                                     trust_remote_code=ctx.trust_remote_code)
        if isinstance(options, QuantOptions):
            check_group_size(linear_input_widths(model, options.ignore), options.group_size)
        ctx.emit(f"{self.name}: calibrating on {len(sequences)} x {options.calibration.seq_len} tokens")
        recipe = self.recipe(options)
        _oneshot(model, tokenizer, sequences, recipe)
        # Quantized: the packed compressed-tensors checkpoint. Pruned: dense weights with exact zeros,
        # so the result stays a plain transformers folder that another stage (gguf, bnb) can take.
        model.save_pretrained(out_dir, save_compressed=self.saves_compressed)
        tokenizer.save_pretrained(out_dir)
        if not self.saves_compressed:
            _drop_compression_config(out_dir)
        (out_dir / "stage_report.json").write_text(json.dumps({
            "calibration": describe(options.calibration), "recipe": [type(m).__name__ for m in recipe],
        }))

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        if not self.saves_compressed:
            return dense_with_zeros(self.name, size)
        assert isinstance(options, QuantOptions)
        return packed_int_estimate(self.name, options, size)

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        """Three forward passes' worth of the calibration tokens through the Linears, plus a per-layer solve."""
        assert isinstance(options, _Calibrated)
        tokens = options.calibration.samples * options.calibration.seq_len
        return (speed.io_s() + 3 * speed.forward_s(tokens, shape.linear_params())
                + shape.layers * shape.hidden**3 * 8 / speed.flops_s)


def packed_int_estimate(name: str, options: QuantOptions, size: SizeInput) -> SizeEstimate:
    """compressed-tensors stores packed int32 words, a scale per group of each row and packed zero points when
    asymmetric (everything else in the float dtype); on CPU it unpacks them to that dtype when the model runs,
    so memory holds dense bytes."""
    shape, rest = size.shape, size.rest
    bits, group = options.bits, options.group_size
    total = (shape.params() - shape.linear_params()) * DTYPE_BYTES[rest]
    for *_, i, o in shape.linears():
        groups = o * (math.ceil(i / group) if group else 1)
        total += math.ceil(i * bits / 32) * o * 4 + groups * DTYPE_BYTES[rest] + 16  # packed rows, scales, shape
        if not options.symmetric:
            total += math.ceil(groups * bits / 32) * 4
    size.notes.append(f"{bits}-bit packed on disk (~{total / 1e6:.0f} MB); on CPU compressed-tensors unpacks to {rest} "
                      "at the first forward, so dense bytes in memory")
    return SizeEstimate(size.dense_bytes(), f"{name} int{bits} g{group} ({rest} in use)", rest)


def _oneshot(model: Any, tokenizer: Any, sequences: list[list[int]], recipe: list) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot

    dataset = Dataset.from_dict({"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]})
    try:
        with _no_pinning_without_accelerator():
            oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe,
                    num_calibration_samples=len(sequences), max_seq_length=len(sequences[0]),
                    shuffle_calibration_samples=False)
    except ValueError as exc:  # llm-compressor's own checks (shapes, schemes) say what is wrong
        raise WorkbenchError(f"llm-compressor refused: {str(exc).splitlines()[0]}") from None


def _no_pinning_without_accelerator():
    """llm-compressor 0.14's AWQ pins cached activations for faster host-to-GPU copies, which raises
    "Cannot access accelerator device" on a CPU-only machine; pinning only speeds up GPU transfers, so
    without a GPU it is skipped."""
    import contextlib
    from unittest import mock

    import torch

    if torch.cuda.is_available():
        return contextlib.nullcontext()
    from llmcompressor.pipelines.cache import IntermediatesCache

    return mock.patch.object(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None)


def _drop_compression_config(out_dir: Path) -> None:
    """Dense weights need no compressed-tensors decoding: a plain float folder loads (and converts) anywhere."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None or config.pop("sparsity_config", None) is not None:
        path.write_text(json.dumps(config, indent=2))


class _GroupQuantized(_LLMCompressorMethod):
    """GPTQ and AWQ: integer weights in groups of `group_size` columns along each layer's input."""

    def refusals(self, options: MethodOptions, check: ShapeCheck) -> list[str]:
        """A group size that does not divide a quantized layer's input width (read from the config)."""
        assert isinstance(options, QuantOptions)
        widths = {name: n_in for name, _gguf, _layer, n_in, _out in check.shape.linears()
                  if not _ignored(name, options.ignore)}
        try:
            check_group_size(widths, options.group_size)
        except WorkbenchError as exc:
            return [str(exc)]
        return []


class GPTQ(_GroupQuantized):
    name = "gptq"
    summary = "GPTQ (llm-compressor): W4A16/W8A16 with second-order error correction; compressed-tensors checkpoint."
    Options = GPTQOptions
    honesty = "simulated"  # on CPU, compressed-tensors unpacks the int weights to float for every matmul
    produces = "quantized"

    def recipe(self, options: Any) -> list:
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=_scheme(options), ignore=options.ignore, block_size=options.block_size,
                             dampening_frac=options.dampening_frac, actorder=options.actorder)]


class AWQ(_GroupQuantized):
    name = "awq"
    summary = "AWQ (llm-compressor): activation-aware scaling, then W4A16/W8A16 group quantization."
    Options = AWQOptions
    honesty = "simulated"
    produces = "quantized"

    def recipe(self, options: Any) -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(duo_scaling=options.duo_scaling),
                QuantizationModifier(config_groups=_scheme(options), ignore=options.ignore)]


def _mask_structure(options: SparsityOptions) -> str:
    return "0:0" if options.mask == "unstructured" else options.mask


class SparseGPT(_LLMCompressorMethod):
    name = "sparsegpt"
    summary = "SparseGPT (llm-compressor): prune with second-order weight updates; unstructured or N:M (2:4)."
    Options = SparseGPTOptions
    honesty = "dense-with-zeros"
    saves_compressed = False

    def recipe(self, options: Any) -> list:
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return [SparseGPTModifier(sparsity=_effective_sparsity(options), mask_structure=_mask_structure(options),
                                  ignore=options.ignore, block_size=options.block_size,
                                  dampening_frac=options.dampening_frac)]


class Wanda(_LLMCompressorMethod):
    name = "wanda"
    summary = "Wanda (llm-compressor): prune by |weight| x input activation norm; unstructured or N:M (2:4)."
    Options = WandaOptions
    honesty = "dense-with-zeros"
    saves_compressed = False

    def recipe(self, options: Any) -> list:
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return [WandaPruningModifier(sparsity=_effective_sparsity(options), mask_structure=_mask_structure(options),
                                     ignore=options.ignore)]


def _effective_sparsity(options: SparsityOptions) -> float:
    """An N:M mask fixes the sparsity at N/M; llm-compressor needs that value passed with the mask."""
    if options.mask == "unstructured":
        return options.sparsity
    n, m = map(int, options.mask.split(":"))
    return n / m
