"""Per-block sensitivity: how much KLD one compressed decoder block adds on its own.

For block i, the fp32 baseline gets block i's Linear weights from the compressed variant
(dequantized to float, so any method's weights can be swapped in), everything else unchanged;
KLD / top-1 against the baseline are measured on the run's eval tokens. Blocks with the highest
KLD are the ones to keep in higher precision; `mixed_precision_variant` writes such a variant.
This measures weight error only: low-bit kernels' own arithmetic is not part of the figure.
`KLDProbe` measures the same on calibration text, replaying only the blocks from the changed one on
(gguf-auto and bnb-auto build their per-block tables with it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError


def block_sensitivity(baseline_dir: str, variant_dir: str, tokens: list[int], context: int, stride: int,
                      device: str = "cpu", emit: Callable[[str], None] = lambda _m: None,
                      bos_id: int | None = None) -> list[dict[str, Any]]:
    import torch

    from workbench.metrics.quality import evaluate_quality
    from workbench.runtimes.torch import TorchVariant, float_weight

    baseline = TorchVariant.load("baseline", Path(baseline_dir), device, torch.get_num_threads())
    compressed = TorchVariant.load("compressed", Path(variant_dir), device, torch.get_num_threads())
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        reference = Path(scratch) / "reference.npy"
        # float32: per-block KLDs can be small, and this scratch reference is short-lived.
        evaluate_quality(baseline.logits, tokens, context, stride, write_reference=reference,
                         reference_dtype="float32", bos_id=bos_id)
        blocks = list(zip(baseline.model.model.layers, compressed.model.model.layers))
        for index, (base_block, comp_block) in enumerate(blocks):
            emit(f"sensitivity of block {index + 1}/{len(blocks)}")
            originals = {}
            comp_linears = dict(comp_block.named_modules())
            for name, module in base_block.named_modules():
                if isinstance(module, torch.nn.Linear) and name in comp_linears:
                    originals[name] = module.weight.data
                    module.weight.data = float_weight(comp_linears[name]).to(module.weight.dtype).reshape(module.weight.shape)
            quality = evaluate_quality(baseline.logits, tokens, context, stride, reference=reference, bos_id=bos_id)
            for name, weight in originals.items():  # restore before the next block
                dict(base_block.named_modules())[name].weight.data = weight
            rows.append({"block": index, "name": f"model.layers.{index}", "kld_mean": quality["kld_mean"],
                         "kld_p99": quality["kld_p99"], "top1_agreement": quality["top1_agreement"],
                         "perplexity": quality["perplexity"], "linears_swapped": len(originals)})
    return rows


def most_sensitive(rows: list[dict[str, Any]], keep: int) -> list[str]:
    return [row["name"] for row in sorted(rows, key=lambda r: r["kld_mean"], reverse=True)[:keep]]


def suggested_variant(name: str, keep: list[str], stage: dict[str, Any]) -> dict[str, Any] | None:
    """The variant that keeps the `keep` blocks in full precision: the same method with skip_modules naming
    them, or None when the method has no skip_modules (only bitsandbytes' do)."""
    from workbench.methods.bnb import block_skip_pattern
    from workbench.methods.registry import get_method

    if "skip_modules" not in get_method(stage["method"]).Options.model_fields:
        return None
    # A list of skip patterns replaces transformers' default (the output head): lm_head stays unquantized as before.
    patterns = [block_skip_pattern(block) for block in keep] + ["lm_head"]
    return {"name": name, "method": stage["method"], "options": {**(stage.get("options") or {}), "skip_modules": patterns}}


def sensitivity_worker(payload: dict, emit: Callable[[str], None]) -> list[dict[str, Any]]:
    """Worker-process entry (see workbench.process.run_in_worker)."""
    import torch

    torch.set_num_threads(payload["threads"])
    tokens = json.loads(Path(payload["eval_tokens_path"]).read_text())[: payload["max_tokens"]]
    return block_sensitivity(payload["baseline_dir"], payload["variant_dir"], tokens, payload["context"],
                             payload["stride"], emit=emit, bos_id=payload.get("bos_id"))


# ---- one block at a time on calibration text (gguf-auto, bnb-auto) -------------------------------------------


class KLDProbe:
    """Mean KLD of the model's next-token distribution to the unmodified model's, on fixed sequences.

    The unmodified run records every decoder layer's inputs (a forward pre-hook with kwargs: hidden
    states, mask, rope tables, exactly as the model's own forward passes them), so a change confined to
    block N is measured by replaying blocks N.. only: the blocks before it would compute the same.
    """

    def __init__(self, model: Any, sequences: list[list[int]]) -> None:
        import torch

        self.model = model
        self.layers = model.model.layers
        self.inputs = [torch.tensor([ids]) for ids in sequences]
        self.captured: list[list[tuple[tuple, dict]]] = []
        self.reference = []
        for x in self.inputs:
            calls: list[tuple[tuple, dict]] = []
            hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs, calls=calls: calls.append((args, kwargs)),
                                                     with_kwargs=True) for layer in self.layers]
            try:
                self.reference.append(self._logp(x))
            finally:
                for hook in hooks:
                    hook.remove()
            if len(calls) != len(self.layers):
                raise WorkbenchError("the model did not call each decoder layer once per forward; per-block "
                                     "sensitivity needs a plain stack of decoder layers")
            self.captured.append(calls)

    def _logp(self, x: Any) -> Any:
        import torch

        with torch.inference_mode():
            return torch.log_softmax(self.model(x, use_cache=False).logits[0].float(), -1)

    def _logp_from(self, block: int, calls: list[tuple[tuple, dict]]) -> Any:
        import torch

        with torch.inference_mode():
            args, kwargs = calls[block]
            hidden = args[0] if args else kwargs["hidden_states"]
            for index in range(block, len(self.layers)):
                args, kwargs = calls[index]
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                out = self.layers[index](hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            logits = self.model.lm_head(self.model.model.norm(hidden))
            return torch.log_softmax(logits[0].float(), -1)

    def kld(self, block: int | None = None) -> float:
        """KLD with the model's current weights; `block`: only blocks >= block differ from the reference."""
        total, count = 0.0, 0
        for x, ref, calls in zip(self.inputs, self.reference, self.captured):
            logp = self._logp(x) if block is None else self._logp_from(block, calls)
            total += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
            count += ref.shape[0]
        return total / count


def sensitivity_cache(method: str, material: dict) -> Path:
    """Where a method keeps a measured per-block table: same input, options and tokens, same table."""
    from workbench.cache import key_hash
    from workbench.paths import workbench_home

    folder = workbench_home() / f"{method}-sensitivity"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key_hash(material)}.json"
