"""Fidelity: the workbench's fp32 perplexity vs an independent plain-transformers computation.

    python bench/fidelity.py [--preset presets/quickstart.yaml]

Runs the preset's baseline through the workbench (worker process, windows, log-softmax of
`TorchVariant.logits`), then recomputes perplexity from the run's own `eval_tokens.json` and
`artifact_path` with nothing but transformers: `model(input_ids, labels=...)` per window, where
labels mask the tokens an earlier window already scored, and the loss is weighted by the number of
scored tokens. Prints both figures and their relative difference (the issue asks for <= 0.1 %).

Then the reference storage: the baseline's log-probabilities written as float32 and as float16 (the
default), their sizes on disk, and a variant (the baseline's weights rounded to bfloat16, run in
float32) scored against each. Prints every divergence statistic both ways, the largest change the
16-bit storage causes, and the bound `evaluate_quality` proves for the KLD figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plain_transformers_perplexity(model_dir: str, tokens: list[int], context: int, stride: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll_sum, count, scored_until = 0.0, 0, 0
    for start in range(0, len(tokens) - 1, stride):
        end = min(start + context, len(tokens))
        first_target = max(scored_until, start + 1)
        if first_target < end:
            ids = torch.tensor([tokens[start:end]])
            labels = ids.clone()
            labels[0, : first_target - start] = -100
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels).loss.item()
            nll_sum += loss * (end - first_target)
            count += end - first_target
            scored_until = end
        if end == len(tokens):
            break
    return math.exp(nll_sum / count)


def storage_comparison(model_dir: str, tokens: list[int], context: int, stride: int, threads: int) -> dict:
    """Statistics of a bf16-rounded variant against float32- and float16-stored references, and the sizes."""
    import copy

    import torch

    from workbench.metrics.quality import DIVERGENCE_KEYS, evaluate_quality, per_token_path
    from workbench.runtimes.torch import TorchVariant

    base = TorchVariant.load("fp32", Path(model_dir), "cpu", threads)
    rounded = copy.deepcopy(base.model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.bfloat16().float())
    variant = TorchVariant("bf16-rounded", rounded, base.tokenizer, Path(model_dir), "cpu")
    out: dict = {"variant": "the baseline's weights rounded to bfloat16, computed in float32"}
    stats = {}
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in ("float32", "float16"):
            reference = Path(scratch) / f"reference-{dtype}.npy"
            evaluate_quality(base.logits, tokens, context, stride, write_reference=reference, reference_dtype=dtype)
            out[f"{dtype}_log_probs_bytes"] = reference.stat().st_size
            out[f"{dtype}_per_token_file_bytes"] = per_token_path(reference).stat().st_size
            stats[dtype] = evaluate_quality(variant.logits, tokens, context, stride, reference=reference)
    out["size_ratio_total"] = ((out["float16_log_probs_bytes"] + out["float16_per_token_file_bytes"])
                               / out["float32_log_probs_bytes"])
    changes = {}
    for key in DIVERGENCE_KEYS:
        a, b = stats["float32"][key], stats["float16"][key]
        if isinstance(a, list):
            changes[key] = max(abs(x - y) for x, y in zip(a, b))
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            changes[key] = abs(a - b)
    largest = max(changes, key=changes.get)
    out.update(statistics_float32={k: stats["float32"][k] for k in DIVERGENCE_KEYS},
               statistics_float16={k: stats["float16"][k] for k in DIVERGENCE_KEYS},
               change=changes, largest_change={"statistic": largest, "abs": changes[largest],
                                               "relative": changes[largest] / abs(stats["float32"][largest])
                                               if stats["float32"][largest] else None},
               kld_bound=stats["float16"]["kld_storage_bound"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="presets/quickstart.yaml")
    args = parser.parse_args()

    from workbench.config.presets import load_preset, select_variants
    from workbench.running.runner import Runner

    preset = load_preset(args.preset)
    preset = select_variants(preset, [preset.baseline])
    with tempfile.TemporaryDirectory() as out:
        run = Runner(preset, out_dir=Path(out)).run()
        record = run["variants"][0]
        if record["status"] != "ok":
            raise SystemExit(f"the baseline failed: {record['error']}")
        tokens = json.loads((Path(out) / "eval_tokens.json").read_text())
    ours = record["metrics"]["perplexity"]
    plain = plain_transformers_perplexity(record["artifact_path"], tokens, preset.eval.context, preset.eval.stride,
                                          preset.threads)
    relative = abs(ours - plain) / plain
    print(json.dumps({"model": preset.model, "eval_tokens": len(tokens), "context": preset.eval.context,
                      "stride": preset.eval.stride, "workbench_perplexity": ours,
                      "plain_transformers_perplexity": plain, "relative_difference": relative}, indent=1))
    print(f"relative difference: {relative * 100:.5f} % (want <= 0.1 %)")

    storage = storage_comparison(record["artifact_path"], tokens, preset.eval.context, preset.eval.stride,
                                 preset.threads)
    print(json.dumps(storage, indent=1))
    mb = 1e6
    print(f"reference storage: float32 {storage['float32_log_probs_bytes'] / mb:.1f} MB -> float16 "
          f"{storage['float16_log_probs_bytes'] / mb:.1f} MB + per-token file "
          f"{storage['float16_per_token_file_bytes'] / mb:.3f} MB (ratio {storage['size_ratio_total']:.5f})")
    largest = storage["largest_change"]
    print(f"largest change of any statistic from 16-bit storage: {largest['statistic']} by {largest['abs']:.3g}"
          f" (relative {largest['relative'] if largest['relative'] is None else format(largest['relative'], '.3g')}); proven KLD bounds: mean {storage['kld_bound']['kld_mean']:.3g}, "
          f"percentiles/max {storage['kld_bound']['kld_percentiles_and_max']:.3g}")


if __name__ == "__main__":
    main()
