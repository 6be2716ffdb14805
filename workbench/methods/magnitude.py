"""Magnitude pruning: zero the smallest-|w| weights of the targeted Linear layers (L1 unstructured).

Uses torch.nn.utils.prune, per layer (each layer loses the same fraction) or globally (one threshold
over all targeted layers, so robust layers can keep more), then makes the masks permanent. The result
is a plain transformers folder whose zeros are stored densely: same size on disk, same speed, only
the zero count changes (honesty "dense-with-zeros").

    python -m workbench run preset.yaml   # with a variant {method: magnitude, options: {sparsity: 0.5}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from workbench.methods.base import BuildContext, Method, MethodOptions, SizeEstimate, SizeInput, check_sparsity, dense_with_zeros
from workbench.methods.weights import (INCLUDE_LM_HEAD, TARGETS, Targets, load_float_model, save_hf,
                                       target_linears, write_report)


class MagnitudeOptions(MethodOptions):
    sparsity: float = Field(0.3, description="Fraction of each targeted weight set to zero, in [0, 1).")
    scope: Literal["layer", "global"] = Field(
        "layer",
        description="'layer': every targeted layer loses the same fraction; 'global': one magnitude threshold "
        "over all targeted layers together (layers with small weights lose more).",
    )

    targets: Targets = TARGETS
    include_lm_head: bool = INCLUDE_LM_HEAD

    @field_validator("sparsity")
    @classmethod
    def _in_range(cls, value: float) -> float:
        return check_sparsity(value)


class Magnitude(Method):
    name = "magnitude"
    summary = "L1 magnitude pruning (unstructured, per layer or global); zeros stored densely."
    Options = MagnitudeOptions
    honesty = "dense-with-zeros"
    accepts = frozenset({"hf"})
    produces = "hf"

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        return dense_with_zeros(self.name, size)

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        import torch
        from torch.nn.utils import prune

        assert isinstance(options, MagnitudeOptions)
        model = load_float_model(input_dir, ctx)
        layers = target_linears(model, options.targets, options.include_lm_head)
        ctx.emit(f"pruning {len(layers)} Linear layers to {options.sparsity:.0%} ({options.scope})")
        if options.scope == "global":
            prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                                      amount=options.sparsity)
        else:
            for _, module in layers:
                prune.l1_unstructured(module, "weight", amount=options.sparsity)
        for _, module in layers:
            prune.remove(module, "weight")  # weight = weight_orig * mask, stored as a plain parameter again

        rows, zeros_total, elements_total = [], 0, 0
        with torch.no_grad():
            for name, module in layers:
                elements = module.weight.numel()
                zeros = elements - int(torch.count_nonzero(module.weight))
                zeros_total, elements_total = zeros_total + zeros, elements_total + elements
                rows.append({"name": name, "sparsity": zeros / elements, "elements": elements})
        save_hf(model, input_dir, out_dir, ctx)
        write_report(out_dir, {
            "scope": options.scope, "target_sparsity": options.sparsity,
            "achieved_sparsity": zeros_total / elements_total, "pruned_layers": len(rows),
            "targeted_elements": elements_total, "layers": rows,
        })
