"""Fidelity: the workbench's fp32 perplexity vs an independent plain-transformers computation.

    python bench/fidelity.py [--preset presets/quickstart.yaml]

Runs the preset's baseline through the workbench (worker process, windows, log-softmax of
`TorchVariant.logits`), then recomputes perplexity from the run's own `eval_tokens.json` and
`artifact_path` with nothing but transformers: `model(input_ids, labels=...)` per window, where
labels mask the tokens an earlier window already scored, and the loss is weighted by the number of
scored tokens. Prints both figures and their relative difference (the issue asks for <= 0.1 %).
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="presets/quickstart.yaml")
    args = parser.parse_args()

    from workbench.presets import load_preset, select_variants
    from workbench.runner import Runner

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


if __name__ == "__main__":
    main()
