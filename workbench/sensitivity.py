"""Per-block sensitivity: how much KLD one compressed decoder block adds on its own.

For block i, the fp32 baseline gets block i's Linear weights from the compressed variant
(dequantized to float, so any method's weights can be swapped in), everything else unchanged;
KLD / top-1 against the baseline are measured on the run's eval tokens. Blocks with the highest
KLD are the ones to keep in higher precision; `mixed_precision_variant` writes such a variant.
This measures weight error only: low-bit kernels' own arithmetic is not part of the figure.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable


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


def sensitivity_worker(payload: dict, emit: Callable[[str], None]) -> list[dict[str, Any]]:
    """Worker-process entry (see workbench.process.run_in_worker)."""
    import torch

    torch.set_num_threads(payload["threads"])
    tokens = json.loads(Path(payload["eval_tokens_path"]).read_text())[: payload["max_tokens"]]
    return block_sensitivity(payload["baseline_dir"], payload["variant_dir"], tokens, payload["context"],
                             payload["stride"], emit=emit, bos_id=payload.get("bos_id"))
